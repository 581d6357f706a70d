//! The agent on AWS, end to end: real coordinator and agent processes, the
//! agent's real AWS SDK calls against moto (with `tests/moto/server.py`
//! filling its Auto Scaling gaps), and emulators for IMDSv2 and the ECS task
//! metadata endpoint. Tests assert behaviour, never timings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use drover_proto::model::{Agent, AgentState, JobSpec, JobState};
use drover_tests::aws::{Group, Moto};
use drover_tests::ecs_metadata::{EcsMetadata, Task};
use drover_tests::imds::{Identity, Imds};
use drover_tests::{wait_until, CoordinatorSettings, Sandbox};

const PATIENCE: Duration = Duration::from_secs(60);

fn sh(script: &str) -> JobSpec {
    let mut spec = JobSpec::command(["sh", "-c", script]);
    spec.retry.max_attempts = 1;
    spec
}

/// A job that is interrupted on its first attempt (it waits for SIGTERM) and
/// succeeds at once on the next, wherever that runs.
fn long_then_quick(marks: &std::path::Path, name: &str) -> JobSpec {
    let mark = marks.join(name);
    let mark = mark.display();
    sh(&format!(
        "if [ -e {mark} ]; then echo second-attempt; exit 0; fi; touch {mark}; \
         trap 'echo got-term; exit 143' TERM; echo waiting; \
         i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    ))
}

/// Environment of an EC2 agent that reads `imds` and calls `moto`.
fn ec2_env(moto: &Moto, imds: &Imds, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = moto
        .agent_env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    for (k, v) in [
        ("DROVER_PLATFORM", "ec2"),
        ("DROVER_IMDS_ENDPOINT", imds.endpoint.as_str()),
        ("DROVER_PLATFORM_POLL_MS", "200"),
        ("DROVER_PROTECTION_DEBOUNCE_MS", "1000"),
        ("DROVER_IDLE_TIMEOUT_MS", "1500"),
        ("RUST_LOG", "warn,drover_agent=info"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

async fn agent(sandbox: &Sandbox, agent_id: &str) -> Agent {
    sandbox.wait_agent_live(agent_id).await
}

async fn wait_exit(sandbox: &mut Sandbox, index: usize) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = sandbox.agents[index].exited() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {} did not exit",
            sandbox.agents[index].agent_id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Samples an agent's `/health` until dropped: (HTTP status, state, reason).
struct HealthProbe {
    seen: Arc<Mutex<Vec<(u16, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthProbe {
    fn start(url: String) -> HealthProbe {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                if let Ok(resp) = http.get(&url).send().await {
                    let status = resp.status().as_u16();
                    if let Ok(body) = resp.json::<serde_json::Value>().await {
                        let field = |k: &str| body[k].as_str().unwrap_or("").to_string();
                        sink.lock()
                            .unwrap()
                            .push((status, field("state"), field("reason")));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        HealthProbe { seen, task }
    }

    /// Everything seen from the first answer in `state` on.
    fn since_first(&self, state: &str) -> Vec<(u16, String, String)> {
        let seen = self.seen.lock().unwrap();
        let start = seen
            .iter()
            .position(|(_, s, _)| s == state)
            .unwrap_or_else(|| panic!("/health never said {state}: {seen:?}"));
        seen[start..].to_vec()
    }
}

impl Drop for HealthProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_moto() -> Moto {
    Moto::start()
        .await
        .expect("moto (run scripts/test.sh once to install it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_agent_in_an_asg_terminates_its_instance_and_desired_capacity_drops() {
    let moto = start_moto().await;
    let instances = moto
        .create_group(&Group::new("workers", 0, 3, 2))
        .await
        .unwrap();
    let instance = instances[0].clone();
    // No instance metadata tags: the agent finds its group through
    // DescribeAutoScalingInstances.
    let imds = Imds::start(Identity::new(&instance)).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox.add_agent_env(&ec2_env(&moto, &imds, &[])).await;
    let id = sandbox.agents[index].agent_id.clone();

    let registered = agent(&sandbox, &id).await;
    let labels = &registered.labels;
    assert_eq!(labels["platform"], "ec2", "{labels:?}");
    assert_eq!(labels["instance_id"], instance);
    assert_eq!(labels["instance_type"], "m5.large");
    assert_eq!(labels["az"], "us-east-1a");
    assert_eq!(labels["region"], "us-east-1");
    assert_eq!(labels["spot"], "false");
    assert_eq!(labels["asg"], "workers");
    assert_eq!(labels["arch"], std::env::consts::ARCH);

    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");
    let (left, desired) = moto.group_state("workers").await.unwrap();
    assert_eq!(desired, 1, "desired capacity dropped by one");
    assert!(!left.contains(&instance), "{left:?}");
    assert_eq!(moto.ec2_state(&instance).await.unwrap(), "terminated");
    let calls = moto
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .await
        .unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].params["InstanceId"], instance);
    assert_eq!(calls[0].params["ShouldDecrementDesiredCapacity"], "true");
    // It left the coordinator before terminating.
    let agents = sandbox.client.list_agents().await.unwrap().agents;
    assert!(agents
        .iter()
        .filter(|a| a.agent_id == id)
        .all(|a| a.state == AgentState::Gone));
    assert_eq!(imds.unauthorized(), 0, "every IMDS read carried a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_min_size_the_agent_stays_registered_and_keeps_working() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("pinned", 1, 2, 1))
        .await
        .unwrap()[0]
        .clone();
    let mut identity = Identity::new(&instance);
    identity.asg_tag = Some("pinned".into());
    let imds = Imds::start(identity).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[("DROVER_IDLE_TIMEOUT_MS", "1000")],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();

    let moto_ref = &moto;
    let refused = wait_until("a refused self-termination", PATIENCE, || async move {
        let calls = moto_ref
            .calls_of("TerminateInstanceInAutoScalingGroup")
            .await
            .ok()?;
        calls.into_iter().find(|c| c.status == 400)
    })
    .await;
    assert_eq!(refused.params["ShouldDecrementDesiredCapacity"], "true");
    assert!(sandbox.agents[index].exited().is_none(), "still running");
    agent(&sandbox, &id).await;

    // It serves again: a job submitted now runs on it.
    let job = sandbox
        .client
        .submit_one(sh("echo still-here"))
        .await
        .unwrap();
    let done = sandbox
        .wait_job(&job, "succeeded", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.agent_id.as_deref(), Some(id.as_str()));

    // And tries again after another idle period, still refused.
    wait_until("a second try", PATIENCE, || async move {
        let calls = moto_ref
            .calls_of("TerminateInstanceInAutoScalingGroup")
            .await
            .ok()?;
        (calls.len() >= 2).then_some(())
    })
    .await;
    let (instances, desired) = moto.group_state("pinned").await.unwrap();
    assert_eq!((instances, desired), (vec![instance.clone()], 1));
    assert_eq!(moto.ec2_state(&instance).await.unwrap(), "running");
    assert!(sandbox.agents[index].exited().is_none());
    agent(&sandbox, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_termination_is_retried_and_a_call_that_keeps_failing_keeps_serving() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("throttled", 0, 2, 1))
        .await
        .unwrap()[0]
        .clone();
    // Five refusals: the first idle period's attempts all fail.
    moto.fault(
        "TerminateInstanceInAutoScalingGroup",
        400,
        "Throttling",
        "Rate exceeded",
        5,
    )
    .await
    .unwrap();
    let imds = Imds::start(Identity::new(&instance)).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[("DROVER_IDLE_TIMEOUT_MS", "1000")],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();

    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");
    let calls = moto
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .await
        .unwrap();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 400, 400, 400, 400, 200], "{calls:?}");
    // Between the two idle periods it registered again.
    let sessions = sandbox
        .client
        .list_agents()
        .await
        .unwrap()
        .agents
        .into_iter()
        .filter(|a| a.agent_id == id)
        .count();
    assert!(sessions >= 2, "{sessions} session(s)");
    assert_eq!(moto.group_state("throttled").await.unwrap().1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_protects_and_idle_unprotects_with_one_call_per_transition() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("protected", 0, 2, 1))
        .await
        .unwrap()[0]
        .clone();
    let imds = Imds::start(Identity::new(&instance)).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[
                ("DROVER_IDLE_TERMINATE", "false"),
                ("DROVER_MAX_JOBS", "1"),
                ("DROVER_PROTECTION_DEBOUNCE_MS", "1500"),
            ],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    let health = sandbox.health_url(&id).await;

    // Three jobs back to back on one slot: short gaps between them.
    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(
            sandbox
                .client
                .submit_one(sh(&format!("sleep 0.5; echo job-{i}")))
                .await
                .unwrap(),
        );
    }
    let moto_ref = &moto;
    let instance_ref = instance.as_str();
    wait_until("the instance to be protected", PATIENCE, || async move {
        moto_ref
            .instance(instance_ref)
            .await
            .ok()
            .flatten()
            .filter(|i| i.protected)
    })
    .await;
    for job in &jobs {
        let done = sandbox
            .wait_job(job, "succeeded", PATIENCE, |j| j.state.is_terminal())
            .await;
        assert_eq!(done.state, JobState::Succeeded);
    }
    wait_until(
        "the idle instance to be unprotected",
        PATIENCE,
        || async move {
            moto_ref
                .instance(instance_ref)
                .await
                .ok()
                .flatten()
                .filter(|i| !i.protected)
        },
    )
    .await;
    let calls = moto.calls_of("SetInstanceProtection").await.unwrap();
    let values: Vec<&str> = calls
        .iter()
        .map(|c| c.params["ProtectedFromScaleIn"].as_str())
        .collect();
    assert_eq!(values, ["true", "false"], "{calls:?}");
    assert!(calls
        .iter()
        .all(|c| c.params["InstanceIds.member.1"] == instance));
    // The agent counts a call once its answer is back.
    let metrics_url = health.replace("/health", "/metrics");
    let metrics_url = metrics_url.as_str();
    wait_until("the agent to count both calls", PATIENCE, || async move {
        let text = reqwest::get(metrics_url).await.ok()?.text().await.ok()?;
        text.contains("drover_agent_aws_calls_total{op=\"SetInstanceProtection\",result=\"ok\"} 2")
            .then_some(())
    })
    .await;
    assert!(sandbox.agents[index].exited().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_lets_short_jobs_finish_and_requeues_the_rest_on_the_infra_budget() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("spot", 0, 2, 1))
        .await
        .unwrap()[0]
        .clone();
    let mut identity = Identity::new(&instance);
    identity.spot = true;
    let imds = Imds::start(identity).await;
    let marks = tempfile::tempdir().unwrap();
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[
                ("DROVER_IDLE_TERMINATE", "false"),
                ("DROVER_INTERRUPT_MARGIN_MS", "3000"),
            ],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    assert_eq!(agent(&sandbox, &id).await.labels["spot"], "true");
    let health = HealthProbe::start(sandbox.health_url(&id).await);

    let short = sandbox
        .client
        .submit_one(sh("sleep 1; echo short-done"))
        .await
        .unwrap();
    let long = sandbox
        .client
        .submit_one(long_then_quick(marks.path(), "long"))
        .await
        .unwrap();
    for job in [&short, &long] {
        sandbox
            .wait_job(job, "running", PATIENCE, |j| j.state == JobState::Running)
            .await;
    }
    // Reclaimed in 6 s: jobs may run for 3 more.
    imds.set_spot_interruption(SystemTime::now() + Duration::from_secs(6));

    let done = sandbox
        .wait_job(&short, "finished", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let requeued = sandbox
        .wait_job(&long, "requeued", PATIENCE, |j| j.state == JobState::Queued)
        .await;
    assert_eq!(
        (requeued.failures, requeued.infra_retries),
        (0, 1),
        "{requeued:?}"
    );
    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");
    let during = health.since_first("draining");
    assert!(
        during.iter().all(|(code, _, _)| *code == 503),
        "/health was not 503 throughout the drain: {during:?}"
    );
    assert!(
        during.iter().any(|(_, _, reason)| reason == "spot"),
        "{during:?}"
    );

    // Another agent picks it up; the user's max_attempts (1) was not spent.
    let other = sandbox.add_agent(&[]).await;
    let other_id = sandbox.agents[other].agent_id.clone();
    let done = sandbox
        .wait_job(&long, "finished", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.agent_id.as_deref(), Some(other_id.as_str()));
    assert_eq!((done.attempt, done.failures, done.infra_retries), (2, 0, 1));
    let events = sandbox.client.job_events(&long).await.unwrap().events;
    assert!(
        events.iter().any(|e| e.reason.contains("spot")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_hook_gets_heartbeats_and_is_completed_after_the_last_job() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("hooked", 0, 3, 2).with_terminating_hook("drover-drain"))
        .await
        .unwrap()[0]
        .clone();
    let imds = Imds::start(Identity::new(&instance)).await;
    imds.follow_moto(&moto.endpoint);
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[
                ("DROVER_IDLE_TERMINATE", "false"),
                ("DROVER_LIFECYCLE_HOOK", "drover-drain"),
                ("DROVER_LIFECYCLE_HEARTBEAT_MS", "500"),
            ],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    let health = HealthProbe::start(sandbox.health_url(&id).await);
    let job = sandbox
        .client
        .submit_one(sh("sleep 3; echo finished"))
        .await
        .unwrap();
    sandbox
        .wait_job(&job, "running", PATIENCE, |j| j.state == JobState::Running)
        .await;

    // An operator (or an instance refresh) terminates the busy instance.
    moto.autoscaling()
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&instance)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .unwrap();
    assert_eq!(
        moto.instance(&instance)
            .await
            .unwrap()
            .unwrap()
            .lifecycle_state,
        "Terminating:Wait"
    );

    let done = sandbox
        .wait_job(&job, "finished", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");

    let heartbeats = moto
        .calls_of("RecordLifecycleActionHeartbeat")
        .await
        .unwrap();
    let completes = moto.calls_of("CompleteLifecycleAction").await.unwrap();
    assert!(!heartbeats.is_empty(), "no heartbeat while the job ran");
    assert!(heartbeats.iter().all(|c| c.status == 200), "{heartbeats:?}");
    assert_eq!(completes.len(), 1, "{completes:?}");
    let complete = &completes[0];
    assert_eq!(complete.status, 200);
    assert_eq!(complete.params["LifecycleActionResult"], "CONTINUE");
    assert_eq!(complete.params["LifecycleHookName"], "drover-drain");
    assert!(
        complete.time_ms >= done.finished_at_ms.unwrap(),
        "completed before the last job finished"
    );
    assert!(heartbeats.iter().all(|h| h.time_ms <= complete.time_ms));
    assert_eq!(moto.ec2_state(&instance).await.unwrap(), "terminated");
    let during = health.since_first("draining");
    assert!(during.iter().all(|(code, _, _)| *code == 503), "{during:?}");
    assert!(
        during.iter().any(|(_, _, reason)| reason == "lifecycle"),
        "{during:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_termination_with_a_lifecycle_hook_completes_the_action_at_once() {
    let moto = start_moto().await;
    let mut group = Group::new("hooked-idle", 0, 2, 1).with_terminating_hook("drover-drain");
    // Were the action left open, the instance would wait this long.
    group.hook_timeout_secs = 3_600;
    let instance = moto.create_group(&group).await.unwrap()[0].clone();
    let imds = Imds::start(Identity::new(&instance)).await;
    imds.follow_moto(&moto.endpoint);
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[("DROVER_LIFECYCLE_HOOK", "drover-drain")],
        ))
        .await;
    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");
    let terminate = moto
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .await
        .unwrap();
    assert_eq!(terminate.len(), 1);
    let completes = moto.calls_of("CompleteLifecycleAction").await.unwrap();
    assert_eq!(completes.len(), 1, "{completes:?}");
    assert_eq!(completes[0].status, 200);
    assert!(moto.instance(&instance).await.unwrap().is_none());
    assert_eq!(moto.ec2_state(&instance).await.unwrap(), "terminated");
    assert_eq!(moto.group_state("hooked-idle").await.unwrap().1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_recommendation_stops_claiming_and_the_instance_ends_after_its_jobs() {
    let moto = start_moto().await;
    let instance = moto
        .create_group(&Group::new("rebalance", 0, 2, 1))
        .await
        .unwrap()[0]
        .clone();
    let mut identity = Identity::new(&instance);
    identity.spot = true;
    let imds = Imds::start(identity).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&ec2_env(
            &moto,
            &imds,
            &[("DROVER_IDLE_TIMEOUT_MS", "600000")],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    let health = HealthProbe::start(sandbox.health_url(&id).await);
    let running = sandbox
        .client
        .submit_one(sh("sleep 2; echo done"))
        .await
        .unwrap();
    sandbox
        .wait_job(&running, "running", PATIENCE, |j| {
            j.state == JobState::Running
        })
        .await;
    imds.set_rebalance_recommendation();
    let health_ref = &health;
    wait_until("a rebalance drain", PATIENCE, || async move {
        health_ref
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|(_, _, r)| r == "rebalance")
            .then_some(())
    })
    .await;
    let later = sandbox.client.submit_one(sh("echo later")).await.unwrap();
    let done = sandbox
        .wait_job(&running, "finished", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded);
    let status = wait_exit(&mut sandbox, index).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        sandbox.job(&later).await.state,
        JobState::Queued,
        "a draining agent claimed new work"
    );
    assert_eq!(moto.group_state("rebalance").await.unwrap().1, 0);
    assert_eq!(moto.ec2_state(&instance).await.unwrap(), "terminated");
}

/// Two IMDS endpoints that do not answer: a loopback port nothing listens on
/// (connection refused) and one that accepts connections and never answers
/// (like IMDS behind a hop limit of 1, which drops the token's answer).
async fn dead_imds_endpoints() -> (Vec<String>, tokio::net::TcpListener) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoints = vec![
        format!("http://{closed}"),
        format!("http://{}", silent.local_addr().unwrap()),
    ];
    (endpoints, silent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_ec2_without_imds_exits_non_zero_naming_the_setting_and_the_fix() {
    let sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let (endpoints, _silent) = dead_imds_endpoints().await;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let env: Vec<(String, String)> = [
            ("DROVER_PLATFORM", "ec2"),
            ("DROVER_IMDS_ENDPOINT", endpoint.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut command = sandbox.agent_command(&format!("ec2-{i}"), &env);
        command.stderr(std::process::Stdio::piped());
        let out = tokio::time::timeout(PATIENCE, command.output())
            .await
            .unwrap_or_else(|_| panic!("the agent did not exit with IMDS at {endpoint}"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{endpoint}: {stderr}");
        for part in [
            "platform = \"ec2\"",
            "DROVER_PLATFORM",
            &format!("IMDSv2) at {endpoint} did not answer"),
            "set platform = \"local\"",
            "enable IMDSv2",
            "hop limit of 2",
            "DROVER_IMDS_ENDPOINT",
        ] {
            assert!(stderr.contains(part), "{part:?} missing from:\n{stderr}");
        }
    }
    // Never silently local: no agent ever registered.
    let agents = sandbox.client.list_agents().await.unwrap().agents;
    assert!(agents.is_empty(), "{agents:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_detection_without_imds_falls_back_to_local() {
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let (endpoints, _silent) = dead_imds_endpoints().await;
    for endpoint in &endpoints {
        // An overridden endpoint makes `auto` ask IMDS even off EC2.
        let index = sandbox
            .add_agent(&[
                ("DROVER_PLATFORM", "auto"),
                ("DROVER_IMDS_ENDPOINT", endpoint),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ])
            .await;
        let id = sandbox.agents[index].agent_id.clone();
        let labels = agent(&sandbox, &id).await.labels;
        assert_eq!(labels["platform"], "local", "{endpoint}: {labels:?}");
        assert!(!labels.contains_key("instance_id"), "{labels:?}");
    }
}

fn fargate_env(ecs: &EcsMetadata, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        // auto: the ECS variable makes it fargate.
        ("DROVER_PLATFORM", "auto"),
        ("ECS_CONTAINER_METADATA_URI_V4", ecs.uri.as_str()),
        ("RUST_LOG", "warn,drover_agent=info"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fargate_agent_exits_zero_after_its_idle_timeout() {
    let task = Task::default();
    let ecs = EcsMetadata::start(task.clone()).await;
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&fargate_env(&ecs, &[("DROVER_IDLE_TIMEOUT_MS", "1500")]))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    let labels = agent(&sandbox, &id).await.labels;
    assert_eq!(labels["platform"], "fargate", "{labels:?}");
    assert_eq!(labels["task_arn"], task.task_arn);
    assert_eq!(labels["cluster"], task.cluster);
    assert_eq!(labels["az"], task.az);
    let status = wait_exit(&mut sandbox, index).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fargate_agent_drains_on_sigterm_within_its_stop_timeout() {
    let ecs = EcsMetadata::start(Task::default()).await;
    let marks = tempfile::tempdir().unwrap();
    let mut sandbox = Sandbox::start(0, CoordinatorSettings::default()).await;
    let index = sandbox
        .add_agent_env(&fargate_env(
            &ecs,
            &[
                ("DROVER_IDLE_TERMINATE", "false"),
                ("DROVER_STOP_TIMEOUT_MS", "6000"),
                ("DROVER_INTERRUPT_MARGIN_MS", "3000"),
            ],
        ))
        .await;
    let id = sandbox.agents[index].agent_id.clone();
    let health = HealthProbe::start(sandbox.health_url(&id).await);
    let short = sandbox
        .client
        .submit_one(sh("sleep 1; echo short-done"))
        .await
        .unwrap();
    let long = sandbox
        .client
        .submit_one(long_then_quick(marks.path(), "long"))
        .await
        .unwrap();
    for job in [&short, &long] {
        sandbox
            .wait_job(job, "running", PATIENCE, |j| j.state == JobState::Running)
            .await;
    }
    sandbox.agents[index].signal(nix::sys::signal::Signal::SIGTERM);

    let status = wait_exit(&mut sandbox, index).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(sandbox.job(&short).await.state, JobState::Succeeded);
    let requeued = sandbox.job(&long).await;
    assert_eq!(requeued.state, JobState::Queued, "{requeued:?}");
    assert_eq!((requeued.failures, requeued.infra_retries), (0, 1));
    let during = health.since_first("draining");
    assert!(during.iter().all(|(code, _, _)| *code == 503), "{during:?}");
    assert!(
        during.iter().any(|(_, _, reason)| reason == "shutdown"),
        "{during:?}"
    );
    sandbox.add_agent(&[]).await;
    let done = sandbox
        .wait_job(&long, "finished", PATIENCE, |j| j.state.is_terminal())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
}
