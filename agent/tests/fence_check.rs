//! The host-side fence (`drover-agent fence-check`) against the real Docker
//! Engine and real process groups: once the deadline has passed it kills
//! this agent's jobs and no one else's; with the deadline ahead, or no
//! deadline file, it kills nothing.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::ListContainersOptions;
use bollard::Docker;
use drover_agent::config::RuntimeChoice;
use drover_agent::fence::{self, Outcome};
use drover_agent::runtime::docker::{test_image, DockerRuntime, LABEL_AGENT};
use drover_agent::runtime::process::{JobGroup, ProcessRuntime};
use drover_agent::runtime::{RunSpec, Runtime, Started};
use drover_agent::{session, AgentConfig};

/// A deadline long past, and one an hour ahead.
const PASSED_MS: u64 = 1;

fn an_hour_ahead_ms() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (now + Duration::from_secs(3600)).as_millis() as u64
}

fn agent_id(who: &str) -> String {
    format!("fence-{who}-{:016x}", rand::random::<u64>())
}

fn config(data_dir: &Path, agent_id: &str, runtime: RuntimeChoice) -> AgentConfig {
    AgentConfig {
        data_dir: data_dir.to_path_buf(),
        agent_id: agent_id.to_string(),
        runtime,
        ..AgentConfig::default()
    }
}

/// Removes the containers of these agents, whatever the test did.
struct RemoveContainers(Vec<String>);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        for agent in &self.0 {
            let out = std::process::Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label={LABEL_AGENT}={agent}"),
                ])
                .output()
                .expect("the docker CLI");
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

/// A job container of `rt`'s agent running `sleep`, as the agent starts one.
async fn sleeping_container(rt: &DockerRuntime, job_id: &str) -> Started {
    let mut spec = RunSpec::command(job_id, ["sleep", "1000"]);
    spec.image = test_image::ensure_on_local_engine().await.unwrap();
    rt.start(spec).await.unwrap()
}

/// Running containers labelled with `agent`.
async fn running(agent: &str) -> usize {
    let docker = Docker::connect_with_local_defaults().unwrap();
    let options = ListContainersOptions {
        filters: Some([("label".to_string(), vec![format!("{LABEL_AGENT}={agent}")])].into()),
        ..Default::default()
    };
    docker.list_containers(Some(options)).await.unwrap().len()
}

/// Runs the real binary: `(exit code, stdout, stderr)`.
async fn fence_check_binary(
    data_dir: &Path,
    agent_id: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DROVER_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--agent-id", agent_id, "--runtime", "docker", "fence-check"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_deadline_it_kills_only_this_agents_containers_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (agent_id("ours"), agent_id("theirs"));
    let _remove = RemoveContainers(vec![ours.clone(), theirs.clone()]);
    let rt = DockerRuntime::new(dir.path(), &ours);
    let other = DockerRuntime::new(dir.path().join("other"), &theirs);
    let mut job = sleeping_container(&rt, "job-ours").await;
    let _other_job = sleeping_container(&other, "job-theirs").await;
    session::write_fence_deadline(dir.path(), PASSED_MS).unwrap();

    let (code, stdout, stderr) = fence_check_binary(dir.path(), &ours, &["--json"], &[]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcome"], "fenced", "{report}");
    let killed: Vec<&str> = report["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["job"].as_str().unwrap())
        .collect();
    assert_eq!(killed, ["job-ours"], "{report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");

    let status = job.job.wait().await.unwrap();
    assert_eq!(status.code, Some(137), "SIGKILL: {status:?}");
    assert_eq!(running(&ours).await, 0);
    assert_eq!(running(&theirs).await, 1, "another agent's job is not ours");
    assert!(
        !session::fence_path(dir.path()).exists(),
        "the deadline is removed once acted on"
    );

    // The next run (the timer's, seconds later) has nothing to do.
    let (code, stdout, stderr) = fence_check_binary(dir.path(), &ours, &[], &[]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("no fence deadline"), "{stdout}");
    assert_eq!(running(&theirs).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_deadline_file_or_one_ahead_it_kills_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ours = agent_id("healthy");
    let _remove = RemoveContainers(vec![ours.clone()]);
    let rt = DockerRuntime::new(dir.path(), &ours);
    let _job = sleeping_container(&rt, "job-healthy").await;
    let config = config(dir.path(), &ours, RuntimeChoice::Docker);

    let report = fence::check(&config).await.unwrap();
    assert_eq!(report.outcome, Outcome::NoDeadline, "{report:?}");
    assert!(report.containers.is_empty() && report.errors.is_empty());
    assert_eq!(running(&ours).await, 1);

    session::write_fence_deadline(dir.path(), an_hour_ahead_ms()).unwrap();
    let report = fence::check(&config).await.unwrap();
    assert_eq!(report.outcome, Outcome::Healthy, "{report:?}");
    assert!(report.containers.is_empty() && report.errors.is_empty());
    assert_eq!(running(&ours).await, 1);
    assert!(
        session::fence_path(dir.path()).exists(),
        "a live agent's deadline stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_deadline_the_process_groups_of_the_pid_log_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = ProcessRuntime::new(dir.path());
    let mut job = rt
        .start(RunSpec::command(
            "proc-job",
            ["sh", "-c", "echo $$; sleep 1000"],
        ))
        .await
        .unwrap();
    let first = job.output.recv().await.unwrap();
    let pgid: i32 = String::from_utf8_lossy(&first.data).trim().parse().unwrap();
    let config = config(dir.path(), &agent_id("proc"), RuntimeChoice::Process);

    session::write_fence_deadline(dir.path(), an_hour_ahead_ms()).unwrap();
    let report = fence::check(&config).await.unwrap();
    assert_eq!(report.outcome, Outcome::Healthy, "{report:?}");
    assert!(report.process_groups.is_empty());
    assert!(std::path::Path::new(&format!("/proc/{pgid}")).exists());

    session::write_fence_deadline(dir.path(), PASSED_MS).unwrap();
    let report = fence::check(&config).await.unwrap();
    assert_eq!(report.outcome, Outcome::Fenced, "{report:?}");
    assert_eq!(
        report.process_groups,
        [JobGroup {
            name: "proc-job-1".to_string(),
            pgid
        }]
    );
    assert!(report.errors.is_empty(), "{report:?}");
    let status = job.job.wait().await.unwrap();
    assert_eq!(status.signal, Some(9), "{status:?}");
    assert!(!session::fence_path(dir.path()).exists());
}

#[tokio::test]
async fn an_unreachable_docker_engine_fails_naming_the_fix_and_keeps_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    session::write_fence_deadline(dir.path(), PASSED_MS).unwrap();
    let socket = dir.path().join("no-docker.sock");
    let docker_host = format!("unix://{}", socket.display());
    let (code, stdout, stderr) = fence_check_binary(
        dir.path(),
        &agent_id("nodocker"),
        &[],
        &[("DOCKER_HOST", &docker_host)],
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("Docker Engine not reachable") && stdout.contains("DOCKER_HOST"),
        "{stdout}"
    );
    assert!(
        session::fence_path(dir.path()).exists(),
        "kept, so the next run tries again"
    );
}
