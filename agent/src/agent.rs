//! The agent's lifecycle: register, claim, heartbeat (with self-fencing),
//! commands, drain, leave — and what the platform adds: interruptions that
//! drain with a deadline, scale-in protection while busy, and ending the
//! instance or task when idle (or serving again when the platform refuses).
//! Shared state lives in [`Shared`]; no lock is held across an await.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use drover_proto::v1;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::client::{Auth, Backoff, CallError, Client, CALL_TIMEOUT};
use crate::config::AgentConfig;
use crate::gpu::{GpuInventory, GpuLease, GpuPool, NvmlInventory};
use crate::job;
use crate::metrics::Metrics;
use crate::platform::protection::{Debounce, Step};
use crate::platform::{IdleExit, Notice, Platform, PlatformKind};
use crate::runtime::{Runtime, StopOrder};
use crate::session::{self, unix_ms};
use crate::{health, resources};

/// Where the agent is in its life. Moves forward, except that an idle agent
/// whose platform refused to end it goes from Terminating back to Running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Terminating,
}

pub(crate) type JobKey = (String, u64);

pub(crate) struct JobEntry {
    pub lease: v1::LeaseRef,
    pub resources: v1::Resources,
    pub orders: watch::Sender<Option<StopOrder>>,
    /// The job's GPUs: back in the pool when the entry leaves the table.
    pub _gpus: GpuLease,
}

/// The current session and the token that ends its loops when it is fenced.
#[derive(Clone)]
pub(crate) struct SessionState {
    pub auth: Auth,
    pub generation: u64,
    pub ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// When the Register that opened it was sent: the first fence deadline
    /// counts from here.
    pub registered_at: Instant,
    pub cancel: CancellationToken,
}

pub(crate) struct State {
    pub phase: Phase,
    pub drain_reason: Option<String>,
    /// The ASG is terminating the instance (target lifecycle state
    /// `Terminated`): the drain ends with CompleteLifecycleAction.
    pub lifecycle: bool,
    /// Sends lifecycle heartbeats while jobs run; awaited before completing.
    pub lifecycle_heartbeats: Option<JoinHandle<()>>,
    pub session: Option<SessionState>,
    pub generation: u64,
    pub jobs: HashMap<JobKey, JobEntry>,
    pub last_heartbeat_ok: Option<Instant>,
}

pub(crate) struct Shared {
    pub config: AgentConfig,
    pub capacity: v1::Resources,
    /// Which GPUs are free; the only place GPUs are handed out.
    pub gpus: Arc<GpuPool>,
    pub runtime: Arc<dyn Runtime>,
    /// Finished attempts' directory trees, kept for the next attempts.
    pub dirs: crate::runtime::DirPool,
    pub platform: Arc<dyn Platform>,
    /// Whether an idle agent leaves (and ends its host where it can).
    pub idle_leave: bool,
    pub client: Client,
    pub metrics: Metrics,
    pub started_at: Instant,
    /// The bound health address, advertised at Register.
    pub health_addr: SocketAddr,
    state: Mutex<State>,
    /// Number of jobs; waiters use it for slots, drain and idle.
    pub jobs_count: watch::Sender<usize>,
    /// Cancelled when a drain begins: claiming stops. Replaced when an idle
    /// agent serves again.
    drain: Mutex<CancellationToken>,
    /// When running jobs are stopped (INTERRUPTED) if still running; set
    /// when a drain begins, tightened by a later, more urgent one.
    pub drain_deadline: watch::Sender<Option<Instant>>,
    /// The phase, for loops that wait on it.
    pub phase_watch: watch::Sender<Phase>,
    /// Cancelled when the agent gives up entirely (start aborted).
    pub shutdown: CancellationToken,
    pub heartbeat_now: Notify,
    /// Set at start when a saved session may let the agent adopt what its
    /// earlier run left; cleared by the first registration.
    pub leftovers_pending: std::sync::atomic::AtomicBool,
}

fn key(lease: &v1::LeaseRef) -> JobKey {
    (lease.job_id.clone(), lease.attempt)
}

