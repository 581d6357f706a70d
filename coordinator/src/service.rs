//! The coordinator's operations as plain async methods. The gRPC
//! AgentService and the HTTP API are thin adapters over this, so the two
//! cannot drift apart.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drover_proto::model::{
    self, Agent, Job, JobEvent, JobSpec, JobState, Pool, Resources, SubmitResponse,
};
use drover_proto::v1;
use futures::Stream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

mod artifacts;
mod workflows;
pub use artifacts::UploadUrl;

use crate::auth::{self, JoinCheck, Tokens};
use crate::blob::{BlobError, BlobStore};
use crate::clock::Clock;
use crate::config::{Config, Scope};
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Metrics;
use crate::store::{
    ClaimOffer, ClaimedJob, Completion, HeartbeatAnswer, JobFilter, LeaseRef, NewJob, NewSession,
    OutcomeKind, Page, SessionAuth, Store, StoreError,
};

/// How often the poller looks at the queue of each pool with waiting
/// `Claim` calls for work that came without a wake-up on this coordinator
/// (jobs whose backoff ended, jobs submitted through another coordinator).
pub const CLAIM_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Most waiting claims one event wakes.
const MAX_WAKES: usize = 256;
const LOG_READ_CHUNK: usize = 64 * 1024;
/// Agents that left are still listed this long.
const RECENT_AGENTS_MS: i64 = 10 * 60_000;

pub struct Service {
    store: Arc<dyn Store>,
    blobs: Arc<dyn BlobStore>,
    clock: Arc<dyn Clock>,
    config: Arc<Config>,
    tokens: Tokens,
    /// Waiting `Claim` calls, one queue per pool. Work wakes as many waiters
    /// as it has jobs (never the whole fleet), and a claim that filled its
    /// slots wakes the next waiter, so idle agents cost no store queries.
    waiters: Mutex<HashMap<String, Arc<PoolWaiters>>>,
    /// Bumped on every log append and completion, for log followers.
    log_events: watch::Sender<u64>,
    /// Connected command streams, by session id.
    commands: Mutex<HashMap<String, mpsc::Sender<v1::Command>>>,
    /// Authenticated sessions (token hashes never change).
    sessions: Mutex<HashMap<String, SessionAuth>>,
    /// Each fresh lease's price per hour, from its claim until its start.
    rates: Mutex<HashMap<(String, u64), Option<f64>>>,
    /// Finished jobs' attempts by (job id, last update), for run views.
    finished_attempts: Mutex<HashMap<(String, i64), Vec<crate::cost::AttemptCost>>>,
    /// When the reaper's circuit breaker tripped, while it holds.
    breaker_since_ms: Mutex<Option<i64>>,
    /// Base of the signed URLs the coordinator serves (config or bound address).
    public_url: std::sync::OnceLock<String>,
    pub metrics: Metrics,
}

/// A stream of log bytes for the HTTP API.
pub type LogStream = Pin<Box<dyn Stream<Item = ServiceResult<Bytes>> + Send>>;

