//! Workflows through the `drover` binary as a user runs them: the files in
//! `examples/` end to end (`drover run`, `drover artifacts get RUN/STEP`),
//! detaching and cancelling, Ctrl-C while watching, and bad files.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use drover_proto::model::JobState;
use drover_proto::workflow::{RunList, RunState, RunStepStatus, WorkflowRun, DEPENDENCY_FAILED};
use drover_tests::{binary, wait_until, CoordinatorSettings, Sandbox, ADMIN_TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A bound on one command, so a hang fails the test instead of stalling it.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);

fn drover_command(sandbox: &Sandbox, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("drover"));
    command
        .arg("--addr")
        .arg(format!("http://{}", sandbox.coordinator.http_addr))
        .args(args)
        .env("DROVER_TOKEN", ADMIN_TOKEN)
        .env_remove("DROVER_CONFIG")
        .kill_on_drop(true);
    command
}

async fn drover(sandbox: &Sandbox, args: &[&str]) -> Output {
    tokio::time::timeout(COMMAND_LIMIT, drover_command(sandbox, args).output())
        .await
        .unwrap_or_else(|_| panic!("drover {args:?} did not finish within {COMMAND_LIMIT:?}"))
        .expect("running drover")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn both(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("examples")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path.to_str().expect("utf-8 path").to_string()
}

fn step<'a>(run: &'a WorkflowRun, name: &str) -> &'a RunStepStatus {
    run.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("run {} has no step {name}: {run:#?}", run.id))
}

/// `drover --json show RUN`.
async fn show_run(sandbox: &Sandbox, id: &str) -> WorkflowRun {
    let out = drover(sandbox, &["--json", "show", id]).await;
    assert!(out.status.success(), "{}", both(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "show --json of a run is a WorkflowRun ({e}): {}",
            both(&out)
        )
    })
}

async fn runs(sandbox: &Sandbox) -> RunList {
    let out = drover(sandbox, &["--json", "runs"]).await;
    assert!(out.status.success(), "{}", both(&out));
    serde_json::from_slice(&out.stdout).expect("runs --json is a RunList")
}