fn lease_name(lease: &v1::LeaseRef) -> String {
    format!("{}#{}", lease.job_id, lease.attempt)
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.state().phase
    }

    /// The current serving period's drain token.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Begins a drain with the default deadline (`drain_timeout_ms`).
    pub fn begin_drain(&self, reason: &str) {
        self.begin_drain_until(reason, None);
    }

    /// Begins a drain whose running jobs are stopped at `deadline` (at most
    /// `drain_timeout_ms` from now). Idempotent; a drain already under way
    /// only takes a tighter deadline (and its reason: the more urgent one).
    pub fn begin_drain_until(&self, reason: &str, deadline: Option<Instant>) {
        let longest = Instant::now() + Duration::from_millis(self.config.drain_timeout_ms);
        let deadline = deadline.map_or(longest, |d| d.min(longest));
        let mut st = self.state();
        match st.phase {
            Phase::Running => {
                st.phase = Phase::Draining;
                st.drain_reason = Some(reason.to_string());
                self.phase_watch.send_replace(Phase::Draining);
                self.drain_deadline.send_replace(Some(deadline));
                drop(st);
                let within = deadline.saturating_duration_since(Instant::now());
                tracing::info!(
                    reason,
                    "draining: no new jobs; running jobs may finish within {within:?}"
                );
                self.drain_token().cancel();
                self.heartbeat_now.notify_one();
            }
            Phase::Draining if self.drain_deadline.borrow().is_none_or(|d| deadline < d) => {
                st.drain_reason = Some(reason.to_string());
                self.drain_deadline.send_replace(Some(deadline));
                drop(st);
                let within = deadline.saturating_duration_since(Instant::now());
                tracing::info!(
                    reason,
                    "drain deadline moved closer: running jobs stop within {within:?}"
                );
            }
            _ => {}
        }
    }

    /// SIGTERM: on Fargate the task's stop timeout bounds the drain.
    pub fn begin_shutdown_drain(&self) {
        let deadline = (self.platform.kind() == PlatformKind::Fargate).then(|| {
            let stop = Duration::from_millis(self.config.stop_timeout_ms);
            Instant::now()
                + stop.saturating_sub(Duration::from_millis(self.config.interrupt_margin_ms))
        });
        self.begin_drain_until("shutdown", deadline);
    }

    /// After an idle drain the platform would not end: claim again.
    fn resume_serving(&self) {
        let mut st = self.state();
        st.phase = Phase::Running;
        st.drain_reason = None;
        self.phase_watch.send_replace(Phase::Running);
        self.drain_deadline.send_replace(None);
        *self.drain.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
    }

    /// Free resources and free slots, for Claim and `/health`.
    pub fn free(&self) -> (v1::Resources, u32) {
        let st = self.state();
        resources::free(
            &self.capacity,
            self.config.max_jobs,
            st.jobs.values().map(|j| &j.resources),
        )
    }

    pub fn running_leases(&self) -> Vec<v1::LeaseRef> {
        self.state()
            .jobs
            .values()
            .map(|j| j.lease.clone())
            .collect()
    }

    /// Sends a stop order to one job; a milder order never overrides a
    /// harsher one. Unknown leases are ignored (already finished).
    pub fn stop_job(&self, lease: &v1::LeaseRef, order: StopOrder) {
        let st = self.state();
        if let Some(entry) = st.jobs.get(&key(lease)) {
            tracing::info!(job = %lease_name(lease), ?order, "stopping job");
            entry.orders.send_if_modified(|cur| {
                if cur.as_ref().is_none_or(|c| order > *c) {
                    *cur = Some(order.clone());
                    true
                } else {
                    false
                }
            });
        }
    }

    fn stop_all(&self, order: StopOrder) {
        for lease in self.running_leases() {
            self.stop_job(&lease, order.clone());
        }
    }

    /// Self-fence: the session `generation` can no longer be trusted. Kills
    /// every job (SIGKILL, never completed), forgets the session and ends its
    /// loops; the supervisor registers again. No-op for an older generation.
    pub fn fence(&self, generation: u64, why: &str) {
        let mut st = self.state();
        let Some(current) = st.session.as_ref() else {
            return;
        };
        if current.generation != generation {
            return;
        }
        let current = st.session.take().expect("checked above");
        let running = st.jobs.len();
        drop(st);
        tracing::error!(
            session = %current.auth.session_id,
            running,
            "fencing: {why}; killing running jobs and registering again"
        );
        Metrics::inc(&self.metrics.fences);
        current.cancel.cancel();
        self.stop_all(StopOrder::Kill);
        session::forget(&self.config.data_dir);
    }

    fn current_session(&self) -> Option<SessionState> {
        self.state().session.clone()
    }

    fn remove_job(&self, key: &JobKey) {
        let mut st = self.state();
        st.jobs.remove(key);
        let n = st.jobs.len();
        drop(st);
        self.jobs_count.send_replace(n);
    }
}

