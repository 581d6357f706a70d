//! The coordinator's only state. Every backend implements [`Store`] and passes
//! the one conformance suite in `conformance.rs`.
//!
//! Each method is one atomic step of the job/session state machine (DESIGN
//! §2–§4): a backend either applies all of it or none of it. Calls about a job
//! that name a [`LeaseRef`] are *fenced*: they apply only while that exact
//! `(job_id, attempt, session_id)` still holds the lease, and fail with
//! [`StoreError::LeaseLost`] otherwise. Every state transition appends an event.

use std::collections::BTreeMap;

use async_trait::async_trait;
use drover_proto::model::{
    Agent, FieldError, Job, JobEvent, JobSpec, JobState, Pool, Resources, RetryPolicy, SubmittedJob,
};
use drover_proto::workflow::{RunStep, WorkflowLink};

#[cfg(test)]
mod conformance;
pub mod dynamodb;
pub mod sqlite;

pub use dynamodb::DynamoStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// The named lease is no longer held: the attempt moved on, the session
    /// died, or the job finished.
    #[error(
        "lease lost: job {job_id} attempt {attempt} is no longer held by session {session_id}"
    )]
    LeaseLost {
        job_id: String,
        attempt: u64,
        session_id: String,
    },
    /// The operation does not apply to the current state.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("store backend error: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The fencing triple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseRef {
    pub job_id: String,
    pub attempt: u64,
    pub session_id: String,
}

/// A job to insert. The id is chosen by the caller (a ULID).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub spec: JobSpec,
    /// Set for the jobs of a workflow run (only through [`Store::create_run`]).
    pub workflow: Option<WorkflowLink>,
}

/// A workflow run as stored: its steps (dependencies and job ids) and
/// whether it was cancelled. Its state is derived from its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// A ULID: runs list newest first.
    pub id: String,
    pub name: String,
    pub description: String,
    pub created_at_ms: i64,
    pub steps: Vec<RunStep>,
    pub cancel_requested: bool,
}

impl RunRecord {
    /// Every job id of the run, in step order.
    pub fn job_ids(&self) -> impl Iterator<Item = &str> {
        self.steps
            .iter()
            .flat_map(|s| s.jobs.iter().map(String::as_str))
    }
}

/// What a completion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The job's state afterwards.
    pub state: JobState,
    /// The pool of every PENDING job this completion released to QUEUED (its
    /// last dependency succeeded), one entry per job: the service wakes
    /// that many claimers.
    pub released: Vec<String>,
}

/// What an agent offers to one `claim`.
#[derive(Debug, Clone)]
pub struct ClaimOffer {
    pub session_id: String,
    pub agent_id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub free: Resources,
    pub max_jobs: u32,
}

/// A lease handed to an agent, with the full (unredacted) spec.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub lease: LeaseRef,
    pub spec: JobSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Succeeded,
    /// The job's own failure: counts against `max_attempts`.
    Failed,
    Cancelled,
    /// Counts against `max_attempts` like a failure.
    TimedOut,
    /// Infrastructure stopped it: requeued on `max_infra_retries`.
    Interrupted,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::TimedOut => "timed_out",
            OutcomeKind::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<OutcomeKind> {
        [
            OutcomeKind::Succeeded,
            OutcomeKind::Failed,
            OutcomeKind::Cancelled,
            OutcomeKind::TimedOut,
            OutcomeKind::Interrupted,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// The result of one attempt as reported by its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub outcome: OutcomeKind,
    pub exit_code: Option<i32>,
    pub reason: String,
}

/// A new agent session.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub session_id: String,
    pub token_hash: String,
    pub agent_id: String,
    pub pool: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub runtime: String,
    pub version: String,
    pub health_addr: String,
    pub ttl_ms: u64,
}

/// What the service needs to authenticate a session's calls.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    pub session_id: String,
    pub token_hash: String,
    pub agent_id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub ttl_ms: u64,
    pub expires_at_ms: i64,
    /// Left or expired: no call may use it any more.
    pub gone: bool,
}