impl Service {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        clock: Arc<dyn Clock>,
        config: Config,
    ) -> Arc<Service> {
        let tokens = Tokens::new(&config.join_tokens, &config.api_tokens);
        let public_url = std::sync::OnceLock::new();
        if let Some(url) = &config.public_url {
            let _ = public_url.set(url.trim_end_matches('/').to_string());
        }
        Arc::new(Service {
            store,
            blobs,
            clock,
            config: Arc::new(config),
            tokens,
            waiters: Mutex::new(HashMap::new()),
            log_events: watch::channel(0).0,
            commands: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            finished_attempts: Mutex::new(HashMap::new()),
            breaker_since_ms: Mutex::new(None),
            public_url,
            metrics: Metrics::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The store, for the coordinator's singletons (the scaler).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Now, by the service's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn pool_waiters(&self, pool: &str) -> Arc<PoolWaiters> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(pool.to_string()).or_default().clone()
    }

    /// Wakes up to `jobs` waiting claims of `pool`.
    fn wake_pool(&self, pool: &str, jobs: usize) {
        let waiters = self.pool_waiters(pool);
        for _ in 0..jobs.min(MAX_WAKES) {
            waiters.notify.notify_one();
        }
    }

    /// Wakes up to `jobs` waiting claims in every pool (work appeared and its
    /// pool is not at hand; a claim that finds work wakes the next one).
    fn wake_claimers_n(&self, jobs: usize) {
        let pools: Vec<Arc<PoolWaiters>> = {
            let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.values().cloned().collect()
        };
        for waiters in pools {
            for _ in 0..jobs.clamp(1, MAX_WAKES) {
                waiters.notify.notify_one();
            }
        }
    }

    /// Wakes claimers for jobs a completion or the sweep released (one
    /// pool entry per job).
    fn wake_released(&self, pools: &[String]) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for pool in pools {
            *counts.entry(pool).or_default() += 1;
        }
        for (pool, n) in counts {
            self.wake_pool(pool, n);
        }
    }

    fn wake_claimers(&self) {
        self.wake_claimers_n(1);
    }

    /// The poller's tick. For each pool with waiting claims, one look at
    /// the head of its queue (what the claim scan would see) wakes the
    /// waiting claims that can take one of those jobs, one per job: jobs
    /// submitted through another coordinator and jobs whose backoff ended
    /// reach an agent that fits them within a tick, whatever waits ahead of
    /// it, and an empty queue costs one look (`queued_needs`) and no claims.
    pub async fn poll_tick(&self) {
        let pools: Vec<(String, Vec<Waiter>)> = {
            let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters
                .iter()
                .map(|(pool, w)| (pool.clone(), w.waiting()))
                .filter(|(_, waiting)| !waiting.is_empty())
                .collect()
        };
        for (pool, waiting) in pools {
            let needs = match self
                .store
                .queued_needs(&pool, self.config.claim_scan_limit)
                .await
            {
                Ok(needs) => needs,
                Err(e) => {
                    tracing::warn!(%pool, "looking at the queue for waiting claims: {e}");
                    // Let one of them try the claim itself.
                    waiting[0].poke.notify_one();
                    continue;
                }
            };
            let mut jobs = needs.len();
            for waiter in waiting {
                if jobs == 0 {
                    break;
                }
                let fits = needs.iter().any(|n| {
                    n.resources.fits_in(&waiter.free)
                        && n.constraints
                            .iter()
                            .all(|(k, v)| waiter.labels.get(k) == Some(v))
                });
                if fits {
                    waiter.poke.notify_one();
                    jobs -= 1;
                }
            }
        }
    }

    fn bump_logs(&self) {
        self.log_events.send_modify(|n| *n += 1);
    }

    // ----- people and tools (HTTP) -----

    /// Checks an API bearer token for a scope.
    pub fn authorize(&self, token: Option<&str>, needed: Scope) -> ServiceResult<()> {
        let token = token.ok_or_else(|| {
            ServiceError::Unauthenticated(
                "missing API token: send `Authorization: Bearer <token>` (DROVER_TOKEN for the CLI)"
                    .into(),
            )
        })?;
        let scopes = self
            .tokens
            .api_scopes(token)
            .ok_or_else(|| ServiceError::Unauthenticated("API token not recognised".into()))?;
        if scopes.iter().any(|s| s.allows(needed)) {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "this token lacks the {needed:?} scope"
            )))
        }
    }

    /// Validates every spec first; nothing is written unless all are good.
    pub async fn submit(&self, specs: Vec<JobSpec>) -> ServiceResult<SubmitResponse> {
        if specs.is_empty() {
            return Err(ServiceError::invalid(
                "jobs",
                "must contain at least one job",
            ));
        }
        if specs.len() > model::MAX_BATCH {
            return Err(ServiceError::invalid(
                "jobs",
                format!(
                    "{} jobs in one batch; the limit is {}",
                    specs.len(),
                    model::MAX_BATCH
                ),
            ));
        }
        let batch = specs.len() > 1;
        let mut largest_by_pool: HashMap<String, Option<Resources>> = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let at = |e: model::FieldError| if batch { e.in_batch(i) } else { e };
            let checked = async {
                spec.validate()?;
                self.check_placement(spec, &mut largest_by_pool).await?;
                self.check_inputs(spec).await
            };
            checked.await.map_err(|e| match e {
                ServiceError::Invalid(e) => ServiceError::Invalid(at(e)),
                e => e,
            })?;
        }
        let jobs: Vec<NewJob> = specs
            .into_iter()
            .map(|spec| NewJob {
                id: ulid::Ulid::new().to_string(),
                spec,
                workflow: None,
            })
            .collect();
        let mut per_pool: HashMap<String, usize> = HashMap::new();
        for job in &jobs {
            *per_pool.entry(job.spec.pool.clone()).or_default() += 1;
        }
        let submitted = self.store.submit(jobs, self.now()).await?;
        let created = submitted.iter().filter(|j| j.created).count() as u64;
        self.metrics
            .jobs_submitted
            .fetch_add(created, std::sync::atomic::Ordering::Relaxed);
        for (pool, count) in per_pool {
            self.wake_pool(&pool, count);
        }
        Ok(SubmitResponse { jobs: submitted })
    }

    /// Submit-time checks that need the config or the store: the pool is
    /// declared, and some agent of it could ever fit the job.
    async fn check_placement(
        &self,
        spec: &JobSpec,
        largest_by_pool: &mut HashMap<String, Option<Resources>>,
    ) -> ServiceResult<()> {
        if !self.config.pools.is_empty() && !self.config.pools.iter().any(|p| p.name == spec.pool) {
            let known: Vec<&str> = self.config.pools.iter().map(|p| p.name.as_str()).collect();
            return Err(ServiceError::invalid(
                "pool",
                format!(
                    "unknown pool {:?}; declared pools: {}",
                    spec.pool,
                    known.join(", ")
                ),
            ));
        }
        if !largest_by_pool.contains_key(&spec.pool) {
            let capacity = self.store.pool_capacity(&spec.pool).await?;
            largest_by_pool.insert(spec.pool.clone(), capacity.largest);
        }
        if let Some(Some(largest)) = largest_by_pool.get(&spec.pool) {
            let wants = &spec.resources;
            let fits_some = wants.cpu_millis <= largest.cpu_millis
                && wants.memory_mib <= largest.memory_mib
                && wants.gpus <= largest.gpus
                && wants.disk_gib <= largest.disk_gib;
            if !fits_some {
                return Err(ServiceError::invalid(
                    "resources",
                    format!(
                        "pool {:?}: largest agent has {largest}; the job asks for {wants}",
                        spec.pool
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A job with what it cost so far (its attempts' events priced).
    pub async fn get_job(&self, job_id: &str) -> ServiceResult<Job> {
        let mut job = self.store.get_job(job_id).await?;
        if job.attempt > 0 {
            let events = self.store.events(job_id).await?;
            job.cost_usd = crate::cost::job_cost(&events, self.now()).1;
        }
        Ok(job)
    }

    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> ServiceResult<Page<Job>> {
        let limit = limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(ServiceError::invalid("limit", "must be between 1 and 1000"));
        }
        Ok(self.store.list_jobs(filter, cursor, limit).await?)
    }

    pub async fn events(&self, job_id: &str) -> ServiceResult<Vec<JobEvent>> {
        Ok(self.store.events(job_id).await?)
    }

    pub async fn cancel(&self, job_id: &str) -> ServiceResult<Job> {
        let job = self.store.cancel(job_id, self.now()).await?;
        self.tell_agent_to_cancel(&job);
        self.bump_logs();
        Ok(job)
    }

    pub async fn retry(&self, job_id: &str) -> ServiceResult<Job> {
        let job = self.store.retry(job_id, self.now()).await?;
        self.wake_pool(&job.spec.pool, 1);
        Ok(job)
    }

    /// The attempt a log request means: the given one, or the latest.
    pub async fn log_attempt(&self, job_id: &str, attempt: Option<u64>) -> ServiceResult<u64> {
        let job = self.store.get_job(job_id).await?;
        match attempt {
            Some(a) if a == 0 || a > job.attempt => Err(ServiceError::invalid(
                "attempt",
                format!("job {job_id} has attempts 1 to {}", job.attempt),
            )),
            Some(a) => Ok(a),
            None => Ok(job.attempt),
        }
    }

    /// The attempt's log; with `follow`, keeps streaming until the attempt ends.
    pub fn log_stream(self: &Arc<Self>, job_id: String, attempt: u64, follow: bool) -> LogStream {
        struct State {
            service: Arc<Service>,
            job_id: String,
            attempt: u64,
            offset: u64,
            follow: bool,
            events: watch::Receiver<u64>,
            done: bool,
        }
        let state = State {
            events: self.log_events.subscribe(),
            service: self.clone(),
            job_id,
            attempt,
            offset: 0,
            follow,
            done: attempt == 0,
        };
        Box::pin(futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                // Whether the attempt has ended is read *before* the log, so
                // the last appended bytes are never missed.
                let ended = if st.follow {
                    match st.service.store.get_job(&st.job_id).await {
                        Ok(job) => {
                            job.attempt != st.attempt
                                || !matches!(job.state, JobState::Leased | JobState::Running)
                        }
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e.into()), st));
                        }
                    }
                } else {
                    true
                };
                st.events.borrow_and_update();
                match st
                    .service
                    .blobs
                    .read_log(&st.job_id, st.attempt, st.offset, LOG_READ_CHUNK)
                    .await
                {
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e.into()), st));
                    }
                    Ok(data) if !data.is_empty() => {
                        st.offset += data.len() as u64;
                        return Some((Ok(Bytes::from(data)), st));
                    }
                    Ok(_) if ended => return None,
                    Ok(_) => {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), st.events.changed()).await;
                    }
                }
            }
        }))
    }

    pub async fn agents(&self) -> ServiceResult<Vec<Agent>> {
        Ok(self.store.list_agents(self.now(), RECENT_AGENTS_MS).await?)
    }

    pub async fn drain_agent(&self, agent_id: &str) -> ServiceResult<Agent> {
        let agent = self.store.request_drain(agent_id, self.now()).await?;
        self.push(
            &agent.session_id,
            v1::command::Command::Drain(v1::DrainOrder {
                reason: "operator".into(),
            }),
        );
        Ok(agent)
    }

    pub async fn pools(&self) -> ServiceResult<Vec<Pool>> {
        let mut pools = self.store.pools(self.now()).await?;
        for declared in &self.config.pools {
            if !pools.iter().any(|p| p.pool == declared.name) {
                pools.push(Pool {
                    pool: declared.name.clone(),
                    queued: 0,
                    running: 0,
                    agents: 0,
                    paused: false,
                    oldest_queued_age_ms: None,
                    scaling: None,
                });
            }
        }
        crate::scaler::annotate_pools(&self.config, &*self.store, &mut pools).await?;
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        Ok(pools)
    }

    pub async fn set_pool_paused(&self, pool: &str, paused: bool) -> ServiceResult<Pool> {
        model::validate_name("pool", pool)?;
        let known = self.pools().await?;
        if !known.iter().any(|p| p.pool == pool) {
            return Err(ServiceError::NotFound(format!(
                "pool {pool:?} not found (no jobs, agents or declaration name it)"
            )));
        }
        self.store.set_pool_paused(pool, paused).await?;
        if !paused {
            self.wake_claimers();
        }
        self.pools()
            .await?
            .into_iter()
            .find(|p| p.pool == pool)
            .ok_or_else(|| ServiceError::Internal(format!("pool {pool} vanished")))
    }

    pub async fn metrics_text(&self) -> ServiceResult<String> {
        let pools = self.pools().await?;
        Ok(self.metrics.render(&pools))
    }

    // ----- agents (gRPC) -----

    pub async fn register(&self, req: v1::RegisterRequest) -> ServiceResult<v1::RegisterResponse> {
        let agent = req
            .agent
            .clone()
            .ok_or_else(|| ServiceError::invalid("agent", "is required"))?;
        if agent.agent_id.is_empty() || agent.agent_id.len() > 256 {
            return Err(ServiceError::invalid(
                "agent.agent_id",
                "must be 1 to 256 bytes",
            ));
        }
        model::validate_name("agent.pool", &agent.pool)?;
        match self.tokens.join_allows(&req.join_token, &agent.pool) {
            JoinCheck::Allowed => {}
            JoinCheck::WrongPool => {
                return Err(ServiceError::PermissionDenied(format!(
                    "this join token is not valid for pool {:?}",
                    agent.pool
                )))
            }
            JoinCheck::Unknown => return Err(ServiceError::Unauthenticated(
                "join token not recognised (DROVER_JOIN_TOKEN must match a coordinator join token)"
                    .into(),
            )),
        }
        if !self.config.pools.is_empty() && !self.config.pools.iter().any(|p| p.name == agent.pool)
        {
            return Err(ServiceError::invalid(
                "agent.pool",
                format!("unknown pool {:?}", agent.pool),
            ));
        }
        let ttl_ms = self.config.session_ttl_ms(&agent.pool);
        let now = self.now();
        if !req.resume_session_id.is_empty() {
            if let Some(resp) = self.try_resume(&req, &agent, ttl_ms).await? {
                return Ok(resp);
            }
        }
        let session_id = ulid::Ulid::new().to_string();
        let token = auth::random_token("ds");
        let capacity = agent.capacity.map(resources_from_wire).unwrap_or_default();
        self.store
            .create_session(
                &NewSession {
                    session_id: session_id.clone(),
                    token_hash: auth::hash_token(&token),
                    agent_id: agent.agent_id.clone(),
                    pool: agent.pool.clone(),
                    hostname: agent.hostname.clone(),
                    labels: agent.labels.clone().into_iter().collect(),
                    capacity,
                    runtime: agent.runtime.clone(),
                    version: agent.version.clone(),
                    health_addr: agent.health_addr.clone(),
                    ttl_ms,
                },
                now,
            )
            .await?;
        Metrics::inc(&self.metrics.sessions_registered);
        tracing::info!(session = %session_id, agent = %agent.agent_id, pool = %agent.pool, "agent registered");
        Ok(v1::RegisterResponse {
            session_id,
            session_token: token,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            session_ttl_ms: ttl_ms,
            resumed: false,
            leases: Vec::new(),
        })
    }

    /// Resumes the named session when it is still alive and the token matches;
    /// otherwise ends it (its jobs are requeued) and returns None.
    async fn try_resume(
        &self,
        req: &v1::RegisterRequest,
        agent: &v1::AgentInfo,
        ttl_ms: u64,
    ) -> ServiceResult<Option<v1::RegisterResponse>> {
        let old = match self.store.session_auth(&req.resume_session_id).await {
            Ok(old) => old,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let token_ok = auth::hashes_equal(
            &old.token_hash,
            &auth::hash_token(&req.resume_session_token),
        );
        if !token_ok || old.agent_id != agent.agent_id {
            // Not this agent's session to resume; leave it to the reaper.
            return Ok(None);
        }
        match self.store.resume_session(&old.session_id, self.now()).await {
            Ok(leases) => {
                tracing::info!(session = %old.session_id, agent = %agent.agent_id, leases = leases.len(), "agent resumed its session");
                Ok(Some(v1::RegisterResponse {
                    session_id: old.session_id.clone(),
                    session_token: req.resume_session_token.clone(),
                    heartbeat_interval_ms: self.config.heartbeat_interval_ms,
                    session_ttl_ms: ttl_ms,
                    resumed: true,
                    leases: leases.iter().map(lease_to_wire).collect(),
                }))
            }
            Err(StoreError::Conflict(_)) => {
                self.end_session(&old.session_id, "agent restarted after its session expired")
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that `token` is the session's token and the session is live.
    pub async fn authenticate(
        &self,
        session_id: &str,
        token: Option<&str>,
    ) -> ServiceResult<SessionAuth> {
        let token = token.ok_or_else(|| {
            ServiceError::Unauthenticated("missing session token (authorization metadata)".into())
        })?;
        let cached = self
            .sessions
            .lock()
            .map_err(poisoned)?
            .get(session_id)
            .cloned();
        let auth = match cached {
            Some(auth) => auth,
            None => {
                let auth = self
                    .store
                    .session_auth(session_id)
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound(_) => ServiceError::Unauthenticated(format!(
                            "session {session_id} is unknown; register again"
                        )),
                        e => e.into(),
                    })?;
                if !auth.gone {
                    self.sessions
                        .lock()
                        .map_err(poisoned)?
                        .insert(session_id.to_string(), auth.clone());
                }
                auth
            }
        };
        if !auth::hashes_equal(&auth.token_hash, &auth::hash_token(token)) {
            return Err(ServiceError::Unauthenticated(format!(
                "wrong token for session {session_id}"
            )));
        }
        if auth.gone {
            return Err(ServiceError::Unauthenticated(format!(
                "session {session_id} has ended; register again"
            )));
        }
        Ok(auth)
    }

    /// Long-poll claim: answers at once when work fits, else waits up to `wait_ms`.
    pub async fn claim(
        &self,
        session: &SessionAuth,
        free: Resources,
        max_jobs: u32,
        wait_ms: u64,
    ) -> ServiceResult<Vec<ClaimedJob>> {
        let wait = Duration::from_millis(wait_ms.min(self.config.max_claim_wait_ms));
        let deadline = Instant::now() + wait;
        let offer = ClaimOffer {
            session_id: session.session_id.clone(),
            agent_id: session.agent_id.clone(),
            pool: session.pool.clone(),
            labels: session.labels.clone(),
            free,
            max_jobs: max_jobs.min(256),
        };
        Metrics::inc(&self.metrics.claims);
        let waiters = self.pool_waiters(&offer.pool);
        // Registered (for the poller) from the first wait on.
        let mut registered: Option<Registered> = None;
        loop {
            let notified = waiters.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.now();
            let claimed = self
                .store
                .claim(&offer, self.config.claim_scan_limit, now)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(msg) => ServiceError::Unauthenticated(msg),
                    e => e.into(),
                })?;
            if !claimed.is_empty() {
                // There may be more work: let the next waiting agent look.
                waiters.notify.notify_one();
                self.remember_rates(session, &claimed);
                self.metrics
                    .leases_granted
                    .fetch_add(claimed.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for job in claimed.iter().filter(|j| j.lease.attempt == 1) {
                    if let Some(submitted_ms) = ulid_ms(&job.lease.job_id) {
                        self.metrics.dispatch_ms_sum.fetch_add(
                            (now - submitted_ms).max(0) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        Metrics::inc(&self.metrics.dispatch_count);
                    }
                }
                return Ok(claimed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let poke = registered
                .get_or_insert_with(|| waiters.register(&offer))
                .poke
                .clone();
            tokio::select! {
                _ = &mut notified => {}
                _ = poke.notified() => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }

    pub async fn heartbeat(
        &self,
        session: &SessionAuth,
        running: Vec<LeaseRef>,
        draining: bool,
    ) -> ServiceResult<HeartbeatAnswer> {
        let answer = self
            .store
            .heartbeat(&session.session_id, &running, draining, self.now())
            .await
            .map_err(|e| match e {
                StoreError::Conflict(msg) => ServiceError::Unauthenticated(msg),
                e => e.into(),
            })?;
        Metrics::inc(&self.metrics.heartbeats);
        if !answer.requeued_unreported.is_empty() {
            self.metrics.requeues_session_lost.fetch_add(
                answer.requeued_unreported.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.wake_pool(&session.pool, answer.requeued_unreported.len());
        }
        Ok(answer)
    }

    /// Registers the session's command stream, replacing an older one.
    pub fn subscribe_commands(
        &self,
        session_id: &str,
    ) -> ServiceResult<mpsc::Receiver<v1::Command>> {
        let (tx, rx) = mpsc::channel(64);
        self.commands
            .lock()
            .map_err(poisoned)?
            .insert(session_id.to_string(), tx);
        Ok(rx)
    }

    /// Ends every open command stream (shutdown): agents reconnect to
    /// whichever coordinator serves them next.
    pub fn close_command_streams(&self) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn push(&self, session_id: &str, command: v1::command::Command) {
        let sender = self
            .commands
            .lock()
            .ok()
            .and_then(|c| c.get(session_id).cloned());
        if let Some(sender) = sender {
            // A full or closed stream is fine: the next heartbeat carries it.
            let _ = sender.try_send(v1::Command {
                command: Some(command),
            });
        }
    }

    pub async fn report_started(
        &self,
        session: &SessionAuth,
        lease: &LeaseRef,
    ) -> ServiceResult<()> {
        let rate = match self.take_rate(lease) {
            Some(rate) => rate,
            // Claimed through another coordinator (or this one restarted).
            None => match self.store.get_job(&lease.job_id).await {
                Ok(job) => self
                    .config
                    .prices
                    .rate(&session.labels, &job.spec.resources),
                Err(_) => None,
            },
        };
        self.fenced(self.store.start(lease, self.now(), rate).await)?;
        self.bump_logs();
        Ok(())
    }

    /// Writes every buffered log byte to the blob store (at shutdown).
    pub async fn flush_logs(&self) -> ServiceResult<()> {
        Ok(self.blobs.flush_all().await?)
    }

    /// Appends `chunks` in order. A chunk past the stored end (output this
    /// or another coordinator accepted and lost in a crash) stops the append
    /// and is answered with `resend_from`, never as a lost lease. With
    /// `flush`, every stored byte is made durable before the answer.
    pub async fn append_logs(
        &self,
        lease: &LeaseRef,
        chunks: Vec<v1::LogChunk>,
        flush: bool,
    ) -> ServiceResult<Appended> {
        self.fenced(self.store.check_lease(lease).await)?;
        let (job_id, attempt) = (lease.job_id.as_str(), lease.attempt);
        let mut resend_from = None;
        for chunk in chunks {
            match self
                .blobs
                .append_log(job_id, attempt, chunk.offset, &chunk.data)
                .await
            {
                Ok(_) => {}
                Err(BlobError::Gap { offset, stored }) => {
                    tracing::info!(job = %job_id, attempt, offset, stored, "log gap: asking the agent to resend");
                    Metrics::inc(&self.metrics.log_resends);
                    resend_from = Some(stored);
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut len = self.blobs.log_len(job_id, attempt).await?;
        if flush && resend_from.is_none() {
            self.blobs.flush_log(job_id, attempt).await?;
            len.durable = len.stored;
        }
        self.bump_logs();
        Ok(Appended {
            stored: len.stored,
            durable: len.durable,
            resend_from,
        })
    }

    pub async fn complete(
        &self,
        lease: &LeaseRef,
        completion: Completion,
    ) -> ServiceResult<JobState> {
        // Logs first, so whoever sees the job finished reads all its output
        // from any coordinator. A failed flush stays buffered and is retried.
        if let Err(e) = self.blobs.flush_log(&lease.job_id, lease.attempt).await {
            tracing::warn!(job = %lease.job_id, attempt = lease.attempt, "flushing the log: {e}");
        }
        let completed = self.fenced(self.store.complete(lease, &completion, self.now()).await)?;
        let state = completed.state;
        let index = match completion.outcome {
            OutcomeKind::Succeeded => 0,
            OutcomeKind::Failed => 1,
            OutcomeKind::Cancelled => 2,
            OutcomeKind::TimedOut => 3,
            OutcomeKind::Interrupted => 4,
        };
        Metrics::inc(&self.metrics.completions[index]);
        if state == JobState::Queued {
            self.wake_claimers();
        }
        self.wake_released(&completed.released);
        self.bump_logs();
        Ok(state)
    }

    pub async fn leave(&self, session: &SessionAuth) -> ServiceResult<u32> {
        let ended = self.end_session(&session.session_id, "agent left").await?;
        tracing::info!(session = %session.session_id, agent = %session.agent_id, requeued = ended, "agent left");
        Ok(ended)
    }

    /// Ends a session, requeues its jobs, forgets its caches. Returns the
    /// number of jobs requeued.
    async fn end_session(&self, session_id: &str, reason: &str) -> ServiceResult<u32> {
        let ended = self
            .store
            .end_session(session_id, reason, self.now())
            .await?;
        self.sessions.lock().map_err(poisoned)?.remove(session_id);
        self.commands.lock().map_err(poisoned)?.remove(session_id);
        let requeued = ended.requeued.len() as u64;
        self.metrics
            .requeues_session_lost
            .fetch_add(requeued, std::sync::atomic::Ordering::Relaxed);
        if requeued > 0 {
            self.wake_claimers_n(requeued as usize);
        }
        if !ended.finished.is_empty() || requeued > 0 {
            self.bump_logs();
        }
        Ok(requeued as u32)
    }

    fn fenced<T>(&self, result: Result<T, StoreError>) -> ServiceResult<T> {
        if let Err(StoreError::LeaseLost { .. }) = &result {
            Metrics::inc(&self.metrics.fenced_rejections);
        }
        Ok(result?)
    }

    // ----- reaper -----

    /// One pass of the reaper: expired sessions → requeue their jobs; jobs
    /// past their timeout or start deadline. Returns what it did.
    pub async fn reap(&self) -> ServiceResult<ReapReport> {
        let now = self.now();
        let mut report = ReapReport::default();
        let expired = self
            .store
            .expired_sessions(now - self.config.clock_skew_ms as i64)
            .await?;
        if !expired.is_empty() {
            let live = self.store.live_sessions().await?;
            // A large share of sessions expiring at once smells of our own
            // outage (store, network), not of dead agents: hold off, for at
            // most one session TTL, so agents that are alive can renew.
            let mass_expiry = expired.len() >= 4 && (expired.len() as u64) * 2 > live;
            let holding = {
                let mut since = self.breaker_since_ms.lock().map_err(poisoned)?;
                match (*since, mass_expiry) {
                    (_, false) => {
                        *since = None;
                        false
                    }
                    (None, true) => {
                        *since = Some(now);
                        true
                    }
                    (Some(t), true) => now - t < self.config.session_ttl_ms as i64,
                }
            };
            if holding {
                report.breaker_tripped = true;
                tracing::warn!(
                    expired = expired.len(),
                    live,
                    "circuit breaker: many sessions expired at once; not reaping them yet"
                );
            } else {
                for session_id in expired {
                    tracing::warn!(session = %session_id, "agent session expired; requeueing its jobs");
                    report.requeued += self
                        .end_session(&session_id, "agent lost: session expired without heartbeat")
                        .await?;
                    report.sessions_expired += 1;
                    Metrics::inc(&self.metrics.sessions_expired);
                }
            }
        }
        let reaped = self
            .store
            .reap_jobs(
                self.config.timeout_grace_ms as i64,
                self.config.start_deadline_ms as i64,
                now,
            )
            .await?;
        for lease in &reaped.timed_out {
            Metrics::inc(&self.metrics.jobs_timed_out_by_reaper);
            self.push(
                &lease.session_id,
                v1::command::Command::Kill(lease_to_wire(lease)),
            );
        }
        if !reaped.timed_out.is_empty() || !reaped.not_started.is_empty() {
            self.wake_claimers_n(reaped.timed_out.len() + reaped.not_started.len());
            self.bump_logs();
        }
        report.timed_out = reaped.timed_out.len() as u32;
        report.not_started = reaped.not_started.len() as u32;
        Ok(report)
    }
}

/// The answer to [`Service::append_logs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Bytes of the attempt's log stored after the append.
    pub stored: u64,
    /// Of those, bytes that survive a crash of this coordinator.
    pub durable: u64,
    /// Output from this offset was lost before it was persisted: resend it.
    pub resend_from: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReapReport {
    pub sessions_expired: u32,
    pub requeued: u32,
    pub timed_out: u32,
    pub not_started: u32,
    pub breaker_tripped: bool,
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> ServiceError {
    ServiceError::Internal("internal lock poisoned".into())
}

fn ulid_ms(id: &str) -> Option<i64> {
    ulid::Ulid::from_string(id)
        .ok()
        .map(|u| u.timestamp_ms() as i64)
}

pub fn resources_from_wire(r: v1::Resources) -> Resources {
    Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        disk_gib: r.disk_gib,
        gpu_model: (!r.gpu_model.is_empty()).then_some(r.gpu_model),
    }
}

pub fn resources_to_wire(r: &Resources) -> v1::Resources {
    v1::Resources {
        cpu_millis: r.cpu_millis,
        memory_mib: r.memory_mib,
        gpus: r.gpus,
        disk_gib: r.disk_gib,
        gpu_model: r.gpu_model.clone().unwrap_or_default(),
    }
}

pub fn lease_to_wire(l: &LeaseRef) -> v1::LeaseRef {
    v1::LeaseRef {
        job_id: l.job_id.clone(),
        attempt: l.attempt,
        session_id: l.session_id.clone(),
    }
}

pub fn lease_from_wire(l: Option<v1::LeaseRef>) -> ServiceResult<LeaseRef> {
    let l = l.ok_or_else(|| ServiceError::invalid("lease", "is required"))?;
    if l.job_id.is_empty() || l.session_id.is_empty() || l.attempt == 0 {
        return Err(ServiceError::invalid(
            "lease",
            "must name job_id, attempt (≥ 1) and session_id",
        ));
    }
    Ok(LeaseRef {
        job_id: l.job_id,
        attempt: l.attempt,
        session_id: l.session_id,
    })
}

/// The waiting `Claim` calls of one pool on this coordinator.
#[derive(Default)]
struct PoolWaiters {
    /// Woken once per new job (FIFO): submits, requeues, releases here.
    notify: Notify,
    /// What each waiting claim could take, for the poller.
    registry: Mutex<HashMap<u64, Waiter>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One waiting claim, as the poller sees it.
#[derive(Clone)]
struct Waiter {
    free: Resources,
    labels: BTreeMap<String, String>,
    /// Wakes this claim alone.
    poke: Arc<Notify>,
}

impl PoolWaiters {
    fn register(self: &Arc<Self>, offer: &ClaimOffer) -> Registered {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let waiter = Waiter {
            free: offer.free.clone(),
            labels: offer.labels.clone(),
            poke: Arc::new(Notify::new()),
        };
        let poke = waiter.poke.clone();
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, waiter);
        Registered {
            pool: self.clone(),
            id,
            poke,
        }
    }

    /// The waiting claims, oldest first.
    fn waiting(&self) -> Vec<Waiter> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut waiting: Vec<(&u64, &Waiter)> = registry.iter().collect();
        waiting.sort_by_key(|(id, _)| **id);
        waiting.into_iter().map(|(_, w)| w.clone()).collect()
    }
}

/// A claim's place in [`PoolWaiters::registry`], given up when the claim
/// ends (answered, timed out or cancelled by its caller).
struct Registered {
    pool: Arc<PoolWaiters>,
    id: u64,
    poke: Arc<Notify>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.pool
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