/// A running agent; see [`Agent::start`].
pub struct Agent {
    shared: Arc<Shared>,
    health_addr: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Cancels everything if `Agent::start` is dropped before it returns.
struct StartGuard(Option<CancellationToken>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

impl Agent {
    /// Binds the health server, registers with the coordinator and starts the
    /// claim/heartbeat loops in the background. Retries while the coordinator
    /// is unreachable; fails at once when it rejects the join token.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let nvml = tokio::task::spawn_blocking(NvmlInventory::probe)
            .await
            .context("the GPU inventory task failed")?;
        Agent::start_with_gpus(config, &nvml).await
    }

    /// [`start`](Self::start) with the GPUs of `inventory` instead of NVML's
    /// (tests, hosts whose GPUs are described another way).
    pub async fn start_with_gpus(
        mut config: AgentConfig,
        inventory: &dyn GpuInventory,
    ) -> anyhow::Result<Agent> {
        config.validate()?;
        let metrics = Metrics::default();
        let platform = crate::platform::detect(&config, metrics.aws_calls.clone())
            .await
            .context("cannot use the configured platform (DROVER_PLATFORM)")?;
        if let Some((cpu_millis, memory_mib)) = platform.capacity_limits() {
            config
                .cpu_millis
                .get_or_insert(cpu_millis.saturating_sub(config.reserve_cpu_millis));
            config
                .memory_mib
                .get_or_insert(memory_mib.saturating_sub(config.reserve_memory_mib));
        }
        let idle_leave = if platform.can_terminate_self() && config.idle_terminate {
            true
        } else {
            config.exit_when_idle
        };
        let gpus = GpuPool::new(inventory.devices());
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create data dir {} — is it writable? (DROVER_DATA_DIR)",
                config.data_dir.display()
            )
        })?;
        let runtime = crate::runtime::select(
            config.runtime,
            &config.data_dir,
            &config.agent_id,
            config.aws_endpoint.as_deref(),
        )
        .await
        .context("cannot use the configured runtime (DROVER_RUNTIME)")?;
        tracing::info!(runtime = %runtime.description(), "runtime ready");
        // With a saved session, what an earlier run left may be adopted:
        // decided once the session is resumed (or found expired).
        let leftovers_pending = session::load(&config.data_dir).is_some();
        if !leftovers_pending {
            clean_leftovers(runtime.as_ref(), &config.data_dir, &[]).await;
        }
        let client = Client::new(&config.coordinator, config.tls_ca_file.as_deref())?;
        let listener = tokio::net::TcpListener::bind(config.health_addr)
            .await
            .with_context(|| {
                format!(
                    "cannot bind the health server to {} — is another agent running? (DROVER_HEALTH_ADDR; port 0 picks a free port)",
                    config.health_addr
                )
            })?;
        let health_addr = listener.local_addr()?;
        let dirs = crate::runtime::DirPool::new(
            job::free_dirs_root(&config.data_dir),
            config.max_jobs as usize,
        );
        let shared = Arc::new(Shared {
            capacity: resources::capacity(&config, &gpus),
            gpus,
            config,
            runtime,
            dirs,
            platform,
            idle_leave,
            client,
            metrics,
            started_at: Instant::now(),
            health_addr,
            state: Mutex::new(State {
                phase: Phase::Running,
                drain_reason: None,
                lifecycle: false,
                lifecycle_heartbeats: None,
                session: None,
                generation: 0,
                jobs: HashMap::new(),
                last_heartbeat_ok: None,
            }),
            jobs_count: watch::Sender::new(0),
            drain: Mutex::new(CancellationToken::new()),
            drain_deadline: watch::Sender::new(None),
            phase_watch: watch::Sender::new(Phase::Running),
            shutdown: CancellationToken::new(),
            heartbeat_now: Notify::new(),
            leftovers_pending: std::sync::atomic::AtomicBool::new(leftovers_pending),
        });
        let mut guard = StartGuard(Some(shared.shutdown.clone()));
        let health_stop = shared.shutdown.child_token();
        let health_task =
            tokio::spawn(health::serve(shared.clone(), listener, health_stop.clone()));
        tracing::info!(
            agent = %shared.config.agent_id,
            pool = %shared.config.pool,
            health = %health_addr,
            cpu_millis = shared.capacity.cpu_millis,
            memory_mib = shared.capacity.memory_mib,
            gpus = shared.capacity.gpus,
            max_jobs = shared.config.max_jobs,
            platform = shared.platform.kind().as_str(),
            idle_leave = shared.idle_leave,
            "agent starting"
        );
        let (first_tx, first_rx) = oneshot::channel();
        let task = tokio::spawn(main_loop(
            shared.clone(),
            first_tx,
            health_stop,
            health_task,
        ));
        match first_rx.await {
            Ok(Ok(())) => {
                guard.0 = None;
                Ok(Agent {
                    shared,
                    health_addr,
                    task,
                })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => match task.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(anyhow::anyhow!("agent stopped before it registered")),
                Err(e) => Err(anyhow::anyhow!("agent task failed: {e}")),
            },
        }
    }

    /// The address the health server actually bound (useful with port 0).
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// Begins a drain (idempotent).
    pub fn drain(&self, reason: &str) {
        self.shared.begin_drain(reason);
    }

    /// Resolves when the agent has stopped (drain finished and Leave sent, or
    /// exit-when-idle).
    pub async fn wait(self) -> anyhow::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("agent task failed: {e}")),
        }
    }
}

/// For main.rs: start, then on `shutdown` drain and wait.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let agent = tokio::select! {
        agent = Agent::start(config) => agent?,
        () = &mut shutdown => {
            tracing::info!("shutdown before the agent registered");
            return Ok(());
        }
    };
    let drain_on_shutdown = {
        let shared = agent.shared.clone();
        async move {
            shutdown.await;
            shared.begin_shutdown_drain();
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        result = agent.wait() => result,
        () = drain_on_shutdown => unreachable!(),
    }
}

/// How often the runtime cleans up after jobs (dangling image layers).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs the runtime's housekeeping at start and then every hour.
async fn housekeeping_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.shutdown.cancelled() => return,
        }
        if let Err(e) = shared.runtime.housekeeping().await {
            tracing::warn!("housekeeping: {e}");
        }
    }
}

async fn main_loop(
    shared: Arc<Shared>,
    first: oneshot::Sender<anyhow::Result<()>>,
    health_stop: CancellationToken,
    health_task: JoinHandle<()>,
) -> anyhow::Result<()> {
    let mut first = Some(first);
    let mut resume = session::load(&shared.config.data_dir);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // Platform loops live as long as the process.
    let mut background = vec![
        tokio::spawn(platform_watch(shared.clone())),
        tokio::spawn(housekeeping_loop(shared.clone())),
    ];
    if shared.platform.has_scale_in_protection() && shared.config.scale_in_protection {
        background.push(tokio::spawn(protection_loop(shared.clone())));
    }
    let stopped = 'serve: loop {
        // One serving period: sessions (a fence registers again) until a
        // drain begins.
        let drain_token = shared.drain_token();
        let mut idle_clock = false;
        loop {
            let registered = tokio::select! {
                r = register(&shared, &mut resume) => r,
                () = drain_token.cancelled() => break,
                () = shared.shutdown.cancelled() => break 'serve false,
            };
            let session = match registered {
                Ok(session) => session,
                Err(e) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(e));
                        break 'serve false;
                    }
                    let delay = backoff.next_delay();
                    tracing::error!("{e:#}; retrying in {delay:?}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = drain_token.cancelled() => break,
                        () = shared.shutdown.cancelled() => break 'serve false,
                    }
                }
            };
            backoff.reset();
            if let Some(tx) = first.take() {
                let _ = tx.send(Ok(()));
            }
            // The idle clock starts once the agent can actually get work.
            if shared.idle_leave && !idle_clock {
                idle_clock = true;
                tokio::spawn(idle_watch(shared.clone(), drain_token.clone()));
            }
            tokio::spawn(claim_loop(
                shared.clone(),
                session.clone(),
                drain_token.clone(),
            ));
            tokio::spawn(heartbeat_loop(shared.clone(), session.clone()));
            tokio::spawn(commands_loop(shared.clone(), session.clone()));
            tokio::select! {
                () = session.cancel.cancelled() => continue,
                () = drain_token.cancelled() => break,
                () = shared.shutdown.cancelled() => break 'serve false,
            }
        }
        drain(&shared).await;
        match after_drain(&shared).await {
            IdleExit::Exit => break true,
            IdleExit::KeepServing(why) => {
                tracing::warn!("{why}");
                shared.resume_serving();
            }
        }
    };
    for task in background {
        task.abort();
    }
    if stopped {
        // Health goes last so probes saw 503 throughout the drain.
        health_stop.cancel();
        let _ = health_task.await;
        tracing::info!("agent stopped");
    }
    Ok(())
}

