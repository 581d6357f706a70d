//! End to end, with a coordinator and agents running as real processes from
//! the built binaries, on loopback ports.

use std::collections::HashSet;
use std::time::Duration;

use drover_proto::model::{JobSpec, JobState, SubmitRequest};
use drover_proto::v1;
use drover_tests::{wait_until, CoordinatorSettings, Sandbox, JOIN_TOKEN};

fn sh(script: &str) -> JobSpec {
    JobSpec::command(["sh", "-c", script])
}

async fn submit(sandbox: &Sandbox, spec: JobSpec) -> String {
    sandbox.client.submit_one(spec).await.expect("submit")
}

async fn logs(sandbox: &Sandbox, id: &str, attempt: Option<u64>) -> String {
    String::from_utf8_lossy(&sandbox.client.read_logs(id, attempt).await.expect("logs"))
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_all_succeed_on_two_agents() {
    let sandbox = Sandbox::start(2, CoordinatorSettings::default()).await;
    let specs: Vec<JobSpec> = (0..200)
        .map(|i| {
            let mut spec = sh(&format!("echo job-{i}"));
            spec.name = format!("bulk-{i}");
            spec
        })
        .collect();
    let submitted = sandbox
        .client
        .submit(&SubmitRequest::Batch { jobs: specs })
        .await
        .expect("batch submit");
    assert_eq!(submitted.jobs.len(), 200);
    let client = &sandbox.client;
    wait_until(
        "200 jobs to succeed",
        Duration::from_secs(120),
        || async move {
            let jobs = client.list_all_jobs(&Default::default()).await.ok()?;
            (jobs.len() == 200 && jobs.iter().all(|j| j.state == JobState::Succeeded)).then_some(())
        },
    )
    .await;
    let jobs = client.list_all_jobs(&Default::default()).await.unwrap();
    let agents: HashSet<_> = jobs.iter().filter_map(|j| j.agent_id.clone()).collect();
    assert_eq!(agents.len(), 2, "both agents took work");
    assert!(jobs
        .iter()
        .all(|j| j.attempt == 1 && j.exit_code == Some(0)));
    // Output arrived, in full, for a sample.
    let sample = jobs.iter().find(|j| j.spec.name == "bulk-17").unwrap();
    assert_eq!(logs(&sandbox, &sample.id, None).await, "job-17\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_job_is_requeued_and_completes_on_the_other_agent() {
    let mut sandbox = Sandbox::start(2, CoordinatorSettings::default()).await;
    let mut spec = sh("echo started; sleep 2; echo finished");
    spec.retry.max_attempts = 1;
    let id = submit(&sandbox, spec).await;
    let running = sandbox
        .wait_job(&id, "running", Duration::from_secs(20), |j| {
            j.state == JobState::Running
        })
        .await;
    let victim = running.agent_id.clone().unwrap();
    let index = sandbox
        .agents
        .iter()
        .position(|a| a.agent_id == victim)
        .unwrap();
    sandbox.agents[index].kill().await;
    let done = sandbox
        .wait_job(
            &id,
            "succeeded after requeue",
            Duration::from_secs(60),
            |j| j.state.is_terminal(),
        )
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_ne!(
        done.agent_id.as_deref(),
        Some(victim.as_str()),
        "completed on the other agent"
    );
    assert_eq!(done.attempt, 2);
    assert_eq!(
        (done.failures, done.infra_retries),
        (0, 1),
        "the loss spent the infra budget, not max_attempts"
    );
    let events = sandbox.client.job_events(&id).await.unwrap().events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.state == JobState::Succeeded)
            .count(),
        1
    );
    let requeue = events
        .iter()
        .find(|e| e.state == JobState::Queued && e.attempt == 1)
        .expect("a requeue event for attempt 1");
    assert!(
        requeue.reason.contains("session expired"),
        "{}",
        requeue.reason
    );
    assert!(logs(&sandbox, &id, Some(2)).await.contains("finished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_job_reaches_the_process() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let id = submit(
        &sandbox,
        sh("trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.1; done"),
    )
    .await;
    let sandbox_ref = &sandbox;
    let id_ref = id.as_str();
    wait_until(
        "the job to print ready",
        Duration::from_secs(20),
        || async move {
            logs(sandbox_ref, id_ref, None)
                .await
                .contains("ready")
                .then_some(())
        },
    )
    .await;
    let job = sandbox.client.cancel_job(&id).await.unwrap();
    assert!(job.cancel_requested);
    let done = sandbox
        .wait_job(&id, "cancelled", Duration::from_secs(20), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(done.state, JobState::Cancelled);
    let output = logs(&sandbox, &id, None).await;
    assert!(
        output.contains("got-term"),
        "SIGTERM reached the job: {output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_on_the_same_store_loses_no_job() {
    let mut sandbox = Sandbox::start(
        2,
        CoordinatorSettings {
            session_ttl_ms: 6_000,
            ..Default::default()
        },
    )
    .await;
    let specs: Vec<JobSpec> = (0..30)
        .map(|i| sh(&format!("sleep 0.2; echo {i}")))
        .collect();
    sandbox
        .client
        .submit(&SubmitRequest::Batch { jobs: specs })
        .await
        .unwrap();
    let client = &sandbox.client;
    wait_until(
        "some jobs to finish",
        Duration::from_secs(30),
        || async move {
            let jobs = client.list_all_jobs(&Default::default()).await.ok()?;
            (jobs
                .iter()
                .filter(|j| j.state == JobState::Succeeded)
                .count()
                >= 3)
                .then_some(())
        },
    )
    .await;
    sandbox.restart_coordinator().await;
    let client = &sandbox.client;
    wait_until(
        "all 30 jobs to succeed after the restart",
        Duration::from_secs(90),
        || async move {
            let jobs = client.list_all_jobs(&Default::default()).await.ok()?;
            (jobs.len() == 30 && jobs.iter().all(|j| j.state == JobState::Succeeded)).then_some(())
        },
    )
    .await;
    // The agents came back to the restarted coordinator.
    for agent in ["agent-0", "agent-1"] {
        sandbox.wait_agent_live(agent).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_complete_from_an_old_attempt_is_rejected() {
    let sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let id = submit(&sandbox, sh("true")).await;
    let mut grpc = v1::agent_service_client::AgentServiceClient::connect(format!(
        "http://{}",
        sandbox.coordinator.grpc_addr
    ))
    .await
    .unwrap();
    let register = |name: &str| v1::RegisterRequest {
        join_token: JOIN_TOKEN.into(),
        agent: Some(v1::AgentInfo {
            agent_id: name.into(),
            pool: "default".into(),
            capacity: Some(v1::Resources {
                cpu_millis: 1000,
                memory_mib: 1024,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    fn authed<T>(token: &str, body: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }
    let old = grpc.register(register("old")).await.unwrap().into_inner();
    let claim = |s: &v1::RegisterResponse| {
        authed(
            &s.session_token,
            v1::ClaimRequest {
                session_id: s.session_id.clone(),
                free: Some(v1::Resources {
                    cpu_millis: 1000,
                    memory_mib: 1024,
                    ..Default::default()
                }),
                max_jobs: 1,
                wait_ms: 2000,
            },
        )
    };
    let first = grpc
        .claim(claim(&old))
        .await
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    let first_lease = first.lease.unwrap();
    assert_eq!(
        (first_lease.job_id.as_str(), first_lease.attempt),
        (id.as_str(), 1)
    );
    // The old session leaves without finishing: the job is requeued.
    grpc.leave(authed(
        &old.session_token,
        v1::LeaveRequest {
            session_id: old.session_id.clone(),
        },
    ))
    .await
    .unwrap();
    let new = grpc.register(register("new")).await.unwrap().into_inner();
    let second = grpc
        .claim(claim(&new))
        .await
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    let second_lease = second.lease.unwrap();
    assert_eq!(second_lease.attempt, 2);
    // A late Complete for attempt 1, even with the new session's token, is fenced.
    let stale = grpc
        .complete(authed(
            &new.session_token,
            v1::CompleteRequest {
                lease: Some(v1::LeaseRef {
                    session_id: new.session_id.clone(),
                    ..first_lease.clone()
                }),
                outcome: v1::Outcome::Succeeded as i32,
                exit_code: Some(0),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert!(
        stale.message().contains("lease lost"),
        "{}",
        stale.message()
    );
    let job = sandbox.job(&id).await;
    assert_eq!((job.state, job.attempt), (JobState::Leased, 2));
    // The current attempt completes, exactly once, idempotently.
    for _ in 0..2 {
        let done = grpc
            .complete(authed(
                &new.session_token,
                v1::CompleteRequest {
                    lease: Some(second_lease.clone()),
                    outcome: v1::Outcome::Succeeded as i32,
                    exit_code: Some(0),
                    reason: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(done.state, "SUCCEEDED");
    }
    let events = sandbox.client.job_events(&id).await.unwrap().events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.state == JobState::Succeeded)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_during_a_drain_and_the_agent_exits_after_its_last_job() {
    let mut sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let id = submit(&sandbox, sh("echo working; sleep 2; echo done")).await;
    sandbox
        .wait_job(&id, "running", Duration::from_secs(20), |j| {
            j.state == JobState::Running
        })
        .await;
    let agent = sandbox.wait_agent_live("agent-0").await;
    let health = format!("http://{}/health", agent.health_addr);
    let probe = |url: String| async move {
        let resp = reqwest::get(&url).await.expect("health probe");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    };
    assert_eq!(probe(health.clone()).await.0, 200, "busy agent is healthy");
    // An operator drains it through the coordinator.
    sandbox.client.drain_agent("agent-0").await.unwrap();
    let (_, body) = wait_until("/health to read 503", Duration::from_secs(20), || {
        let probe = probe(health.clone());
        async move {
            let (status, body) = probe.await;
            (status == 503).then_some(((), body))
        }
    })
    .await;
    assert!(body.contains("draining"), "{body}");
    // Nothing new is claimed while draining.
    let later = submit(&sandbox, sh("echo later")).await;
    let done = sandbox
        .wait_job(&id, "finished", Duration::from_secs(20), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(done.state, JobState::Succeeded, "the running job finished");
    let agent_proc = &mut sandbox.agents[0];
    let status = wait_until("the agent to exit", Duration::from_secs(20), || {
        let exited = agent_proc.exited();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status}");
    assert_eq!(sandbox.job(&later).await.state, JobState::Queued);
}

/// What a process-runtime job without inputs finds on disk: it runs in its
/// scratch dir, its input dir is the shared empty read-only one, and its
/// attempt dir holds only its output and scratch dirs (no lease file: the
/// process runtime never adopts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_job_runs_in_its_scratch_dir_with_a_lean_attempt_dir() {
    let sandbox = Sandbox::start(1, CoordinatorSettings::default()).await;
    let id = submit(
        &sandbox,
        sh(r#"echo "cwd=$(pwd)"
echo "home=$HOME"
echo "scratch=$DROVER_SCRATCH_DIR"
echo "attempt=$(ls -A "$(dirname "$DROVER_OUTPUT_DIR")" | tr '\n' ' ')"
echo "input=$(ls -A "$DROVER_INPUT_DIR" | tr '\n' ' ')"
echo "input_mode=$(stat -c %a "$DROVER_INPUT_DIR")""#),
    )
    .await;
    let job = sandbox
        .wait_job(&id, "to finish", Duration::from_secs(60), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let out = logs(&sandbox, &id, None).await;
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {out}"))
            .trim()
            .to_string()
    };
    let scratch = field("scratch");
    assert!(scratch.ends_with("/scratch"), "{out}");
    assert_eq!(field("cwd"), scratch, "{out}");
    assert_eq!(field("home"), scratch, "{out}");
    assert_eq!(field("attempt"), "output scratch", "{out}");
    assert_eq!(field("input"), "", "{out}");
    assert_eq!(field("input_mode"), "555", "{out}");
}
