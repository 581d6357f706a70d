//! The agent against the real coordinator, in-process on loopback: jobs go in
//! through the coordinator's HTTP API and every outcome is read back from it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_agent::config::RuntimeChoice;
use drover_agent::{Agent, AgentConfig};
use drover_coordinator::{Config, Server};
use drover_proto::model::{
    Agent as AgentRecord, AgentList, AgentState, EnvValue, EventList, Job, JobSpec, JobState,
    SubmitRequest, SubmitResponse,
};
use reqwest::StatusCode;
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `probe` until it yields a value; panics naming `what` after [`PATIENCE`].
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Agent and coordinator logs, shown by the test harness when a test fails.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "drover_agent=info,drover_coordinator=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Settings that make sessions, the reaper and kills fast enough for tests.
/// Heartbeats stay at 500 ms: the coordinator requeues a lease missing from
/// two heartbeats, and under load a Claim answer can take longer than two
/// much shorter intervals to reach the agent.
fn fast(config: &mut Config) {
    config.heartbeat_interval_ms = 500;
    config.session_ttl_ms = 10_000;
    config.clock_skew_ms = 100;
    config.reaper_interval_ms = 100;
    // Generous: the cancel test needs its TERM trap to run on a loaded host.
    config.kill_grace_ms = 5_000;
}

/// A real coordinator and an HTTP client holding its admin token.
struct Coordinator {
    server: Server,
    config: Config,
    http: reqwest::Client,
}