/// What follows a finished drain (jobs done, Leave sent): the ASG's
/// lifecycle action, ending an idle host, or just exiting.
async fn after_drain(shared: &Arc<Shared>) -> IdleExit {
    let (reason, lifecycle) = {
        let st = shared.state();
        (st.drain_reason.clone().unwrap_or_default(), st.lifecycle)
    };
    if lifecycle {
        // The ASG is terminating this instance and waits for us; no
        // heartbeat may arrive after the completion.
        let heartbeats = shared.state().lifecycle_heartbeats.take();
        if let Some(heartbeats) = heartbeats {
            let _ = heartbeats.await;
        }
        if let Err(e) = shared.platform.complete_lifecycle().await {
            tracing::warn!("{e}; the lifecycle hook's timeout ends the wait instead");
        }
        return IdleExit::Exit;
    }
    let ends_host = shared.platform.can_terminate_self() && shared.config.idle_terminate;
    match reason.as_str() {
        "idle" | "rebalance" if ends_host => shared.platform.terminate_idle().await,
        _ => IdleExit::Exit,
    }
}

/// Registers (resuming the saved session when there is one). Transient
/// failures are retried here, one log line each; the error returned is one
/// that retrying cannot fix (a rejected join token).
async fn register(
    shared: &Arc<Shared>,
    resume: &mut Option<session::SavedSession>,
) -> anyhow::Result<SessionState> {
    let config = &shared.config;
    // Detected labels first; the configured ones override them.
    let mut labels = shared.platform.labels();
    labels.insert("os".into(), std::env::consts::OS.into());
    labels.extend(resources::gpu_labels(&shared.gpus));
    labels.extend(config.labels.clone());
    let agent = v1::AgentInfo {
        agent_id: config.agent_id.clone(),
        pool: config.pool.clone(),
        hostname: crate::config::hostname(),
        labels: labels.into_iter().collect(),
        capacity: Some(shared.capacity.clone()),
        runtime: shared.runtime.description(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        health_addr: shared.health_addr.to_string(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let req = v1::RegisterRequest {
            join_token: config.join_token.clone(),
            agent: Some(agent.clone()),
            resume_session_id: resume
                .as_ref()
                .map(|s| s.session_id.clone())
                .unwrap_or_default(),
            resume_session_token: resume
                .as_ref()
                .map(|s| s.session_token.clone())
                .unwrap_or_default(),
        };
        let sent_at = (Instant::now(), SystemTime::now());
        match shared.client.register(req).await {
            Ok(resp) => {
                let leases = if resp.resumed {
                    resp.leases.clone()
                } else {
                    Vec::new()
                };
                // Read before the new session rewrites it.
                let fence_ahead = earlier_fence_ahead(&config.data_dir);
                let session = adopt_session(shared, resume.take().is_some(), resp, sent_at);
                // Before any claim: what the earlier run left is adopted or
                // cleaned up, so a new job's dirs are never mistaken for it.
                let leftovers = shared
                    .leftovers_pending
                    .swap(false, std::sync::atomic::Ordering::SeqCst);
                take_over(shared, &session, leases, leftovers, fence_ahead).await;
                return Ok(session);
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!("register failed: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Err(e) if resume.is_some() => {
                tracing::warn!("cannot resume the saved session ({e}); registering a new one");
                *resume = None;
                session::forget(&config.data_dir);
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "coordinator at {} rejected the registration of agent {:?} in pool {:?}: {e} — check the join token (DROVER_JOIN_TOKEN) and pool (DROVER_POOL)",
                    shared.client.url(),
                    config.agent_id,
                    config.pool
                ))
            }
        }
    }
}

/// Kills and removes what an earlier run of the agent left, except the
/// attempts in `keep` (adopted).
async fn clean_leftovers(runtime: &dyn Runtime, data_dir: &std::path::Path, keep: &[v1::LeaseRef]) {
    let keys: Vec<crate::runtime::AttemptKey> =
        keep.iter().map(|l| (l.job_id.clone(), l.attempt)).collect();
    match runtime.kill_leftovers(&keys).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!("killed {n} job(s) left running by an earlier agent"),
        Err(e) => tracing::warn!("cannot clean up after an earlier agent: {e}"),
    }
    job::remove_leftover_dirs_except(data_dir, keep).await;
}

/// How far ahead the earlier run's fence deadline must still be for its jobs
/// to be adopted: the new deadline is written well within it, so the
/// watchdog never sees the old one pass.
const ADOPT_FENCE_MARGIN: Duration = Duration::from_secs(1);

/// Whether the fence deadline an earlier run wrote is still ahead. Past it
/// (or with no file: `drover-agent fence-check` removes it once it fenced),
/// the host's watchdog may have killed that run's jobs or be killing them.
fn earlier_fence_ahead(data_dir: &std::path::Path) -> bool {
    let now_ms = unix_ms(SystemTime::now());
    matches!(
        session::read_fence_deadline(data_dir),
        Ok(Some(deadline_ms)) if deadline_ms > now_ms + ADOPT_FENCE_MARGIN.as_millis() as u64
    )
}

