//! The `drover` binary as a user runs it, against real processes.

use std::process::Output;

use drover_proto::model::{JobList, JobState};
use drover_tests::{binary, CoordinatorSettings, Sandbox, ADMIN_TOKEN};

async fn drover(sandbox: &Sandbox, args: &[&str]) -> Output {
    tokio::process::Command::new(binary("drover"))
        .arg("--addr")
        .arg(format!("http://{}", sandbox.coordinator.http_addr))
        .args(args)
        .env("DROVER_TOKEN", ADMIN_TOKEN)
        .env_remove("DROVER_CONFIG")
        .output()
        .await
        .expect("running drover")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_streams_the_logs_and_exits_with_the_job_code() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let out = drover(
        &sandbox,
        &[
            "submit",
            "--wait",
            "--name",
            "seven",
            "--",
            "sh",
            "-c",
            "echo hello from the job; exit 7",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello from the job"),
        "{}",
        text(&out.stdout)
    );
    let ok = drover(&sandbox, &["submit", "--wait", "--", "true"]).await;
    assert_eq!(ok.status.code(), Some(0), "stderr: {}", text(&ok.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_has_json_for_scripts() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let out = drover(
        &sandbox,
        &[
            "--json", "submit", "--wait", "--name", "listed", "--", "echo", "hi",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = drover(&sandbox, &["--json", "jobs", "--name", "listed"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: JobList = serde_json::from_slice(&out.stdout).expect("jobs --json is a JobList");
    assert_eq!(list.jobs.len(), 1);
    assert_eq!(list.jobs[0].state, JobState::Succeeded);
    for args in [
        &["--json", "agents"][..],
        &["--json", "pools"],
        &["--json", "show", &list.jobs[0].id],
    ] {
        let out = drover(&sandbox, args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} is not JSON: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_2_naming_the_field_and_submits_nothing() {
    let sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let out = drover(&sandbox, &["submit", "--cpu", "0", "--", "true"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cpu_millis"),
        "{}",
        text(&out.stderr)
    );
    let out = drover(&sandbox, &["--json", "jobs"]).await;
    let list: JobList = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.jobs.is_empty());
    let out = tokio::process::Command::new(binary("drover"))
        .args([
            "--addr",
            &format!("http://{}", sandbox.coordinator.http_addr),
            "--token",
            "wrong-token-123456789",
            "jobs",
        ])
        .env_remove("DROVER_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !text(&out.stderr).contains("wrong-token-123456789"),
        "the token is never echoed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_runs_real_jobs_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(binary("drover"))
        .args(["dev", "--demo"])
        .current_dir(dir.path())
        .env_remove("DROVER_ADDR")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CONFIG")
        .output()
        .await
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{all}");
    assert!(all.contains("SUCCEEDED"), "{all}");
    // It left a CLI config behind that points at a coordinator that is gone.
    assert!(dir.path().join(".drover/cli.toml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_outputs_feed_another_job_and_download_with_artifacts_get() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let out = drover(
        &sandbox,
        &[
            "--json",
            "submit",
            "--wait",
            "--outputs",
            "--",
            "sh",
            "-c",
            "echo 6 > $DROVER_OUTPUT_DIR/x",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let producer: drover_proto::model::Job =
        serde_json::from_slice(&out.stdout).expect("submit --wait --json prints the job");

    let input = format!("a={}", producer.id);
    let out = drover(
        &sandbox,
        &[
            "submit",
            "--wait",
            "--input",
            &input,
            "--",
            "sh",
            "-c",
            "echo $(( $(cat $DROVER_INPUT_DIR/a/x) * 7 ))",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("42"), "{}", text(&out.stdout));

    let dir = tempfile::tempdir().unwrap();
    let into = dir.path().join("unpacked");
    let out = drover(
        &sandbox,
        &[
            "--json",
            "artifacts",
            "get",
            &producer.id,
            "-x",
            into.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["attempt"], 1);
    assert_eq!(std::fs::read_to_string(into.join("x")).unwrap(), "6\n");

    let archive = dir.path().join("a.tar.zst");
    let out = drover(
        &sandbox,
        &[
            "artifacts",
            "get",
            &producer.id,
            "-o",
            archive.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::metadata(&archive).unwrap().len() > 0);

    // An input naming a job without outputs is refused before anything runs.
    let bad = format!("a={}", producer.id.replace(&producer.id[..1], "Z"));
    let out = drover(&sandbox, &["submit", "--input", &bad, "--", "true"]).await;
    assert_eq!(out.status.code(), Some(2), "bad input exits 2");
    assert!(
        text(&out.stderr).contains("inputs[0].job"),
        "{}",
        text(&out.stderr)
    );
}