/// Whether a heartbeat must write the session's renewal: once a third of
/// the TTL has passed since the last one (or a drain flag changes). Between
/// writes the session keeps at least two thirds of its TTL, several
/// heartbeat intervals (a sixth of the TTL by default), so a lazily renewed
/// session never comes near expiry while heartbeats arrive. Every backend
/// uses this one rule (SQLite has it in SQL: `expires_at_ms - now < ttl_ms -
/// ttl_ms / 3`).
pub fn renewal_due(expires_at_ms: i64, ttl_ms: i64, now_ms: i64) -> bool {
    expires_at_ms - now_ms < ttl_ms - ttl_ms / 3
}

/// The store's answer to a heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatAnswer {
    /// Session lifetime left as stored, from `now`.
    pub remaining_ms: u64,
    /// Leases of this session whose job an operator asked to cancel.
    pub cancel: Vec<LeaseRef>,
    /// Reported leases the session no longer holds.
    pub lost: Vec<LeaseRef>,
    /// Leases the session held but did not report for two heartbeats, now
    /// requeued (a `Claim` answer lost on the wire).
    pub requeued_unreported: Vec<LeaseRef>,
    pub drain: bool,
}

/// Jobs a session held when it ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndedSession {
    pub session_id: String,
    pub requeued: Vec<String>,
    /// Jobs that ended instead (cancel requested, infra budget exhausted).
    pub finished: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub pool: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// What the reaper did on one pass over running jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReapedJobs {
    /// RUNNING past `timeout` + grace: the agent must kill these.
    pub timed_out: Vec<LeaseRef>,
    /// LEASED and never started within the start deadline: requeued.
    pub not_started: Vec<LeaseRef>,
}

/// Largest resources any agent of a pool has offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCapacity {
    pub largest: Option<Resources>,
    pub paused: bool,
}

/// A singleton's lease (the scaler's) as held by one coordinator. The
/// `epoch` grows with every change of holder and fences the holder's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderLease {
    pub name: String,
    pub holder: String,
    pub epoch: u64,
    pub expires_at_ms: i64,
}

/// A session that expired (its agent stopped heartbeating and the reaper
/// ended it), as opposed to one whose agent left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostSession {
    pub session_id: String,
    pub agent_id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub ended_at_ms: i64,
}

/// What one queued job asks of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNeeds {
    pub resources: Resources,
    pub constraints: BTreeMap<String, String>,
}

/// The largest agent a pool has seen, per dimension, after `capacity` joined.
pub fn largest_of(largest: Option<Resources>, capacity: &Resources) -> Resources {
    match largest {
        None => capacity.clone(),
        Some(a) => Resources {
            cpu_millis: a.cpu_millis.max(capacity.cpu_millis),
            memory_mib: a.memory_mib.max(capacity.memory_mib),
            gpus: a.gpus.max(capacity.gpus),
            disk_gib: a.disk_gib.max(capacity.disk_gib),
            gpu_model: a.gpu_model.or_else(|| capacity.gpu_model.clone()),
        },
    }
}

/// Where a job goes when an attempt ends: the one rule every backend applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextState {
    pub state: JobState,
    pub reason: String,
    pub failures: u32,
    pub infra_retries: u32,
    /// Backoff before the next attempt (0: none).
    pub not_before_ms: i64,
}

/// An attempt lost to infrastructure (agent gone, interrupted): back to the
/// queue on `max_infra_retries`, never spending `max_attempts`; a requested
/// cancel wins.
pub fn next_after_infra_loss(
    retry: &RetryPolicy,
    failures: u32,
    infra_retries: u32,
    cancel_requested: bool,
    reason: &str,
) -> NextState {
    let infra_retries = infra_retries + 1;
    let (state, reason) = if cancel_requested {
        (JobState::Cancelled, format!("cancelled ({reason})"))
    } else if infra_retries > retry.max_infra_retries {
        (
            JobState::Failed,
            format!(
                "{reason}; infrastructure retries exhausted ({} of {})",
                infra_retries - 1,
                retry.max_infra_retries
            ),
        )
    } else {
        (JobState::Queued, format!("requeued: {reason}"))
    };
    NextState {
        state,
        reason,
        failures,
        infra_retries,
        not_before_ms: 0,
    }
}

