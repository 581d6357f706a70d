//! A `Store` decorator that records, per job, when it was submitted, started
//! and completed, with monotonic clocks: the dispatch benchmark's stopwatch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use drover_coordinator::store::*;
use drover_proto::model::{Agent, Job, JobEvent, Pool, SubmittedJob};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, Default)]
pub struct JobTimes {
    pub started: Option<Instant>,
    pub completed: Option<Instant>,
}

pub struct TimedStore<S> {
    inner: S,
    times: Mutex<HashMap<String, JobTimes>>,
    pub completed: Arc<Notify>,
}

impl<S: Store> TimedStore<S> {
    pub fn new(inner: S) -> Self {
        TimedStore {
            inner,
            times: Mutex::new(HashMap::new()),
            completed: Arc::new(Notify::new()),
        }
    }

    pub fn times(&self, job_id: &str) -> JobTimes {
        self.times
            .lock()
            .map(|t| t.get(job_id).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    fn record(&self, job_id: &str, f: impl FnOnce(&mut JobTimes)) {
        if let Ok(mut times) = self.times.lock() {
            f(times.entry(job_id.to_string()).or_default());
        }
    }
}

#[async_trait]
impl<S: Store> Store for TimedStore<S> {
    async fn submit(&self, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<Vec<SubmittedJob>> {
        self.inner.submit(jobs, now_ms).await
    }
    async fn get_job(&self, job_id: &str) -> StoreResult<Job> {
        self.inner.get_job(job_id).await
    }
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        self.inner.list_jobs(filter, cursor, limit).await
    }
    async fn events(&self, job_id: &str) -> StoreResult<Vec<JobEvent>> {
        self.inner.events(job_id).await
    }
    async fn claim(
        &self,
        offer: &ClaimOffer,
        scan_limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        self.inner.claim(offer, scan_limit, now_ms).await
    }
    async fn start(
        &self,
        lease: &LeaseRef,
        now_ms: i64,
        usd_per_hour: Option<f64>,
    ) -> StoreResult<()> {
        let at = Instant::now();
        self.record(&lease.job_id, |t| t.started = Some(at));
        self.inner.start(lease, now_ms, usd_per_hour).await
    }
    async fn check_lease(&self, lease: &LeaseRef) -> StoreResult<()> {
        self.inner.check_lease(lease).await
    }
    async fn complete(
        &self,
        lease: &LeaseRef,
        completion: &Completion,
        now_ms: i64,
    ) -> StoreResult<Completed> {
        let state = self.inner.complete(lease, completion, now_ms).await?;
        let at = Instant::now();
        self.record(&lease.job_id, |t| t.completed = Some(at));
        self.completed.notify_waiters();
        Ok(state)
    }
    async fn create_run(&self, run: &RunRecord, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<()> {
        self.inner.create_run(run, jobs, now_ms).await
    }
    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord> {
        self.inner.get_run(run_id).await
    }
    async fn list_runs(&self, cursor: Option<&str>, limit: usize) -> StoreResult<Page<RunRecord>> {
        self.inner.list_runs(cursor, limit).await
    }
    async fn cancel_run(&self, run_id: &str, now_ms: i64) -> StoreResult<RunRecord> {
        self.inner.cancel_run(run_id, now_ms).await
    }
    async fn get_jobs(&self, job_ids: &[String]) -> StoreResult<Vec<Job>> {
        self.inner.get_jobs(job_ids).await
    }
    async fn release_pending(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.inner.release_pending(now_ms).await
    }
    async fn cancel(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        self.inner.cancel(job_id, now_ms).await
    }
    async fn retry(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        self.inner.retry(job_id, now_ms).await
    }
    async fn create_session(&self, session: &NewSession, now_ms: i64) -> StoreResult<()> {
        self.inner.create_session(session, now_ms).await
    }
    async fn session_auth(&self, session_id: &str) -> StoreResult<SessionAuth> {
        self.inner.session_auth(session_id).await
    }
    async fn resume_session(&self, session_id: &str, now_ms: i64) -> StoreResult<Vec<LeaseRef>> {
        self.inner.resume_session(session_id, now_ms).await
    }
    async fn heartbeat(
        &self,
        session_id: &str,
        running: &[LeaseRef],
        draining: bool,
        now_ms: i64,
    ) -> StoreResult<HeartbeatAnswer> {
        self.inner
            .heartbeat(session_id, running, draining, now_ms)
            .await
    }
    async fn end_session(
        &self,
        session_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<EndedSession> {
        self.inner.end_session(session_id, reason, now_ms).await
    }
    async fn expired_sessions(&self, before_ms: i64) -> StoreResult<Vec<String>> {
        self.inner.expired_sessions(before_ms).await
    }
    async fn live_sessions(&self) -> StoreResult<u64> {
        self.inner.live_sessions().await
    }
    async fn reap_jobs(
        &self,
        grace_ms: i64,
        start_deadline_ms: i64,
        now_ms: i64,
    ) -> StoreResult<ReapedJobs> {
        self.inner
            .reap_jobs(grace_ms, start_deadline_ms, now_ms)
            .await
    }
    async fn request_drain(&self, agent_id: &str, now_ms: i64) -> StoreResult<Agent> {
        self.inner.request_drain(agent_id, now_ms).await
    }
    async fn note_agent(&self, session_id: &str, note: &str) -> StoreResult<()> {
        self.inner.note_agent(session_id, note).await
    }
    async fn list_agents(&self, now_ms: i64, recent_ms: i64) -> StoreResult<Vec<Agent>> {
        self.inner.list_agents(now_ms, recent_ms).await
    }
    async fn pools(&self, now_ms: i64) -> StoreResult<Vec<Pool>> {
        self.inner.pools(now_ms).await
    }
    async fn set_pool_paused(&self, pool: &str, paused: bool) -> StoreResult<()> {
        self.inner.set_pool_paused(pool, paused).await
    }
    async fn pool_capacity(&self, pool: &str) -> StoreResult<PoolCapacity> {
        self.inner.pool_capacity(pool).await
    }
    async fn queued_needs(&self, pool: &str, limit: usize) -> StoreResult<Vec<JobNeeds>> {
        self.inner.queued_needs(pool, limit).await
    }
    async fn lost_sessions(&self, since_ms: i64, now_ms: i64) -> StoreResult<Vec<LostSession>> {
        self.inner.lost_sessions(since_ms, now_ms).await
    }
    async fn try_acquire_leader(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: i64,
    ) -> StoreResult<Option<LeaderLease>> {
        self.inner
            .try_acquire_leader(name, holder, ttl_ms, now_ms)
            .await
    }
    async fn release_leader(&self, lease: &LeaderLease) -> StoreResult<()> {
        self.inner.release_leader(lease).await
    }
    async fn scaler_states(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.inner.scaler_states().await
    }
    async fn put_scaler_state(
        &self,
        pool: &str,
        state: &str,
        lease: &LeaderLease,
    ) -> StoreResult<()> {
        self.inner.put_scaler_state(pool, state, lease).await
    }
}