impl Coordinator {
    async fn start(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Coordinator {
        init_logs();
        let mut config = Config::dev(data_dir);
        fast(&mut config);
        tweak(&mut config);
        Self::start_with(config).await
    }

    async fn start_with(config: Config) -> Coordinator {
        let server = Server::start(config.clone()).await.unwrap();
        Coordinator {
            server,
            config,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the coordinator; returns its config with the bound ports pinned,
    /// so a coordinator started from it comes back where agents look for it.
    async fn stop(self) -> Config {
        let mut config = self.config;
        config.grpc_addr = self.server.grpc_addr();
        config.http_addr = self.server.http_addr();
        self.server.shutdown().await.unwrap();
        config
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.http_addr())
    }

    /// An agent config for this coordinator: fast claims, fixed capacity.
    fn agent_config(&self, data_dir: &Path) -> AgentConfig {
        AgentConfig {
            coordinator: format!("http://{}", self.server.grpc_addr()),
            join_token: self.config.join_tokens[0].token.clone(),
            agent_id: "agent-under-test".into(),
            data_dir: data_dir.to_path_buf(),
            health_addr: "127.0.0.1:0".parse().unwrap(),
            max_jobs: 4,
            cpu_millis: Some(4000),
            memory_mib: Some(4096),
            claim_wait_ms: 500,
            // The jobs here are shell scripts, not images; never pick Docker
            // because the host happens to have it.
            runtime: RuntimeChoice::Process,
            ..AgentConfig::default()
        }
    }

    fn call(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.config.api_tokens[0].token)
    }

    async fn submit(&self, spec: JobSpec) -> String {
        let resp = self
            .call(reqwest::Method::POST, "/v1/jobs")
            .json(&SubmitRequest::One(Box::new(spec)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: SubmitResponse = resp.json().await.unwrap();
        body.jobs[0].id.clone()
    }

    async fn job(&self, id: &str) -> Job {
        let resp = self
            .call(reqwest::Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// Waits until the job satisfies `done`, and returns it.
    async fn wait_job(&self, id: &str, what: &str, done: impl Fn(&Job) -> bool) -> Job {
        wait_for(&format!("job {id}: {what}"), || async {
            let job = self.job(id).await;
            done(&job).then_some(job)
        })
        .await
    }

    async fn wait_terminal(&self, id: &str) -> Job {
        self.wait_job(id, "a terminal state", |j| j.state.is_terminal())
            .await
    }

    /// The latest attempt's log.
    async fn logs(&self, id: &str) -> String {
        let resp = self
            .call(reqwest::Method::GET, &format!("/v1/jobs/{id}/logs"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }

    async fn wait_log(&self, id: &str, needle: &str) -> String {
        wait_for(&format!("{needle:?} in the log of job {id}"), || async {
            let log = self.logs(id).await;
            log.contains(needle).then_some(log)
        })
        .await
    }

    async fn events(&self, id: &str) -> EventList {
        let resp = self
            .call(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    async fn post(&self, path: &str) -> (StatusCode, String) {
        let resp = self.call(reqwest::Method::POST, path).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    /// Every session the coordinator lists for `agent_id`.
    async fn sessions_of(&self, agent_id: &str) -> Vec<AgentRecord> {
        let resp = self
            .call(reqwest::Method::GET, "/v1/agents")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let list: AgentList = resp.json().await.unwrap();
        list.agents
            .into_iter()
            .filter(|a| a.agent_id == agent_id)
            .collect()
    }

    /// Waits until the agent holds a live session; returns it.
    async fn wait_active(&self, agent_id: &str) -> AgentRecord {
        wait_for(&format!("an active session of {agent_id}"), || async {
            self.sessions_of(agent_id)
                .await
                .into_iter()
                .find(|a| a.state == AgentState::Active)
        })
        .await
    }

    async fn assert_all_sessions_gone(&self, agent_id: &str) {
        let sessions = self.sessions_of(agent_id).await;
        assert!(!sessions.is_empty(), "{agent_id} never registered");
        for s in &sessions {
            assert_eq!(s.state, AgentState::Gone, "{s:?}");
        }
    }
}

fn sh(script: &str) -> JobSpec {
    JobSpec::command(["sh", "-c", script])
}

fn with_env(mut spec: JobSpec, key: &str, value: &str) -> JobSpec {
    spec.env
        .insert(key.into(), EnvValue::Plain(value.to_string()));
    spec
}

/// The sum of `drover_agent_jobs_finished_total` over all outcomes.
fn finished_jobs(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("drover_agent_jobs_finished_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A request to the agent's health server: (status, body).
async fn agent_http(addr: SocketAddr, method: reqwest::Method, path: &str) -> (StatusCode, String) {
    let resp = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_outcomes_exit_codes_and_output_reach_the_coordinator() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let agent = Agent::start(coordinator.agent_config(dirs.1.path()))
        .await
        .unwrap();

    let failing = coordinator
        .submit(sh("echo out; echo err >&2; exit 3"))
        .await;
    let greeting = coordinator
        .submit(with_env(sh("echo \"$GREETING\""), "GREETING", "hi"))
        .await;
    let missing = coordinator
        .submit(JobSpec::command(["drover-no-such-program"]))
        .await;

    let session = coordinator.wait_active("agent-under-test").await;
    assert_eq!(
        session.labels.get("platform").map(String::as_str),
        Some("local")
    );
    assert!(session.runtime.starts_with("process"), "{session:?}");

    let job = coordinator.wait_terminal(&failing).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert_eq!(job.exit_code, Some(3), "{job:?}");
    assert_eq!(job.reason.as_deref(), Some("exit code 3"));
    let log = coordinator.logs(&failing).await;
    assert!(log.contains("out\n") && log.contains("err\n"), "{log:?}");
    let events = coordinator.events(&failing).await.events;
    assert!(
        events.iter().any(|e| e.state == JobState::Running),
        "the agent reported the job started: {events:?}"
    );

    let job = coordinator.wait_terminal(&greeting).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.exit_code, Some(0));
    assert_eq!(coordinator.logs(&greeting).await, "hi\n");

    let job = coordinator.wait_terminal(&missing).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let reason = job.reason.unwrap_or_default();
    assert!(
        reason.contains("command not found: drover-no-such-program"),
        "{reason}"
    );

    // The agent counts every attempt it ran, under its outcome.
    let addr = agent.health_addr();
    let metrics = wait_for("three finished jobs in the agent's metrics", || async {
        let (code, body) = agent_http(addr, reqwest::Method::GET, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        (finished_jobs(&body) >= 3).then_some(body)
    })
    .await;
    assert!(
        metrics.contains("drover_agent_jobs_finished_total{outcome=\"failed\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("drover_agent_jobs_finished_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    agent.drain("test");
    agent.wait().await.unwrap();
    coordinator
        .assert_all_sessions_gone("agent-under-test")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_the_coordinator_stops_the_running_job_as_cancelled() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let agent = Agent::start(coordinator.agent_config(dirs.1.path()))
        .await
        .unwrap();
    let id = coordinator
        .submit(sh(
            "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.05; done",
        ))
        .await;
    coordinator.wait_log(&id, "ready").await;
    assert_eq!(coordinator.job(&id).await.state, JobState::Running);

    let (code, body) = coordinator.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let job = coordinator.wait_terminal(&id).await;
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    assert_eq!(job.exit_code, Some(143));
    let log = coordinator.logs(&id).await;
    assert!(log.contains("got-term"), "SIGTERM reached the job: {log:?}");

    agent.drain("test");
    agent.wait().await.unwrap();
}

/// Runs a job that waits for a stop file, starts a drain with `begin`, and
/// checks: `/health` 503 "draining" (reason operator), `/health/live` 200,
/// the job finishes SUCCEEDED, the agent leaves and `wait()` returns.
async fn drain_lets_the_running_job_finish(begin: impl AsyncFnOnce(&Coordinator, SocketAddr)) {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let agent = Agent::start(coordinator.agent_config(dirs.1.path()))
        .await
        .unwrap();
    let addr = agent.health_addr();
    let (code, body) = agent_http(addr, reqwest::Method::GET, "/health").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(body.contains("\"state\":\"idle\""), "{body}");

    let stop_file = dirs.1.path().join("stop");
    let id = coordinator
        .submit(with_env(
            sh("echo ready; while [ ! -f \"$STOP\" ]; do sleep 0.05; done"),
            "STOP",
            stop_file.to_str().unwrap(),
        ))
        .await;
    coordinator.wait_log(&id, "ready").await;

    begin(&coordinator, addr).await;
    let body = wait_for("/health to answer 503 draining", || async {
        let (code, body) = agent_http(addr, reqwest::Method::GET, "/health").await;
        (code == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
    })
    .await;
    assert!(
        body.contains("\"state\":\"draining\"") && body.contains("\"reason\":\"operator\""),
        "{body}"
    );
    let (code, _) = agent_http(addr, reqwest::Method::GET, "/health/live").await;
    assert_eq!(code, StatusCode::OK, "liveness is not readiness");
    assert_eq!(
        coordinator.job(&id).await.state,
        JobState::Running,
        "a drain does not stop running jobs"
    );

    std::fs::write(&stop_file, "").unwrap();
    agent.wait().await.unwrap();
    let job = coordinator.job(&id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    coordinator
        .assert_all_sessions_gone("agent-under-test")
        .await;
    assert!(
        !dirs.1.path().join("session.json").exists(),
        "a left session is not resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drain_through_the_coordinator_lets_jobs_finish_then_leaves() {
    drain_lets_the_running_job_finish(async |coordinator, _| {
        let session = coordinator.wait_active("agent-under-test").await;
        let (code, body) = coordinator
            .post(&format!("/v1/agents/{}/drain", session.agent_id))
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_the_health_port_lets_jobs_finish_then_leaves() {
    drain_lets_the_running_job_finish(async |_, addr| {
        let (code, body) = agent_http(addr, reqwest::Method::POST, "/drain").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_drain_deadline_interrupts_the_job_and_the_coordinator_requeues_it() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let mut config = coordinator.agent_config(dirs.1.path());
    config.drain_timeout_ms = 100;
    let agent = Agent::start(config).await.unwrap();
    let id = coordinator.submit(sh("echo ready; sleep 1000")).await;
    coordinator.wait_log(&id, "ready").await;

    agent.drain("test");
    agent.wait().await.unwrap();
    let job = coordinator.job(&id).await;
    assert_eq!(job.state, JobState::Queued, "{job:?}");
    assert_eq!(job.infra_retries, 1, "{job:?}");
    assert_eq!(
        job.failures, 0,
        "an interruption is not the job's failure: {job:?}"
    );
    coordinator
        .assert_all_sessions_gone("agent-under-test")
        .await;
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether any process of the group `pgid` is still alive.
fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_coordinator_kills_the_job_before_the_session_expires_and_registers_again() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let ttl_ms = 3_000;
    let coordinator = Coordinator::start(dirs.0.path(), |c| c.session_ttl_ms = ttl_ms).await;
    let agent = Agent::start(coordinator.agent_config(dirs.1.path()))
        .await
        .unwrap();
    let marker = scratch.path().join("finished");
    // Long enough that, without a fence, it would finish (and write the
    // marker) well within the test's patience.
    let id = coordinator
        .submit(with_env(
            sh("echo \"pgid $$\"; sleep 20; touch \"$MARK.$DROVER_ATTEMPT\""),
            "MARK",
            marker.to_str().unwrap(),
        ))
        .await;
    let log = coordinator.wait_log(&id, "\n").await;
    let pgid: i32 = log
        .trim()
        .strip_prefix("pgid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pgid in {log:?}"));
    assert!(group_alive(pgid));
    let old_session = coordinator.wait_active("agent-under-test").await.session_id;
    let fence_file = dirs.1.path().join("fence-deadline");
    wait_for("the fence deadline file", || async {
        fence_file.exists().then_some(())
    })
    .await;

    let config = coordinator.stop().await;
    let stopped_at_ms = unix_ms_now();
    wait_for("the fenced job's processes to be gone", || async {
        (!group_alive(pgid)).then_some(())
    })
    .await;
    assert!(
        !scratch.path().join("finished.1").exists(),
        "the job was killed, not left to finish"
    );
    let (_, metrics) = agent_http(agent.health_addr(), reqwest::Method::GET, "/metrics").await;
    assert!(metrics.contains("drover_agent_fences_total 1"), "{metrics}");
    // The watchdog's deadline, from the last answered heartbeat, falls before
    // the session can have expired on the coordinator.
    let deadline_ms: u64 = std::fs::read_to_string(&fence_file)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        deadline_ms < stopped_at_ms + ttl_ms,
        "fence deadline {deadline_ms} is not before the session's expiry (stopped at {stopped_at_ms} + ttl {ttl_ms})"
    );

    // The coordinator comes back on the same data dir and ports.
    let coordinator = Coordinator::start_with(config).await;
    let new_session = wait_for("a new session", || async {
        coordinator
            .sessions_of("agent-under-test")
            .await
            .into_iter()
            .find(|s| s.state == AgentState::Active && s.session_id != old_session)
    })
    .await;
    wait_for("the new session saved for resume", || async {
        std::fs::read_to_string(dirs.1.path().join("session.json"))
            .unwrap_or_default()
            .contains(&new_session.session_id)
            .then_some(())
    })
    .await;
    // The old session expires on the coordinator, which requeues the fenced
    // attempt on the infra budget: the agent never completed it.
    let job = coordinator
        .wait_job(&id, "the fenced attempt requeued", |j| j.infra_retries >= 1)
        .await;
    assert_eq!(job.failures, 0, "{job:?}");
    let events = coordinator.events(&id).await.events;
    assert!(
        !events
            .iter()
            .any(|e| e.attempt == 1 && e.state.is_terminal()),
        "a fenced attempt is never completed: {events:?}"
    );

    coordinator.server.service().cancel(&id).await.unwrap();
    coordinator.wait_terminal(&id).await;
    agent.drain("test");
    agent.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_join_token_fails_start_with_the_fix() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let mut config = coordinator.agent_config(dirs.1.path());
    config.join_token = "not-the-join-token-0123456789".into();
    let err = Agent::start(config).await.err().expect("start should fail");
    assert!(err.to_string().contains("DROVER_JOIN_TOKEN"), "{err:#}");
    assert!(coordinator.sessions_of("agent-under-test").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_with_exit_when_idle_leaves_and_stops() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let mut config = coordinator.agent_config(dirs.1.path());
    config.exit_when_idle = true;
    // The idle timer starts before registration; leave registration time.
    config.idle_timeout_ms = 1_500;
    let agent = Agent::start(config).await.unwrap();
    // Registration writes the first fence deadline, before any heartbeat.
    let fence_file = drover_agent::session::fence_path(dirs.1.path());
    assert!(fence_file.exists(), "no fence deadline after registering");
    tokio::time::timeout(PATIENCE, agent.wait())
        .await
        .expect("an idle agent stops on its own")
        .unwrap();
    assert!(
        !fence_file.exists(),
        "a clean Leave removes the fence deadline: no job is left to fence"
    );
    coordinator
        .assert_all_sessions_gone("agent-under-test")
        .await;
}

/// A job needing `gpus` GPUs that records which it got (in its log and as a
/// file named after them in `dir`), then waits for `dir/release`.
fn gpu_job(dir: &Path, gpus: u32, model: Option<&str>) -> JobSpec {
    let dir = dir.display();
    let mut spec = sh(&format!(
        "echo \"got=$CUDA_VISIBLE_DEVICES nvidia=$NVIDIA_VISIBLE_DEVICES\"; touch \"{dir}/$CUDA_VISIBLE_DEVICES\"; \
         i=0; while [ ! -e {dir}/release ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done"
    ));
    spec.resources.gpus = gpus;
    spec.resources.gpu_model = model.map(str::to_string);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_jobs_get_disjoint_whole_gpus_and_give_them_back() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let marks = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let mut config = coordinator.agent_config(dirs.1.path());
    config.max_jobs = 8;
    let gpus = drover_agent::gpu::FakeGpus::new(4, "NVIDIA A10G");
    let agent = Agent::start_with_gpus(config, &gpus).await.unwrap();

    let session = coordinator.wait_active("agent-under-test").await;
    assert_eq!(session.labels["gpu_count"], "4", "{session:?}");
    assert_eq!(session.labels["gpu_model"], "NVIDIA A10G", "{session:?}");

    let mut running = Vec::new();
    for model in [None, Some("NVIDIA A10G"), None, None] {
        running.push(coordinator.submit(gpu_job(marks.path(), 1, model)).await);
    }
    let uuids: Vec<String> = {
        let mut got = Vec::new();
        for id in &running {
            let log = coordinator.wait_log(id, "got=").await;
            let uuid = log
                .trim()
                .strip_prefix("got=")
                .and_then(|rest| rest.split_once(' '))
                .map(|(uuid, _)| uuid.to_string())
                .unwrap_or_default();
            assert!(
                log.trim().ends_with(&format!("nvidia={uuid}")),
                "both variables name the same GPU: {log:?}"
            );
            got.push(uuid);
        }
        got.sort();
        got
    };
    assert_eq!(
        uuids,
        ["GPU-fake-0", "GPU-fake-1", "GPU-fake-2", "GPU-fake-3"],
        "four concurrent jobs, four different GPUs"
    );

    // All four GPUs are held: a fifth GPU job and a job for another model wait.
    let fifth = coordinator.submit(gpu_job(marks.path(), 1, None)).await;
    let h100 = coordinator
        .submit(gpu_job(marks.path(), 1, Some("NVIDIA H100")))
        .await;
    let cpu_only = coordinator
        .submit(sh("echo no-gpu=${CUDA_VISIBLE_DEVICES-unset}"))
        .await;
    let job = coordinator.wait_terminal(&cpu_only).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(coordinator.logs(&cpu_only).await, "no-gpu=unset\n");
    assert_eq!(coordinator.job(&fifth).await.state, JobState::Queued);

    // The jobs end; their GPUs go back and the fifth job gets one.
    std::fs::write(marks.path().join("release"), "").unwrap();
    for id in running.iter().chain([&fifth]) {
        let job = coordinator.wait_terminal(id).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
    assert!(coordinator.logs(&fifth).await.starts_with("got=GPU-fake-"));
    assert_eq!(
        coordinator.job(&h100).await.state,
        JobState::Queued,
        "no agent has that model"
    );
    agent.drain("test");
    agent.wait().await.unwrap();
}

/// GET without the API token: a signed URL is its own credential.
async fn fetch(url: &str) -> (StatusCode, Vec<u8>) {
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    (resp.status(), resp.bytes().await.unwrap().to_vec())
}

/// Where a job writes and reads its artifacts in this runtime.
struct ArtifactPaths {
    output: &'static str,
    input: &'static str,
}

/// Job A keeps its output; job B gets it as input `a`; a failed producer's
/// output is kept but cannot feed a consumer; nothing is left on the agent.
async fn artifacts_round_trip(runtime: RuntimeChoice, image: &str, paths: ArtifactPaths) {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let coordinator = Coordinator::start(dirs.0.path(), |_| {}).await;
    let agent = Agent::start(AgentConfig {
        runtime,
        ..coordinator.agent_config(dirs.1.path())
    })
    .await
    .unwrap();
    let ArtifactPaths { output, input } = paths;
    let job = |script: String| {
        let mut spec = sh(&script);
        spec.image = image.to_string();
        spec
    };

    let mut producer = job(format!(
        "mkdir -p {output}/sub && echo 42 > {output}/x && echo deep > {output}/sub/y"
    ));
    producer.outputs = true;
    let producer = coordinator.submit(producer).await;
    let done = coordinator.wait_terminal(&producer).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");

    // The artifact is listed with a signed URL that works without a token.
    let resp = coordinator
        .call(
            reqwest::Method::GET,
            &format!("/v1/jobs/{producer}/artifacts"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let artifact: drover_proto::model::Artifact = resp.json().await.unwrap();
    assert_eq!(
        (artifact.job_id.as_str(), artifact.attempt),
        (producer.as_str(), 1)
    );
    let (status, archive) = fetch(&artifact.url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(archive.len() as u64, artifact.bytes);
    let unpacked = tempfile::tempdir().unwrap();
    let file = unpacked.path().join("a.tar.zst");
    std::fs::write(&file, &archive).unwrap();
    drover_agent::artifacts::unpack(&file, &unpacked.path().join("out")).unwrap();
    assert_eq!(
        std::fs::read_to_string(unpacked.path().join("out/x")).unwrap(),
        "42\n"
    );
    // A tampered signature is refused.
    let (status, _) = fetch(&artifact.url.replace("signature=", "signature=0")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The consumer reads it read-only under its input name.
    let mut consumer = job(format!(
        "cat {input}/a/x {input}/a/sub/y; (echo no > {input}/a/x) 2>/dev/null && echo writable || echo read-only"
    ));
    consumer.inputs = vec![drover_proto::model::InputSpec {
        name: "a".into(),
        job: producer.clone(),
    }];
    let consumer = coordinator.submit(consumer).await;
    let done = coordinator.wait_terminal(&consumer).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let log = coordinator.logs(&consumer).await;
    assert!(log.starts_with("42\ndeep\n"), "{log:?}");
    if runtime == RuntimeChoice::Docker {
        assert!(
            log.ends_with("read-only\n"),
            "/input is mounted read-only: {log:?}"
        );
    }
    let resp = coordinator
        .call(
            reqwest::Method::GET,
            &format!("/v1/jobs/{consumer}/artifacts"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("does not declare outputs"),
        "the 404 says why"
    );

    // A failed job's output is kept (to debug it) but feeds no other job.
    let mut failing = job(format!("echo partial > {output}/p; exit 3"));
    failing.outputs = true;
    let failing = coordinator.submit(failing).await;
    let done = coordinator.wait_terminal(&failing).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let resp = coordinator
        .call(
            reqwest::Method::GET,
            &format!("/v1/jobs/{failing}/artifacts"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the failed attempt's output is kept"
    );
    let mut starved = job("echo should-not-run".into());
    starved.inputs = vec![drover_proto::model::InputSpec {
        name: "p".into(),
        job: failing.clone(),
    }];
    let starved = coordinator.submit(starved).await;
    let done = coordinator.wait_terminal(&starved).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let reason = done.reason.unwrap_or_default();
    assert!(reason.contains("is FAILED, not SUCCEEDED"), "{reason}");
    assert!(
        coordinator.logs(&starved).await.is_empty(),
        "the job never ran"
    );

    agent.drain("test");
    agent.wait().await.unwrap();
    let attempts = dirs.1.path().join("attempts");
    let left: Vec<_> = std::fs::read_dir(&attempts)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "attempt dirs left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_round_trip_with_the_process_runtime() {
    artifacts_round_trip(
        RuntimeChoice::Process,
        "",
        ArtifactPaths {
            output: "$DROVER_OUTPUT_DIR",
            input: "$DROVER_INPUT_DIR",
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_round_trip_with_the_docker_runtime() {
    let image = drover_agent::runtime::docker::test_image::ensure_on_local_engine()
        .await
        .expect("the Docker tests need a Docker Engine");
    artifacts_round_trip(
        RuntimeChoice::Docker,
        &image,
        ArtifactPaths {
            output: "/output",
            input: "/input",
        },
    )
    .await;
}

/// A coordinator and one agent on the Docker runtime, with the locally
/// built test image; the directories (first, so they are dropped last)
/// hold their data.
async fn docker_agent(agent_id: &str) -> ([tempfile::TempDir; 2], String, Coordinator, Agent) {
    let image = drover_agent::runtime::docker::test_image::ensure_on_local_engine()
        .await
        .expect("the Docker tests need a Docker Engine");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let coordinator = Coordinator::start(dirs[0].path(), |_| {}).await;
    let agent = Agent::start(AgentConfig {
        runtime: RuntimeChoice::Docker,
        agent_id: agent_id.into(),
        ..coordinator.agent_config(dirs[1].path())
    })
    .await
    .unwrap();
    (dirs, image, coordinator, agent)
}

/// Prints the job's CFS quota: `-1` (cgroup v1) or `max` (v2) when none.
const PRINT_CPU_QUOTA: &str =
    "if [ -f /sys/fs/cgroup/cpu.max ]; then cut -d' ' -f1 /sys/fs/cgroup/cpu.max; \
    else cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_hard_limit_in_the_job_spec_caps_the_container() {
    let (_dirs, image, coordinator, agent) = docker_agent("cpu-limit-agent").await;
    let job = |hard: bool| {
        let mut spec = sh(PRINT_CPU_QUOTA);
        spec.image = image.clone();
        spec.resources.cpu_millis = 500;
        spec.cpu_hard_limit = hard;
        spec
    };
    let soft = coordinator.submit(job(false)).await;
    let hard = coordinator.submit(job(true)).await;
    for id in [&soft, &hard] {
        let done = coordinator.wait_terminal(id).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    }
    let soft_quota = coordinator.logs(&soft).await;
    assert!(
        soft_quota == "-1\n" || soft_quota == "max\n",
        "no quota: {soft_quota:?}"
    );
    // Half of the default 100 ms period.
    assert_eq!(coordinator.logs(&hard).await, "50000\n");
    agent.drain("test");
    agent.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_spec_pull_policy_reaches_the_docker_runtime() {
    use drover_proto::model::PullPolicy;
    let (_dirs, image, coordinator, agent) = docker_agent("pull-policy-agent").await;
    let job = |policy: PullPolicy| {
        let mut spec = sh("echo ran");
        spec.image = image.clone();
        spec.pull_policy = Some(policy);
        spec
    };
    // The image exists only locally: if-not-present uses it, always must
    // ask its registry, which does not exist.
    let local = coordinator.submit(job(PullPolicy::IfNotPresent)).await;
    let pulled = coordinator.submit(job(PullPolicy::Always)).await;
    let done = coordinator.wait_terminal(&local).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let done = coordinator.wait_terminal(&pulled).await;
    assert_ne!(done.state, JobState::Succeeded, "{done:?}");
    assert!(
        done.reason.as_deref().unwrap_or_default().contains("pull"),
        "the reason names the pull: {done:?}"
    );
    agent.drain("test");
    agent.wait().await.unwrap();
}