/// A lease its claimer never received (the claim failed before it could
/// answer): back to the queue spending no budget, neither `max_attempts`
/// nor `max_infra_retries`, since no attempt ran; a requested cancel wins.
pub fn next_after_unsent_lease(
    failures: u32,
    infra_retries: u32,
    cancel_requested: bool,
    reason: &str,
) -> NextState {
    let (state, reason) = if cancel_requested {
        (JobState::Cancelled, format!("cancelled ({reason})"))
    } else {
        (JobState::Queued, format!("requeued: {reason}"))
    };
    NextState {
        state,
        reason,
        failures,
        infra_retries,
        not_before_ms: 0,
    }
}

/// An attempt the agent completed: SUCCEEDED; a failure or timeout retried
/// with backoff while `max_attempts` and `retry_on_exit_codes` allow; a
/// requested cancel turns any unsuccessful outcome into CANCELLED.
pub fn next_after_completion(
    retry: &RetryPolicy,
    failures: u32,
    infra_retries: u32,
    cancel_requested: bool,
    completion: &Completion,
    now_ms: i64,
) -> NextState {
    let c = completion;
    if c.outcome == OutcomeKind::Interrupted && !cancel_requested {
        return next_after_infra_loss(retry, failures, infra_retries, false, &c.reason);
    }
    let mut failures = failures;
    let mut not_before_ms = 0;
    let (state, reason) = match c.outcome {
        OutcomeKind::Succeeded => (JobState::Succeeded, c.reason.clone()),
        _ if cancel_requested => (JobState::Cancelled, format!("cancelled ({})", c.reason)),
        OutcomeKind::Cancelled | OutcomeKind::Interrupted => {
            (JobState::Cancelled, c.reason.clone())
        }
        OutcomeKind::Failed | OutcomeKind::TimedOut => {
            failures += 1;
            if failures < retry.max_attempts && retry.retries_exit_code(c.exit_code) {
                not_before_ms = now_ms + retry.backoff_ms(failures) as i64;
                (
                    JobState::Queued,
                    format!(
                        "{}; retrying (failure {failures} of {} allowed)",
                        c.reason, retry.max_attempts
                    ),
                )
            } else if c.outcome == OutcomeKind::TimedOut {
                (JobState::TimedOut, c.reason.clone())
            } else {
                (JobState::Failed, c.reason.clone())
            }
        }
    };
    NextState {
        state,
        reason,
        failures,
        infra_retries,
        not_before_ms,
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts the jobs as QUEUED, all or none. A job whose
    /// `idempotency_key` is already known is not inserted; the existing job
    /// is returned with `created = false`.
    async fn submit(&self, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<Vec<SubmittedJob>>;

    async fn get_job(&self, job_id: &str) -> StoreResult<Job>;

    /// Newest first. The cursor is opaque to callers.
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page<Job>>;

    async fn events(&self, job_id: &str) -> StoreResult<Vec<JobEvent>>;

    /// Leases up to `offer.max_jobs` QUEUED jobs of the offer's pool whose
    /// `not_before` has passed, in priority then FIFO order, skipping (not
    /// stopping at) jobs that do not fit the free resources or whose
    /// constraints the agent's labels do not meet. At most `scan_limit`
    /// candidates are examined. Each job is leased to at most one claimer;
    /// its `attempt` grows by one. A paused pool yields nothing. No job is
    /// left leased to a claimer that is not told: a claim the backend fails
    /// part-way answers with the leases it won (or, transactional, none
    /// were won) and is an error only when it won none.
    async fn claim(
        &self,
        offer: &ClaimOffer,
        scan_limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<ClaimedJob>>;

    /// LEASED → RUNNING. Fenced; idempotent when already RUNNING. The
    /// RUNNING event records `usd_per_hour`, the attempt's price on its
    /// agent when known (the base of cost estimates).
    async fn start(
        &self,
        lease: &LeaseRef,
        now_ms: i64,
        usd_per_hour: Option<f64>,
    ) -> StoreResult<()>;

    /// Fenced check only (for log appends).
    async fn check_lease(&self, lease: &LeaseRef) -> StoreResult<()>;

    /// Records the attempt's outcome exactly once and moves the job on:
    /// SUCCEEDED; FAILED/TIMED_OUT or back to QUEUED with backoff while
    /// `max_attempts` allows; CANCELLED; or, for interruptions, QUEUED on the
    /// infrastructure budget. A cancel request turns any unsuccessful outcome
    /// into CANCELLED. Repeating the same completion of the same lease returns
    /// the job's state again (idempotent); anything else on a lease no longer
    /// held is `LeaseLost`. Returns the job's state afterwards.
    ///
    /// Workflow jobs: in the same operation (as far as the backend allows;
    /// [`Store::release_pending`] is the backstop), SUCCEEDED decrements the
    /// dependency counter of every job of every step depending on this
    /// job's step and releases those that reach zero (PENDING → QUEUED,
    /// exactly once however many dependencies finish at the same moment);
    /// FAILED, CANCELLED or TIMED_OUT fails every PENDING dependent,
    /// transitively, with a reason starting `dependency_failed`
    /// ([`drover_proto::workflow::dependency_failed_reason`]). Every other
    /// path to those states (cancel, sessions ended or reaped with the infra
    /// budget spent, `cancel_run`) fails dependents the same way.
    async fn complete(
        &self,
        lease: &LeaseRef,
        completion: &Completion,
        now_ms: i64,
    ) -> StoreResult<Completed>;

    /// QUEUED/PENDING → CANCELLED at once; LEASED/RUNNING → cancel recorded
    /// on the job (the agent is told; a requeue cannot resurrect it).
    /// CANCELLED again is a no-op; other terminal states are a `Conflict`.
    async fn cancel(&self, job_id: &str, now_ms: i64) -> StoreResult<Job>;

    /// A terminal job back to QUEUED as a fresh run (failure counts reset).
    /// A SUCCEEDED workflow job is a `Conflict` (its dependents already
    /// counted it).
    async fn retry(&self, job_id: &str, now_ms: i64) -> StoreResult<Job>;

    /// Creates a workflow run and all its jobs, all or none: until it
    /// returns, neither the run nor any of its jobs is visible (get, list,
    /// claim). Jobs of steps without dependencies start QUEUED, the others
    /// PENDING with a counter of the jobs they wait for
    /// ([`drover_proto::workflow::dependency_count`]). Every job has
    /// `workflow` set. An existing run id is a `Conflict`.
    async fn create_run(&self, run: &RunRecord, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<()>;

    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord>;

    /// Newest first. The cursor is opaque to callers.
    async fn list_runs(&self, cursor: Option<&str>, limit: usize) -> StoreResult<Page<RunRecord>>;

    /// Marks the run cancelled and cancels every unfinished job as
    /// [`Store::cancel`] does, dependents before their dependencies, so a
    /// PENDING step ends CANCELLED rather than `dependency_failed`.
    /// Cancelling a finished or cancelled run again is a no-op.
    async fn cancel_run(&self, run_id: &str, now_ms: i64) -> StoreResult<RunRecord>;

    /// The jobs with these ids that exist, in the given order (redacted
    /// like `get_job`); missing ids are skipped.
    async fn get_jobs(&self, job_ids: &[String]) -> StoreResult<Vec<Job>>;

    /// The sweep behind dependency release: every PENDING workflow job whose
    /// dependencies all SUCCEEDED becomes QUEUED, and one with a dependency
    /// that ended FAILED, CANCELLED or TIMED_OUT becomes FAILED
    /// (`dependency_failed`). Decides from the dependencies' states, not the
    /// counters, so a completion interrupted between its writes cannot
    /// strand a step. Returns the pool of each job released to QUEUED.
    async fn release_pending(&self, now_ms: i64) -> StoreResult<Vec<String>>;

    async fn create_session(&self, session: &NewSession, now_ms: i64) -> StoreResult<()>;

    async fn session_auth(&self, session_id: &str) -> StoreResult<SessionAuth>;

    /// Resumes a live session (agent restart within the TTL): renews it and
    /// returns the leases it holds. `Conflict` when expired or gone.
    async fn resume_session(&self, session_id: &str, now_ms: i64) -> StoreResult<Vec<LeaseRef>>;

    /// Renews the session and reconciles the agent's view of its leases.
    /// The renewal is written lazily ([`renewal_due`]): heartbeats cost
    /// O(agents) writes per TTL, not one each. Fails with
    /// `NotFound`/`Conflict` when the session is unknown or gone.
    async fn heartbeat(
        &self,
        session_id: &str,
        running: &[LeaseRef],
        draining: bool,
        now_ms: i64,
    ) -> StoreResult<HeartbeatAnswer>;

    /// Ends a session (Leave, or expiry found by the reaper) and requeues its
    /// jobs on the infrastructure budget. Idempotent.
    async fn end_session(
        &self,
        session_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<EndedSession>;

    /// Live sessions whose expiry is before `before_ms`.
    async fn expired_sessions(&self, before_ms: i64) -> StoreResult<Vec<String>>;

    /// Number of live (not gone) sessions.
    async fn live_sessions(&self) -> StoreResult<u64>;

    /// Times out RUNNING jobs past `timeout + grace_ms` (counted as a
    /// failure, so retried while attempts remain) and requeues LEASED jobs
    /// not started within `start_deadline_ms`.
    async fn reap_jobs(
        &self,
        grace_ms: i64,
        start_deadline_ms: i64,
        now_ms: i64,
    ) -> StoreResult<ReapedJobs>;

    /// Asks the agent's live session(s) to drain. `NotFound` when none.
    async fn request_drain(&self, agent_id: &str, now_ms: i64) -> StoreResult<Agent>;

    /// Records on the session's agent what the coordinator did about it
    /// (e.g. terminated its instance as a zombie): [`Agent::note`], shown by
    /// `list_agents`. Replaces an earlier note. `NotFound` when the session
    /// is unknown.
    async fn note_agent(&self, session_id: &str, note: &str) -> StoreResult<()>;

    /// Agents with a live session, and those gone within `recent_ms`.
    async fn list_agents(&self, now_ms: i64, recent_ms: i64) -> StoreResult<Vec<Agent>>;

    async fn pools(&self, now_ms: i64) -> StoreResult<Vec<Pool>>;

    async fn set_pool_paused(&self, pool: &str, paused: bool) -> StoreResult<()>;

    async fn pool_capacity(&self, pool: &str) -> StoreResult<PoolCapacity>;

    /// What up to `limit` QUEUED jobs of `pool` (ready or waiting out a
    /// backoff) ask for: the scaler's demand. Leased jobs are not listed.
    async fn queued_needs(&self, pool: &str, limit: usize) -> StoreResult<Vec<JobNeeds>>;

    /// Sessions that expired (ended after their expiry, by the reaper or a
    /// late resume) between `since_ms` and `now_ms`; sessions whose agent
    /// left while live are not listed.
    async fn lost_sessions(&self, since_ms: i64, now_ms: i64) -> StoreResult<Vec<LostSession>>;

    /// Takes or renews the singleton lease `name` for `holder` until
    /// `now_ms + ttl_ms`. Granted when nobody holds it, when its holder's
    /// lease has expired (`expires_at_ms < now_ms`), or to its holder again
    /// (a renewal keeps the epoch); a new holder gets the epoch plus one.
    /// Atomic: of concurrent callers at most one is granted a live lease.
    /// `None` while another holder's lease is live.
    async fn try_acquire_leader(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: i64,
    ) -> StoreResult<Option<LeaderLease>>;

    /// Gives the lease up (shutdown) when `lease` still holds it, so another
    /// coordinator can take over at once; otherwise does nothing.
    async fn release_leader(&self, lease: &LeaderLease) -> StoreResult<()>;

    /// Every pool's scaler record, by pool: JSON the scaler wrote, opaque to
    /// the store.
    async fn scaler_states(&self) -> StoreResult<BTreeMap<String, String>>;

    /// Replaces the pool's scaler record. Fenced: applies only while the
    /// leader item still names `lease`'s holder and epoch (an expired lease
    /// nobody took over still holds); otherwise `Conflict`, nothing written.
    async fn put_scaler_state(
        &self,
        pool: &str,
        state: &str,
        lease: &LeaderLease,
    ) -> StoreResult<()>;
}