/// The leases a resumed session still holds: adopted when this is the
/// agent's first session since it started, the earlier run's fence deadline
/// is still ahead (`fence_ahead`) and the runtime still has the job
/// (docker: its container), else handed back for an infra retry. With
/// `leftovers`, whatever else the earlier run left (containers, processes,
/// attempt dirs) is then killed and removed; a session that was not resumed
/// holds no leases (its jobs were requeued), so everything goes.
async fn take_over(
    shared: &Arc<Shared>,
    session: &SessionState,
    leases: Vec<v1::LeaseRef>,
    leftovers: bool,
    fence_ahead: bool,
) {
    if leftovers && !fence_ahead && !leases.is_empty() {
        tracing::warn!(
            leases = leases.len(),
            "the fence deadline passed while the agent was down: the host's watchdog may have killed its jobs; handing them back instead of adopting them"
        );
    }
    let adopt = leftovers && fence_ahead;
    let mut keep = Vec::new();
    for lease in leases {
        let saved = adopt
            .then(|| job::saved_lease(&shared.config.data_dir, &lease))
            .flatten();
        match saved {
            Some((payload, gpus)) => {
                keep.push(lease.clone());
                accept_lease(
                    shared,
                    session,
                    v1::Lease {
                        lease: Some(lease),
                        job: Some(payload),
                    },
                    Some(gpus),
                );
            }
            None => {
                let shared = shared.clone();
                let auth = session.auth.clone();
                tokio::spawn(async move {
                    job::complete(
                        &shared,
                        &auth,
                        &lease,
                        v1::Outcome::Interrupted,
                        None,
                        "agent restarted and could not adopt the job".to_string(),
                        None,
                    )
                    .await;
                });
            }
        }
    }
    if leftovers {
        clean_leftovers(shared.runtime.as_ref(), &shared.config.data_dir, &keep).await;
    }
}

/// Records the session and its first fence deadline (the file too, before
/// any job is adopted or claimed: the watchdog must not act on an earlier
/// session's deadline while this one runs jobs).
fn adopt_session(
    shared: &Arc<Shared>,
    tried_resume: bool,
    resp: v1::RegisterResponse,
    (sent_at, sent_unix): (Instant, SystemTime),
) -> SessionState {
    Metrics::inc(&shared.metrics.registrations);
    let auth = Auth {
        session_id: resp.session_id.clone(),
        token: resp.session_token.clone(),
    };
    if let Err(e) = session::save(
        &shared.config.data_dir,
        &session::SavedSession {
            session_id: resp.session_id.clone(),
            session_token: resp.session_token.clone(),
        },
    ) {
        tracing::warn!("cannot save the session file (a restart will not resume it): {e}");
    }
    let ttl_ms = if resp.session_ttl_ms == 0 {
        60_000
    } else {
        resp.session_ttl_ms
    };
    let heartbeat_interval_ms = if resp.heartbeat_interval_ms == 0 {
        10_000
    } else {
        resp.heartbeat_interval_ms
    };
    let ttl = Duration::from_millis(ttl_ms);
    let deadline_unix_ms = unix_ms(sent_unix) + (ttl - fence_margin(ttl)).as_millis() as u64;
    if let Err(e) = session::write_fence_deadline(&shared.config.data_dir, deadline_unix_ms) {
        tracing::warn!("cannot write the fence deadline file: {e}");
    }
    let mut st = shared.state();
    st.generation += 1;
    let session = SessionState {
        auth: auth.clone(),
        generation: st.generation,
        ttl_ms,
        heartbeat_interval_ms,
        registered_at: sent_at,
        cancel: shared.shutdown.child_token(),
    };
    st.session = Some(session.clone());
    // Count the registration as contact: the fence deadline starts from here.
    st.last_heartbeat_ok = Some(sent_at);
    drop(st);
    if resp.resumed {
        tracing::info!(session = %resp.session_id, leases = resp.leases.len(), "resumed session");
    } else {
        if tried_resume {
            tracing::info!("the saved session expired; registered a new one");
        }
        tracing::info!(session = %resp.session_id, ttl_ms, heartbeat_interval_ms = resp.heartbeat_interval_ms, "registered");
    }
    session
}

/// The self-fence margin: a quarter of the remaining lifetime, at most 5 s.
pub(crate) fn fence_margin(remaining: Duration) -> Duration {
    (remaining / 4).min(Duration::from_secs(5))
}

