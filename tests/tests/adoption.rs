//! An agent restarted while its Docker jobs run: within the session's TTL it
//! adopts their containers; after it, the orphans are killed and the
//! requeued attempt runs instead; past its fence deadline, once the host's
//! watchdog (`drover-agent fence-check`) killed them, it hands them back.
//! Real coordinator and agent processes, the real Docker Engine.

use std::time::Duration;

use drover_agent::runtime::docker::test_image;
use drover_proto::model::{JobSpec, JobState};
use drover_tests::{CoordinatorSettings, Sandbox};

fn docker_env() -> Vec<(String, String)> {
    vec![("DROVER_RUNTIME".to_string(), "docker".to_string())]
}

/// Ids of containers (any state) carrying `label`.
fn containers_with(label: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "-q", "--filter", &format!("label={label}")])
        .output()
        .expect("the docker CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

async fn submit(sandbox: &Sandbox, image: &str, script: &str) -> String {
    let mut spec = JobSpec::command(["sh", "-c", script]);
    spec.image = image.to_string();
    spec.retry.max_attempts = 1;
    sandbox.client.submit_one(spec).await.unwrap()
}

async fn wait_log(sandbox: &Sandbox, id: &str, needle: &str) {
    drover_tests::wait_until(
        &format!("{needle:?} in the log of {id}"),
        Duration::from_secs(30),
        || async {
            let log = sandbox.client.read_logs(id, None).await.ok()?;
            String::from_utf8_lossy(&log).contains(needle).then_some(())
        },
    )
    .await;
}

/// The test image and a coordinator whose agents (named `prefix-N`) run
/// the Docker runtime; none started yet.
async fn docker_sandbox(prefix: &str, settings: CoordinatorSettings) -> (String, Sandbox) {
    let image = test_image::ensure_on_local_engine().await.unwrap();
    let mut sandbox = Sandbox::start(0, settings).await;
    sandbox.agent_prefix = prefix.into();
    sandbox.add_agent_env(&docker_env()).await;
    (image, sandbox)
}

/// Heartbeats every 500 ms and a 30 s TTL: a restart comes back in time.
fn within_ttl() -> CoordinatorSettings {
    CoordinatorSettings {
        heartbeat_interval_ms: 500,
        session_ttl_ms: 30_000,
        ..CoordinatorSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_within_the_ttl_the_agent_adopts_the_container_and_completes_it_once() {
    let (image, mut sandbox) = docker_sandbox("adopter", within_ttl()).await;
    // The job waits for a file the test creates after the restart, so it is
    // surely still running when the agent comes back.
    let id = submit(
        &sandbox,
        &image,
        "echo before; while [ ! -e /scratch/go ]; do sleep 0.1; done; echo after; exit 4",
    )
    .await;
    wait_log(&sandbox, &id, "before").await;
    sandbox.agents[0].kill().await;
    let label = format!("drover.job={id}");
    assert_eq!(
        containers_with(&label).len(),
        1,
        "the container outlives its agent"
    );

    sandbox.restart_agent(0, &docker_env()).await;
    let job = sandbox.job(&id).await;
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Running, 1),
        "adopted: still the first attempt"
    );
    // Let the job finish: /scratch is the attempt's own dir on the host.
    let scratch = sandbox
        .dir
        .path()
        .join("adopter-0/attempts")
        .join(format!("{id}-1"))
        .join("scratch/go");
    std::fs::write(&scratch, "").expect("the attempt's scratch dir was kept");
    let done = sandbox
        .wait_job(&id, "finished", Duration::from_secs(30), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert_eq!(
        done.exit_code,
        Some(4),
        "the adopted container's own exit code"
    );
    assert_eq!((done.attempt, done.infra_retries), (1, 0), "{done:?}");
    let log = sandbox.client.read_logs(&id, None).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&log),
        "before\nafter\n",
        "output re-attached without duplicates or gaps"
    );
    drover_tests::wait_until("the container removed", Duration::from_secs(10), || async {
        containers_with(&label).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_after_the_ttl_the_agent_kills_the_orphan_and_runs_the_requeued_attempt() {
    let (image, mut sandbox) =
        docker_sandbox("orphan-killer", CoordinatorSettings::default()).await;
    let id = submit(
        &sandbox,
        &image,
        r#"echo "attempt $DROVER_ATTEMPT"; if [ "$DROVER_ATTEMPT" = 1 ]; then sleep 600; fi"#,
    )
    .await;
    wait_log(&sandbox, &id, "attempt 1").await;
    sandbox.agents[0].kill().await;
    // The session expires; the reaper requeues the job (attempt 2 next).
    sandbox
        .wait_job(&id, "requeued", Duration::from_secs(30), |j| {
            j.state == JobState::Queued
        })
        .await;
    assert_eq!(
        containers_with(&format!("drover.job={id}")).len(),
        1,
        "the orphan still runs while no agent is there"
    );
    sandbox.restart_agent(0, &docker_env()).await;
    let done = sandbox
        .wait_job(&id, "succeeded", Duration::from_secs(60), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!((done.attempt, done.infra_retries), (2, 1), "{done:?}");
    drover_tests::wait_until("no container left", Duration::from_secs(10), || async {
        let left: Vec<String> = containers_with(&format!("drover.job={id}"));
        left.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_watchdog_fenced_a_restarted_agent_hands_the_job_back_instead_of_adopting_it() {
    let (image, mut sandbox) = docker_sandbox("watched", within_ttl()).await;
    let id = submit(
        &sandbox,
        &image,
        r#"echo "attempt $DROVER_ATTEMPT"; if [ "$DROVER_ATTEMPT" = 1 ]; then sleep 600; fi"#,
    )
    .await;
    wait_log(&sandbox, &id, "attempt 1").await;
    sandbox.agents[0].kill().await;

    // As if the agent had stayed away past its fence deadline: the host's
    // watchdog, with the agent's own settings, kills the container.
    let agent_id = sandbox.agents[0].agent_id.clone();
    let deadline_file = sandbox.dir.path().join(&agent_id).join("fence-deadline");
    std::fs::write(&deadline_file, "1").unwrap();
    let out = sandbox
        .agent_command(&agent_id, &docker_env())
        .args(["fence-check", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcome"], "fenced", "{report}");
    assert_eq!(report["containers"][0]["job"], id.as_str(), "{report}");

    // Back within the TTL, the session resumes; the killed container is not
    // taken for the job's own exit: the attempt is requeued (infra budget).
    sandbox.restart_agent(0, &docker_env()).await;
    let done = sandbox
        .wait_job(&id, "succeeded", Duration::from_secs(60), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(
        (done.attempt, done.infra_retries, done.failures),
        (2, 1, 0),
        "{done:?}"
    );
    drover_tests::wait_until("no container left", Duration::from_secs(10), || async {
        containers_with(&format!("drover.job={id}"))
            .is_empty()
            .then_some(())
    })
    .await;
}