/// Unpacks `target`'s artifact (`RUN/STEP[/INDEX]`) into a new directory.
async fn artifact(sandbox: &Sandbox, target: &str, into: &Path) -> PathBuf {
    let dir = into.join(target.replace('/', "_"));
    let out = drover(
        sandbox,
        &["artifacts", "get", target, "-x", dir.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{}", both(&out));
    dir
}

fn read_number(dir: &Path, file: &str) -> f64 {
    let path = dir.join(file);
    let raw = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    raw.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds {raw:?}, not a number: {e}", path.display()))
}

fn write_workflow(dir: &Path, name: &str, yaml: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calc_example_runs_and_its_sum_is_x_times_y_plus_x_over_z() {
    let sandbox = Sandbox::start(2, CoordinatorSettings::default()).await;
    let out = drover(&sandbox, &["run", &example("calc.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    // The summary table: one row per step and a total.
    let summary = text(&out.stdout);
    for name in ["generate", "multiply", "divide", "sum"] {
        assert!(
            summary
                .lines()
                .any(|l| l.starts_with(name) && l.contains("SUCCEEDED")),
            "{name}: {}",
            both(&out)
        );
    }
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("TOTAL") && l.contains("SUCCEEDED") && l.contains("5/5")),
        "{}",
        both(&out)
    );

    let listed = runs(&sandbox).await;
    assert_eq!(listed.runs.len(), 1, "{listed:?}");
    let id = listed.runs[0].id.clone();
    let run = show_run(&sandbox, &id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(step(&run, "divide").jobs.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let generated = artifact(&sandbox, &format!("{id}/generate"), dir.path()).await;
    let (x, y, z) = (
        read_number(&generated, "x"),
        read_number(&generated, "y"),
        read_number(&generated, "z"),
    );
    let sum = artifact(&sandbox, &format!("{id}/sum"), dir.path()).await;
    let result = read_number(&sum, "result");
    let expected = x * y + x / z;
    assert!(
        (result - expected).abs() < 1e-5,
        "sum says {result}, x*y + x/z = {x}*{y} + {x}/{z} = {expected}"
    );
    // Each task of the array step has its own artifact.
    let whole = artifact(&sandbox, &format!("{id}/divide/0"), dir.path()).await;
    assert_eq!(read_number(&whole, "part"), (x / z).trunc());

    // An array step needs a task index.
    let out = drover(
        &sandbox,
        &["artifacts", "get", &format!("{id}/divide"), "-o", "-"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        text(&out.stderr).contains("array of 2 tasks") && text(&out.stderr).contains("/divide/0"),
        "{}",
        both(&out)
    );

    // The sum job links back to its run; its log shows the arithmetic.
    let sum_job = step(&run, "sum").jobs[0].job_id.clone();
    let out = drover(&sandbox, &["show", &sum_job]).await;
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("Workflow:") && l.contains(&id) && l.contains("step sum")),
        "{}",
        both(&out)
    );
    let out = drover(&sandbox, &["logs", &sum_job]).await;
    assert!(text(&out.stdout).contains("x*y + x/z = "), "{}", both(&out));

    // The run in people's formats.
    let out = drover(&sandbox, &["show", &id]).await;
    assert!(out.status.success(), "{}", both(&out));
    let shown = text(&out.stdout);
    assert!(shown.starts_with("Run:"), "{shown}");
    assert!(
        shown.contains(&sum_job) && shown.contains("divide[1]"),
        "{shown}"
    );
    let out = drover(&sandbox, &["runs"]).await;
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("calc") && l.contains("5/5")),
        "{}",
        both(&out)
    );
}

/// The examples name `busybox:stable`; this machine pulls no image, so the
/// Docker runs use the locally built busybox image instead.
fn example_with_test_image(name: &str, image: &str, dir: &Path) -> String {
    let text = std::fs::read_to_string(example(name)).unwrap();
    assert!(text.contains("image: busybox:stable"), "{name}");
    write_workflow(
        dir,
        name,
        &text.replace("image: busybox:stable", &format!("image: {image}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calc_and_fanout_examples_run_in_containers_with_the_docker_runtime() {
    let image = drover_agent::runtime::docker::test_image::ensure_on_local_engine()
        .await
        .expect("a Docker Engine and the test image");
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    sandbox.agent_prefix = "workflows-docker".into();
    sandbox
        .add_agent_env(&[("DROVER_RUNTIME".to_string(), "docker".to_string())])
        .await;
    let dir = tempfile::tempdir().unwrap();

    let calc = example_with_test_image("calc.yaml", &image, dir.path());
    let out = drover(&sandbox, &["--json", "run", &calc]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let run: WorkflowRun = serde_json::from_slice(&out.stdout).unwrap();
    let generated = artifact(&sandbox, &format!("{}/generate", run.id), dir.path()).await;
    let (x, y, z) = (
        read_number(&generated, "x"),
        read_number(&generated, "y"),
        read_number(&generated, "z"),
    );
    let sum = artifact(&sandbox, &format!("{}/sum", run.id), dir.path()).await;
    let result = read_number(&sum, "result");
    assert!((result - (x * y + x / z)).abs() < 1e-5, "{result}");

    let fanout = example_with_test_image("fanout.yaml", &image, dir.path());
    let out = drover(&sandbox, &["--json", "run", &fanout]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let run: WorkflowRun = serde_json::from_slice(&out.stdout).unwrap();
    let gathered = artifact(&sandbox, &format!("{}/gather", run.id), dir.path()).await;
    assert_eq!(
        std::fs::read_to_string(gathered.join("indices"))
            .unwrap()
            .trim(),
        "0 1 2 3 4 5 6 7"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_example_gathers_all_eight_indices_exactly_once() {
    let sandbox = Sandbox::start(2, CoordinatorSettings::default()).await;
    let out = drover(&sandbox, &["--json", "run", &example("fanout.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let run: WorkflowRun =
        serde_json::from_slice(&out.stdout).expect("run --json prints the final run");
    assert_eq!(run.state, RunState::Succeeded, "{run:#?}");
    let scatter = step(&run, "scatter");
    let mut indices: Vec<u32> = scatter
        .jobs
        .iter()
        .map(|t| {
            assert_eq!(t.state, JobState::Succeeded, "{t:?}");
            t.task_index.expect("array tasks have an index")
        })
        .collect();
    indices.sort();
    assert_eq!(indices, (0..8).collect::<Vec<_>>());
    assert_eq!(step(&run, "gather").state, "SUCCEEDED");

    let dir = tempfile::tempdir().unwrap();
    let gathered = artifact(&sandbox, &format!("{}/gather", run.id), dir.path()).await;
    let seen = std::fs::read_to_string(gathered.join("indices")).unwrap();
    let mut seen: Vec<u32> = seen
        .split_whitespace()
        .map(|i| i.parse().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>(), "each index once");
    let three = artifact(&sandbox, &format!("{}/scatter/3", run.id), dir.path()).await;
    assert_eq!(read_number(&three, "index"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_example_fails_dependents_and_runs_the_independent_branch() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let out = drover(&sandbox, &["run", &example("failing.yaml")]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let summary = text(&out.stdout);
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("TOTAL") && l.contains("FAILED")),
        "{}",
        both(&out)
    );
    assert!(summary.contains("Not succeeded:"), "{}", both(&out));
    assert!(summary.contains(DEPENDENCY_FAILED), "{}", both(&out));

    let id = runs(&sandbox).await.runs[0].id.clone();
    let run = show_run(&sandbox, &id).await;
    assert_eq!(run.state, RunState::Failed);
    let build = step(&run, "build");
    assert_eq!(build.state, "FAILED");
    assert_eq!(build.jobs[0].state, JobState::Failed);
    assert_eq!(build.jobs[0].exit_code, Some(3));
    for name in ["test", "publish"] {
        let dependent = step(&run, name);
        assert_eq!(dependent.state, "FAILED", "{dependent:?}");
        for task in &dependent.jobs {
            assert_eq!(task.state, JobState::Failed, "{task:?}");
            let reason = task.reason.as_deref().unwrap_or_default();
            assert!(reason.starts_with(DEPENDENCY_FAILED), "{name}: {reason:?}");
            assert_eq!(task.attempt, 0, "{name} never ran: {task:?}");
        }
    }
    for name in ["prepare", "lint"] {
        assert_eq!(step(&run, name).state, "SUCCEEDED", "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_run_is_cancelled_with_drover_cancel() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_workflow(
        dir.path(),
        "slow.yaml",
        "\
name: slow
steps:
  - name: wait
    image: drover-test-busybox:1
    command: [sh, -c, 'echo waiting; sleep 120']
  - name: wide
    image: drover-test-busybox:1
    array: 2
    command: [sh, -c, 'sleep 120']
  - name: after
    image: drover-test-busybox:1
    depends_on: [wait, wide]
    command: [sh, -c, 'echo never']
",
    );
    let out = drover(&sandbox, &["--json", "run", "--detach", &file]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let created: WorkflowRun =
        serde_json::from_slice(&out.stdout).expect("run --detach --json prints the created run");
    assert_eq!(created.state, RunState::Running);
    assert_eq!(created.steps.len(), 3);
    let id = created.id.clone();

    let client = &sandbox.client;
    let id_ref = id.as_str();
    wait_until(
        "the wait step to run",
        Duration::from_secs(30),
        || async move {
            let run = client.get_workflow(id_ref).await.ok()?;
            (step(&run, "wait").state == "RUNNING").then_some(())
        },
    )
    .await;

    let out = drover(&sandbox, &["cancel", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(text(&out.stdout).contains(&id), "{}", both(&out));

    let run = wait_until(
        "the run to end cancelled",
        Duration::from_secs(60),
        || async move {
            let run = client.get_workflow(id_ref).await.ok()?;
            run.state.is_terminal().then_some(run)
        },
    )
    .await;
    assert_eq!(run.state, RunState::Cancelled, "{run:#?}");
    for s in &run.steps {
        for task in &s.jobs {
            assert!(task.state.is_terminal(), "{}: {task:?}", s.name);
            assert_ne!(task.state, JobState::Succeeded, "{}: {task:?}", s.name);
        }
    }
    let out = drover(&sandbox, &["show", &id]).await;
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("CANCELLED")),
        "{}",
        both(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_watching_and_leaves_the_run_going() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_workflow(
        dir.path(),
        "long.yaml",
        "\
name: long
steps:
  - name: wait
    image: drover-test-busybox:1
    command: [sh, -c, 'sleep 120']
",
    );
    let mut child = drover_command(&sandbox, &["run", &file])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running drover");
    // The first progress line names the run: it is being watched.
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(COMMAND_LIMIT, stderr.next_line())
        .await
        .expect("a progress line")
        .unwrap()
        .expect("a progress line");
    let id = first
        .strip_prefix("run ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    while let Ok(Some(line)) = stderr.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = tokio::time::timeout(COMMAND_LIMIT, child.wait())
        .await
        .expect("drover exits after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains(&format!("drover show {id}")), "{rest}");
    // The run goes on.
    let run = show_run(&sandbox, &id).await;
    assert_eq!(run.state, RunState::Running);
    assert!(!run.cancel_requested);
    let out = drover(&sandbox, &["cancel", &id]).await;
    assert!(out.status.success(), "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workflows_exit_2_naming_the_problem_and_create_nothing() {
    let sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();

    // A cycle: the coordinator refuses it, naming it.
    let cycle = write_workflow(
        dir.path(),
        "cycle.yaml",
        "\
name: cycle
steps:
  - name: a
    image: drover-test-busybox:1
    command: [sh, -c, 'true']
  - name: b
    image: drover-test-busybox:1
    depends_on: [a, c]
    command: [sh, -c, 'true']
  - name: c
    image: drover-test-busybox:1
    depends_on: [b]
    command: [sh, -c, 'true']
",
    );
    let out = drover(&sandbox, &["run", &cycle]).await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cycle.yaml"), "{stderr}");
    assert!(stderr.contains("cycle"), "{stderr}");
    assert!(
        stderr.contains("b -> c -> b") || stderr.contains("c -> b -> c"),
        "{stderr}"
    );

    // An unknown dependency: the field names the step and the entry.
    let unknown = write_workflow(
        dir.path(),
        "unknown.yaml",
        "\
name: unknown
steps:
  - name: a
    command: [sh, -c, 'true']
  - name: b
    depends_on: [nope]
    command: [sh, -c, 'true']
",
    );
    let out = drover(&sandbox, &["run", &unknown]).await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        text(&out.stderr).contains("steps[1].depends_on[0]"),
        "{}",
        both(&out)
    );

    // YAML syntax: the file and line, before anything is sent.
    let syntax = write_workflow(
        dir.path(),
        "syntax.yaml",
        "name: syntax\nsteps:\n  - name: a\n    command: [sh, -c, 'true'\n",
    );
    let out = drover(&sandbox, &["run", &syntax]).await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{syntax}:")) && stderr.contains("not valid YAML"),
        "{}",
        both(&out)
    );

    let listed = runs(&sandbox).await;
    assert!(listed.runs.is_empty(), "no run was created: {listed:?}");

    // Ids that are neither a job nor a run.
    let out = drover(&sandbox, &["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        text(&out.stderr).contains("no job or workflow run"),
        "{}",
        both(&out)
    );
}

/// `drover …` in `dir`, finding the coordinator the way a user does: through
/// the `.drover/cli.toml` that `drover dev` wrote there.
async fn drover_in(dir: &Path, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(binary("drover"))
        .args(args)
        .current_dir(dir)
        .env_remove("DROVER_ADDR")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CONFIG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(COMMAND_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("drover {args:?} did not finish within {COMMAND_LIMIT:?}"))
        .expect("running drover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_under_drover_dev_as_the_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    let _dev = tokio::process::Command::new(binary("drover"))
        .args(["dev", "--agents", "2"])
        .current_dir(dir.path())
        .env_remove("DROVER_ADDR")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting drover dev");
    let config = dir.path().join(".drover/cli.toml");
    wait_until("drover dev is up", Duration::from_secs(60), || async {
        (config.exists() && drover_in(dir.path(), &["runs"]).await.status.success()).then_some(())
    })
    .await;

    let out = drover_in(dir.path(), &["run", &example("calc.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let id = {
        let out = drover_in(dir.path(), &["--json", "runs"]).await;
        let list: RunList = serde_json::from_slice(&out.stdout).expect("a RunList");
        list.runs[0].id.clone()
    };
    let into = tempfile::tempdir().unwrap();
    let mut values = Vec::new();
    for (target, file) in [
        ("generate", "x"),
        ("generate", "y"),
        ("generate", "z"),
        ("sum", "result"),
    ] {
        let dest = into.path().join(target);
        if !dest.exists() {
            let out = drover_in(
                dir.path(),
                &[
                    "artifacts",
                    "get",
                    &format!("{id}/{target}"),
                    "-x",
                    dest.to_str().unwrap(),
                ],
            )
            .await;
            assert!(out.status.success(), "{}", both(&out));
        }
        values.push(read_number(&dest, file));
    }
    let [x, y, z, result] = values[..] else {
        unreachable!()
    };
    assert!(
        (result - (x * y + x / z)).abs() < 1e-5,
        "{result} vs {x}*{y} + {x}/{z}"
    );

    let out = drover_in(dir.path(), &["run", &example("fanout.yaml")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let out = drover_in(dir.path(), &["run", &example("failing.yaml")]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        text(&out.stdout).contains(DEPENDENCY_FAILED),
        "{}",
        both(&out)
    );
}