/// Claims while slots are free, until the session ends or a drain begins.
async fn claim_loop(shared: Arc<Shared>, session: SessionState, drain: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failing = false;
    let max_jobs = shared.config.max_jobs as usize;
    loop {
        if drain.is_cancelled() || session.cancel.is_cancelled() {
            return;
        }
        let (free, slots) = shared.free();
        if slots == 0 {
            let mut count = shared.jobs_count.subscribe();
            tokio::select! {
                _ = count.wait_for(|n| *n < max_jobs) => continue,
                () = drain.cancelled() => return,
                () = session.cancel.cancelled() => return,
            }
        }
        let req = v1::ClaimRequest {
            session_id: session.auth.session_id.clone(),
            free: Some(free),
            max_jobs: slots,
            wait_ms: shared.config.claim_wait_ms,
        };
        let result = tokio::select! {
            r = shared.client.claim(&session.auth, req) => r,
            () = drain.cancelled() => return,
            () = session.cancel.cancelled() => return,
        };
        match result {
            Ok(resp) => {
                Metrics::inc(&shared.metrics.claims_ok);
                if failing {
                    tracing::info!("claim works again");
                    failing = false;
                }
                backoff.reset();
                for lease in resp.leases {
                    accept_lease(&shared, &session, lease, None);
                }
            }
            Err(CallError::SessionGone(why)) => {
                shared.fence(session.generation, &format!("Claim: {why}"));
                return;
            }
            Err(e) => {
                Metrics::inc(&shared.metrics.claims_failed);
                let delay = backoff.next_delay();
                if !failing {
                    tracing::warn!("claim failed: {e}; retrying with backoff");
                    failing = true;
                } else {
                    tracing::debug!("claim failed: {e}; retrying in {delay:?}");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = drain.cancelled() => return,
                    () = session.cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Records a lease and starts its job, unless the agent cannot run it any
/// more (drain began, session fenced while the Claim was in flight).
/// Takes on a lease: a fresh one from `Claim`, or (with `adopt_gpus`) one
/// an earlier run of the agent started, with the GPUs it runs on.
fn accept_lease(
    shared: &Arc<Shared>,
    session: &SessionState,
    lease: v1::Lease,
    adopt_gpus: Option<Vec<String>>,
) {
    let (Some(lease_ref), Some(payload)) = (lease.lease, lease.job) else {
        tracing::warn!("coordinator sent a lease without a job or reference; ignoring it");
        return;
    };
    Metrics::inc(&shared.metrics.leases_claimed);
    let (orders_tx, orders_rx) = watch::channel(None);
    let resources = payload.resources.clone().unwrap_or_default();
    let devices = {
        let mut st = shared.state();
        let same_session = st
            .session
            .as_ref()
            .is_some_and(|s| s.generation == session.generation);
        if !same_session {
            // Our session is gone; the coordinator requeues the lease.
            return;
        }
        let admitted = if st.phase != Phase::Running {
            Err("agent is draining".to_string())
        } else {
            let model = (!resources.gpu_model.is_empty()).then_some(resources.gpu_model.as_str());
            match &adopt_gpus {
                Some(uuids) => shared.gpus.acquire_exact(uuids),
                None => shared.gpus.acquire(resources.gpus, model),
            }
            .map_err(|e| {
                tracing::warn!(job = %lease_name(&lease_ref), "cannot run a leased job: {e}");
                format!("agent {}: {e}", shared.config.agent_id)
            })
        };
        let gpus = match admitted {
            Ok(gpus) => gpus,
            Err(reason) => {
                drop(st);
                // Not the job's fault: requeued on the infra budget.
                let shared = shared.clone();
                let auth = session.auth.clone();
                tokio::spawn(async move {
                    job::complete(
                        &shared,
                        &auth,
                        &lease_ref,
                        v1::Outcome::Interrupted,
                        None,
                        reason,
                        None,
                    )
                    .await;
                });
                return;
            }
        };
        let devices = gpus.devices();
        st.jobs.insert(
            key(&lease_ref),
            JobEntry {
                lease: lease_ref.clone(),
                resources,
                orders: orders_tx,
                _gpus: gpus,
            },
        );
        let n = st.jobs.len();
        drop(st);
        shared.jobs_count.send_replace(n);
        devices
    };
    tracing::info!(job = %lease_name(&lease_ref), name = %payload.name, "leased job");
    let shared = shared.clone();
    let auth = session.auth.clone();
    tokio::spawn(async move {
        // Whatever ends this task, the job leaves the table and its GPUs
        // return to the pool.
        let _entry = RemoveOnDrop {
            shared: shared.clone(),
            key: key(&lease_ref),
        };
        // The job runs in its own task so that a panic there is caught here
        // and becomes that job's failure.
        let inner = tokio::spawn(job::run(
            shared.clone(),
            auth.clone(),
            lease_ref.clone(),
            payload,
            devices,
            orders_rx,
            if adopt_gpus.is_some() {
                job::Begin::Adopt
            } else {
                job::Begin::Start
            },
        ));
        if let Err(e) = inner.await {
            let what = if e.is_panic() {
                "panicked"
            } else {
                "was aborted"
            };
            tracing::error!(job = %lease_name(&lease_ref), "the job's task {what}: {e}");
            job::complete(
                &shared,
                &auth,
                &lease_ref,
                v1::Outcome::Failed,
                None,
                format!("agent error while running the job: task {what}"),
                None,
            )
            .await;
            shared.metrics.job_finished("failed");
        }
    });
}

/// Removes a job from the table when dropped.
struct RemoveOnDrop {
    shared: Arc<Shared>,
    key: JobKey,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.shared.remove_job(&self.key);
    }
}

/// Renews the session every interval and self-fences when its remaining
/// lifetime, counted from when the last answered heartbeat was sent, runs out.
async fn heartbeat_loop(shared: Arc<Shared>, session: SessionState) {
    let ttl = Duration::from_millis(session.ttl_ms);
    let mut fence_at = session.registered_at + ttl - fence_margin(ttl);
    let mut period = Duration::from_millis(session.heartbeat_interval_ms);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut failing = false;
    loop {
        tokio::select! {
            () = session.cancel.cancelled() => return,
            () = tokio::time::sleep_until(fence_at) => {
                shared.fence(session.generation, "no heartbeat answer before the session's deadline");
                return;
            }
            _ = ticker.tick() => {}
            () = shared.heartbeat_now.notified() => {}
        }
        let req = v1::HeartbeatRequest {
            session_id: session.auth.session_id.clone(),
            running: shared.running_leases(),
            draining: shared.phase() != Phase::Running,
        };
        let sent_at = Instant::now();
        let sent_unix = SystemTime::now();
        let timeout = fence_at
            .saturating_duration_since(sent_at)
            .clamp(Duration::from_millis(100), CALL_TIMEOUT);
        let result = tokio::select! {
            r = shared.client.heartbeat(&session.auth, req, timeout) => r,
            () = session.cancel.cancelled() => return,
        };
        match result {
            Ok(resp) => {
                let remaining = Duration::from_millis(resp.session_remaining_ms);
                let margin = fence_margin(remaining);
                fence_at = sent_at + remaining - margin;
                let deadline_unix_ms = unix_ms(sent_unix) + (remaining - margin).as_millis() as u64;
                if let Err(e) =
                    session::write_fence_deadline(&shared.config.data_dir, deadline_unix_ms)
                {
                    tracing::warn!("cannot write the fence deadline file: {e}");
                }
                Metrics::inc(&shared.metrics.heartbeats_ok);
                shared.state().last_heartbeat_ok = Some(Instant::now());
                if failing {
                    tracing::info!("heartbeat works again");
                    failing = false;
                }
                for lease in &resp.cancel {
                    shared.stop_job(lease, StopOrder::Cancel);
                }
                for lease in &resp.lost {
                    shared.stop_job(lease, StopOrder::Kill);
                }
                if resp.drain {
                    shared.begin_drain("operator");
                }
                let wanted = Duration::from_millis(resp.heartbeat_interval_ms);
                if !wanted.is_zero() && wanted != period {
                    period = wanted;
                    ticker = tokio::time::interval_at(Instant::now() + period, period);
                    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
                }
            }
            Err(CallError::SessionGone(why)) => {
                shared.fence(session.generation, &format!("Heartbeat: {why}"));
                return;
            }
            Err(e) => {
                Metrics::inc(&shared.metrics.heartbeats_failed);
                let left = fence_at.saturating_duration_since(Instant::now());
                if !failing {
                    tracing::warn!(
                        "heartbeat failed: {e}; self-fencing in {left:?} unless one succeeds"
                    );
                    failing = true;
                } else {
                    tracing::debug!("heartbeat failed: {e}");
                }
            }
        }
    }
}

/// Follows the session's command stream; reconnects with backoff. The same
/// orders also arrive in heartbeat answers, so a broken stream only delays them.
async fn commands_loop(shared: Arc<Shared>, session: SessionState) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let opened = tokio::select! {
            r = shared.client.commands(&session.auth) => r,
            () = session.cancel.cancelled() => return,
        };
        match opened {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = session.cancel.cancelled() => return,
                };
                match message {
                    Ok(Some(command)) => {
                        backoff.reset();
                        handle_command(&shared, command);
                    }
                    Ok(None) => break,
                    Err(status) => {
                        match CallError::from_status(shared.client.url(), status, false) {
                            CallError::SessionGone(why) => {
                                shared.fence(session.generation, &format!("Commands: {why}"));
                                return;
                            }
                            e => tracing::debug!("command stream ended: {e}"),
                        }
                        break;
                    }
                }
            },
            Err(CallError::SessionGone(why)) => {
                shared.fence(session.generation, &format!("Commands: {why}"));
                return;
            }
            Err(e) => tracing::debug!("cannot open the command stream: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = session.cancel.cancelled() => return,
        }
    }
}

fn handle_command(shared: &Shared, command: v1::Command) {
    use v1::command::Command as C;
    match command.command {
        Some(C::Cancel(lease)) => shared.stop_job(&lease, StopOrder::Cancel),
        Some(C::Kill(lease)) => shared.stop_job(&lease, StopOrder::Kill),
        Some(C::Drain(order)) => {
            let reason = if order.reason.is_empty() {
                "operator"
            } else {
                &order.reason
            };
            shared.begin_drain(reason);
        }
        None => {}
    }
}

/// The drain after claiming stopped: let jobs finish up to the deadline
/// (which a later, more urgent notice can bring closer), stop the rest
/// (INTERRUPTED), then Leave.
async fn drain(shared: &Arc<Shared>) {
    let mut count = shared.jobs_count.subscribe();
    let mut deadline = shared.drain_deadline.subscribe();
    let running = *count.borrow();
    if running > 0 {
        let within = deadline
            .borrow()
            .map(|d| d.saturating_duration_since(Instant::now()));
        tracing::info!(running, "waiting up to {within:?} for running jobs");
    }
    loop {
        let at = deadline.borrow_and_update().unwrap_or_else(|| {
            Instant::now() + Duration::from_millis(shared.config.drain_timeout_ms)
        });
        let passed = tokio::select! {
            _ = count.wait_for(|n| *n == 0) => break,
            () = tokio::time::sleep_until(at) => true,
            _ = deadline.changed() => false,
        };
        if passed {
            tracing::warn!(
                running = *count.borrow(),
                "drain deadline passed; stopping the remaining jobs"
            );
            shared.stop_all(StopOrder::Interrupt);
            let _ = count.wait_for(|n| *n == 0).await;
            break;
        }
    }
    if let Some(session) = shared.current_session() {
        // The session's loops stop first: a heartbeat answered after the
        // Leave would find the session ended and fence an agent that is
        // only leaving.
        session.cancel.cancel();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        for attempt in 1..=5 {
            match shared.client.leave(&session.auth).await {
                Ok(requeued) => {
                    tracing::info!(session = %session.auth.session_id, requeued, "left the coordinator");
                    session::forget(&shared.config.data_dir);
                    break;
                }
                Err(e) if e.is_transient() && attempt < 5 => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!("Leave failed: {e}; the session will expire on its own");
                    break;
                }
            }
        }
    }
    // No job runs any more: a deadline left behind must never fence a later
    // run's jobs (a new session writes its own).
    if let Err(e) = session::clear_fence_deadline(&shared.config.data_dir) {
        tracing::warn!("cannot remove the fence deadline file: {e}");
    }
    let mut st = shared.state();
    st.phase = Phase::Terminating;
    st.session = None;
    shared.phase_watch.send_replace(Phase::Terminating);
}

/// With idle leaving on: drains with reason "idle" once nothing has run for
/// `idle_timeout_ms` in this serving period.
async fn idle_watch(shared: Arc<Shared>, drain: CancellationToken) {
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    let mut count = shared.jobs_count.subscribe();
    loop {
        tokio::select! {
            _ = count.wait_for(|n| *n == 0) => {}
            () = drain.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(idle) => {
                if *count.borrow() == 0 {
                    tracing::info!("idle for {idle:?}");
                    shared.begin_drain("idle");
                    return;
                }
            }
            _ = count.changed() => {}
            () = drain.cancelled() => return,
        }
    }
}

/// Polls the platform for interruptions and acts on the first sighting of
/// each: a rebalance recommendation stops claiming, a spot notice drains
/// with its deadline, the ASG's terminating lifecycle state drains with
/// lifecycle heartbeats and ends with CompleteLifecycleAction.
async fn platform_watch(shared: Arc<Shared>) {
    if shared.platform.kind() != PlatformKind::Ec2 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(shared.config.platform_poll_ms));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (mut spot, mut rebalance, mut lifecycle) = (false, false, false);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let notices = match shared.platform.poll().await {
            Ok(notices) => {
                if failing {
                    tracing::info!("instance metadata answers again");
                    failing = false;
                }
                notices
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("cannot poll for interruptions: {e}");
                    failing = true;
                }
                continue;
            }
        };
        for notice in notices {
            match notice {
                Notice::SpotInterruption { deadline } if !spot => {
                    spot = true;
                    let margin = Duration::from_millis(shared.config.interrupt_margin_ms);
                    let left =
                        crate::platform::until_interrupt(deadline, SystemTime::now(), margin);
                    tracing::warn!(
                        "spot interruption notice: the instance is reclaimed at {}; running jobs stop in {left:?}",
                        humantime::format_rfc3339_seconds(deadline)
                    );
                    shared.begin_drain_until("spot", Some(Instant::now() + left));
                }
                Notice::Rebalance if !rebalance => {
                    rebalance = true;
                    if shared.platform.can_terminate_self() && shared.config.idle_terminate {
                        tracing::warn!("rebalance recommendation: no new jobs; the instance ends once running jobs finish");
                        shared.begin_drain("rebalance");
                    } else {
                        tracing::warn!("rebalance recommendation: this agent cannot end its instance (no ASG or idle_terminate off); it keeps serving until a spot notice");
                    }
                }
                Notice::LifecycleTerminating if !lifecycle => {
                    lifecycle = true;
                    let phase = {
                        let mut st = shared.state();
                        // An agent that terminated itself completes the
                        // action in terminate_idle.
                        if st.phase != Phase::Terminating {
                            st.lifecycle = true;
                        }
                        st.phase
                    };
                    if phase != Phase::Terminating {
                        tracing::warn!(
                            "the Auto Scaling group is terminating this instance: draining"
                        );
                        shared.begin_drain("lifecycle");
                        let task = tokio::spawn(lifecycle_heartbeats(shared.clone()));
                        shared.state().lifecycle_heartbeats = Some(task);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Keeps the lifecycle action alive while jobs run: one heartbeat at once,
/// then every `lifecycle_heartbeat_ms`, until no job runs.
async fn lifecycle_heartbeats(shared: Arc<Shared>) {
    let period = Duration::from_millis(shared.config.lifecycle_heartbeat_ms);
    let mut count = shared.jobs_count.subscribe();
    loop {
        if *count.borrow() == 0 {
            return;
        }
        if let Err(e) = shared.platform.lifecycle_heartbeat().await {
            tracing::warn!("{e}; the lifecycle hook may time out before the jobs finish");
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = count.wait_for(|n| *n == 0) => return,
        }
    }
}

/// Scale-in protection follows busy/idle while the agent serves (debounced;
/// see [`Debounce`]). During a drain it stays as it is: the instance is
/// going away, or an idle agent is about to end it.
async fn protection_loop(shared: Arc<Shared>) {
    let debounce = Duration::from_millis(shared.config.protection_debounce_ms);
    let retry = debounce.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut state = Debounce::new(debounce);
    let mut count = shared.jobs_count.subscribe();
    let mut phase = shared.phase_watch.subscribe();
    loop {
        let serving = *phase.borrow_and_update() == Phase::Running;
        let busy = *count.borrow_and_update() > 0;
        let step = if serving {
            state.next(busy, Instant::now())
        } else {
            Step::Wait
        };
        match step {
            Step::Set(protected) => {
                match shared.platform.set_scale_in_protection(protected).await {
                    Ok(()) => {
                        tracing::info!(protected, "scale-in protection set");
                        state.applied(protected);
                    }
                    Err(e) => {
                        tracing::warn!("cannot set scale-in protection to {protected}: {e}; retrying in {retry:?}");
                        state.failed(Instant::now() + retry);
                    }
                }
            }
            Step::WaitUntil(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                _ = count.changed() => {}
                _ = phase.changed() => {}
            },
            Step::Wait => tokio::select! {
                _ = count.changed() => {}
                _ = phase.changed() => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_margin_is_a_quarter_capped_at_five_seconds() {
        assert_eq!(fence_margin(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(
            fence_margin(Duration::from_secs(60)),
            Duration::from_secs(5)
        );
        assert_eq!(fence_margin(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn only_a_fence_deadline_still_ahead_lets_the_earlier_runs_jobs_be_adopted() {
        let dir = tempfile::tempdir().unwrap();
        // None written, or removed by the watchdog once it fenced.
        assert!(!earlier_fence_ahead(dir.path()));
        let now_ms = unix_ms(SystemTime::now());
        session::write_fence_deadline(dir.path(), now_ms + 60_000).unwrap();
        assert!(earlier_fence_ahead(dir.path()));
        session::write_fence_deadline(dir.path(), now_ms.saturating_sub(1)).unwrap();
        assert!(!earlier_fence_ahead(dir.path()));
        // Too close: the watchdog could act before the new deadline is written.
        session::write_fence_deadline(dir.path(), now_ms + 100).unwrap();
        assert!(!earlier_fence_ahead(dir.path()));
    }
}
