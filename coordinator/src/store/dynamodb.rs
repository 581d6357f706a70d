//! The production store: one DynamoDB table (on-demand, TTL on `ttl`), shared
//! by any number of coordinators.
//!
//! # Layout
//!
//! | item | `pk` | `sk` | indexes |
//! |---|---|---|---|
//! | job state (small; every transition rewrites it) | `JOB#<id>` | `STATE` | gsi1 while QUEUED, gsi2 while LEASED/RUNNING or PENDING, gsi3 always (once published) |
//! | job spec (immutable, may be large) | `JOB#<id>` | `SPEC` | |
//! | event | `JOB#<id>` | `EV#<attempt:010>#<n:06>` | |
//! | workflow run (steps as JSON, cancel flag) | `RUN#<id>` | `RUN` | gsi3 once published; gsi2 `PENDING` / `RUN#<id>` until then |
//! | idempotency key | `IDEM#<key>` | `IDEM` | |
//! | session | `SESSION#<id>` | `SESSION` | gsi2 `SESSIONS` while live, `GONE#<day>` after |
//! | pool (paused, largest agent) | `POOL#<name>` | `POOL` | gsi2 `POOLS` |
//! | leader lease (scaler) | `LEADER#<name>` | `LEADER` | |
//! | scaler record of a pool | `SCALER` | `<pool>` | |
//! | lost session (expired, for zombie reaping) | `LOST#<day>` | `<ended ms>#<session>` | |
//! | listing horizon (jobs; runs) | `META` | `LISTING`; `RUNS` | |
//!
//! - **gsi1 (queue)**, projection INCLUDE of the claim attributes: ready jobs
//!   under `Q#<pool>#<shard>` / `<1e6 - priority:07>#<enqueued ms:013>#<id>`
//!   (priority, then FIFO); jobs waiting out a retry backoff under
//!   `D#<pool>#<shard>` / `<not_before ms:013>#<id>`, off the queue head.
//!   Claims promote due delayed jobs to `Q#` first.
//! - **gsi2 (owner)**, keys only: `S#<session>` / `<job id>` on leased jobs
//!   (heartbeats, reaper, end of session; always confirmed by consistent
//!   reads), `SESSIONS` / `<session id>` on live sessions, `POOLS` / `<name>`,
//!   `PENDING` / `<job id>` on PENDING workflow jobs and `PENDING` /
//!   `RUN#<run id>` on runs whose create has not finished publishing (the
//!   sweep reads both with one query).
//! - **gsi3 (listing)**, keys only: `L#<ULID day:06>` / `<job id>`; runs
//!   under their own partitions, `R#<ULID day:06>` / `<run id>`.
//!
//! # Writes and their cost
//!
//! A claim is one conditional `UpdateItem` of the job's state item
//! (`state = QUEUED AND attempt = :seen AND gsi1pk = :queue`) that removes
//! the queue keys, writes the lease and marks its `LEASED` event as owed
//! (`lev`); the next transition of the job (start, complete, requeue) writes
//! that event, number 0 of the new attempt, in its own transaction, and
//! readers of the events rebuild it from the state item until then. A lost
//! condition (another claimer won) moves on to the next candidate. A claim
//! cut short by an error (throttling outlasting the SDK's retries) answers
//! with the leases it won and fails only when it won none; leases whose
//! specs it then cannot read go back to the queue, in their place and
//! spending no budget, so no job stays leased to a claimer that never heard
//! of it.
//! Every other transition reads the state item consistently, decides, and
//! writes it back conditioned on its version (`ver`) together with its event;
//! a lost race re-reads and decides again. So a job's lifecycle costs four
//! write requests — submit (state + spec + event [+ idempotency key]), claim
//! (state only), start, complete (state + events each) — and events are
//! never lost or doubled. Event numbers are per attempt, so a claim needs no
//! read of the job.
//!
//! Every call is retried by the SDK on throttling and transient errors, with
//! backoff ([`crate::aws::retry_config`]; `dynamodb.max_attempts`), and
//! throttled answers are counted (`drover_dynamodb_throttled_total`).
//!
//! Heartbeats write only the session item (plus a job only when the agent's
//! report disagrees with the store), and read the session's leases through
//! gsi2 confirmed by one consistent `BatchGetItem`: O(agents) writes.
//!
//! The RUNNING event records the attempt's price (`usd_per_hour`) when known.
//!
//! # Workflows
//!
//! A workflow job's state item carries its link (`run`, `step`, `task`)
//! and, while PENDING, `deps`: how many of its dependency jobs have not yet
//! counted themselves as succeeded. A PENDING job is not in the queue index;
//! it sits in gsi2 `PENDING`, which nothing but the sweep reads.
//!
//! - **create_run.** When the run item and every job's items (state, spec,
//!   first event: QUEUED `submitted` for roots, PENDING `waiting for N jobs…`
//!   for the rest) fit in one `TransactWriteItems` (100 items: 33 jobs),
//!   they are one, the run item conditioned on its absence. Larger runs are
//!   written in phases: the jobs in transactions of 100 items *without index
//!   keys* and with a one-day expiry (`unpub`: invisible to get, list, claim
//!   and sweep); then the run item, the commit point, carrying the
//!   `PENDING` / `RUN#<id>` marker; then every job is published (index keys
//!   for its state, expiry dropped; dependents before their dependencies, so
//!   no root finishes before the jobs waiting for it are in place); then the
//!   marker makes way for the run's listing keys. A coordinator that dies
//!   before the run item leaves jobs nobody sees, which expire; one that dies
//!   after it leaves a marker, and the sweep publishes any run whose marker
//!   is over a minute old. An unpublished run is not found by `get_run`.
//! - **Success.** A completion that makes a workflow job SUCCEEDED reads the
//!   run item (consistently) for its dependents and, in its own transaction,
//!   decrements each one's `deps` (and bumps its `ver`, so no
//!   read-decide-write overwrites the count; conditioned only on the item
//!   existing) — up to 95 of them; more are decremented right after, in
//!   transactions of 100 (so the SDK's retries stay idempotent). Then one
//!   consistent `BatchGetItem` of the dependents, and those PENDING at zero
//!   are released (QUEUED `dependencies succeeded`, at the back of their
//!   priority) by writes conditioned on the version just read, many jobs per
//!   transaction: when two dependencies finish at once, both may see zero,
//!   one write wins and the other re-reads and finds it QUEUED. Their pools
//!   are `Completed::released`.
//! - **Failure.** Wherever a read-decide-write (`mutate`) moves a workflow
//!   job to FAILED, CANCELLED or TIMED_OUT — complete, cancel, a session
//!   ended or reaped on a spent infrastructure budget, the reaper — every
//!   PENDING dependent is failed (`dependency_failed…`, with its event),
//!   transitively: one `BatchGetItem` and one transaction per 50 jobs per
//!   dependent step.
//! - **The sweep** (`release_pending`): a coordinator can die between a
//!   completion and its follow-up writes. One gsi2 query of `PENDING` (empty:
//!   done); finish publishing stale runs; group the PENDING jobs by run and
//!   step, read each run item and the dependency jobs' states consistently,
//!   and decide from states, never the counters: all SUCCEEDED → QUEUED, one
//!   FAILED/CANCELLED/TIMED_OUT → FAILED, transitively. Every write is
//!   conditioned on a version, so sweeps, completions and other coordinators
//!   race safely.
//! - **cancel_run** sets the run's flag, then cancels every unfinished job as
//!   `cancel` does, step by step in `dependents_first` order (a transaction
//!   per 50 jobs), so a PENDING step ends CANCELLED, not `dependency_failed`.
//!
//! Plain jobs pay nothing for this. A workflow job's lifecycle costs what a
//! plain one does, the release taking the place of the submit: a three-step
//! chain is one `TransactWriteItems` for the run, then per job claim, start
//! and complete, plus one release per dependent step — 12 write requests,
//! like three plain jobs (`dynamodb/tests.rs` prints it).
//!
//! Reads that grow with the fleet: `expired_sessions`, `live_sessions`,
//! `reap_jobs`, `list_agents` and `pools` query gsi2 for live sessions (and
//! one gsi2 query per session); `pools` counts the queue partitions of gsi1.
//! These are admin and reaper paths, not per-job paths.
//!
//! # Retention
//!
//! A finished job's state item expires `retention` after it finished. Spec,
//! event, idempotency and run items are written with an expiry of
//! `retention + JOB_HORIZON` from their write: a job unfinished that long
//! loses its history (and a get of it fails loudly).

mod item;
mod scaler;
mod table;
#[cfg(test)]
pub(crate) mod tests;
mod workflows;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    Select, TransactWriteItem,
};
use aws_sdk_dynamodb::Client;
use base64::Engine;
use drover_proto::model::{
    Agent, AgentState, FieldError, Job, JobEvent, JobSpec, JobState, Pool, Resources, RetryPolicy,
    SubmittedJob,
};
use drover_proto::workflow::WorkflowLink;

use self::item::{b, get_b, get_n, get_s, key, n, req_n, req_s, s, Expr, Item};
pub use self::table::create_table;
use self::table::{LIST_INDEX, OWNER_INDEX, QUEUE_INDEX, TTL_ATTRIBUTE};
use super::renewal_due;
use super::{
    ClaimOffer, ClaimedJob, Completed, Completion, EndedSession, HeartbeatAnswer, JobFilter,
    JobNeeds, LeaderLease, LeaseRef, LostSession, NewJob, NewSession, OutcomeKind, Page,
    PoolCapacity, ReapedJobs, RunRecord, SessionAuth, Store, StoreError, StoreResult,
};
use crate::config::DynamoDbConfig;

const DAY_MS: i64 = 86_400_000;
/// How long spec, event and idempotency items outlive their write beyond the
/// retention period.
const JOB_HORIZON_MS: i64 = 90 * DAY_MS;
/// Optimistic-concurrency rounds before a transition gives up.
const MAX_RACES: usize = 32;
/// Items per `TransactWriteItems`.
const MAX_TX_ITEMS: usize = 100;
/// Queue-head reads per claim when every race of a round was lost.
const CLAIM_ROUNDS: usize = 8;
/// Gone sessions the reaper still re-scans for stragglers (index lag).
const GONE_RESCAN_MS: i64 = 10 * 60_000;

pub(crate) fn aws_err<E>(op: &str, e: SdkError<E>) -> StoreError
where
    E: std::error::Error + 'static,
{
    StoreError::Backend(format!("DynamoDB {op}: {}", DisplayErrorContext(&e)))
}

fn built<T, E: std::fmt::Display>(r: Result<T, E>) -> StoreResult<T> {
    r.map_err(|e| StoreError::Backend(format!("building a DynamoDB request: {e}")))
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Backend(format!("corrupt stored JSON: {e}"))
}

fn job_pk(id: &str) -> String {
    format!("JOB#{id}")
}

fn event_sk(attempt: u64, n: u64) -> String {
    format!("EV#{attempt:010}#{n:06}")
}

fn session_pk(id: &str) -> String {
    format!("SESSION#{id}")
}

fn pool_pk(name: &str) -> String {
    format!("POOL#{name}")
}

fn ttl_secs(at_ms: i64) -> AttributeValue {
    n(at_ms.div_euclid(1000))
}

fn lease_lost(lease: &LeaseRef) -> StoreError {
    StoreError::LeaseLost {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
        session_id: lease.session_id.clone(),
    }
}

fn parse_state(v: &str) -> StoreResult<JobState> {
    v.parse()
        .map_err(|_| StoreError::Backend(format!("unknown stored state {v:?}")))
}

/// The day (since the epoch) a ULID was minted: the listing partition.
fn id_day(id: &str, fallback_ms: i64) -> i64 {
    let ms = ulid::Ulid::from_string(id)
        .map(|u| u.timestamp_ms() as i64)
        .unwrap_or(fallback_ms);
    ms.div_euclid(DAY_MS)
}

fn shard_of(id: &str, shards: u32) -> u32 {
    // FNV-1a: stable across processes and versions.
    let mut h: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        h ^= byte as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

/// The job state item, decoded.
#[derive(Debug, Clone)]
struct JobRow {
    id: String,
    pool: String,
    name: String,
    priority: i32,
    state: JobState,
    attempt: u64,
    failures: u32,
    infra_retries: u32,
    created_at_ms: i64,
    updated_at_ms: i64,
    /// 0 when none.
    not_before_ms: i64,
    /// When the job last entered the queue (FIFO key).
    enqueued_at_ms: i64,
    session_id: Option<String>,
    agent_id: Option<String>,
    leased_at_ms: Option<i64>,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    exit_code: Option<i32>,
    reason: Option<String>,
    cancel_requested: bool,
    missed_reports: u32,
    /// Next event number within the current attempt.
    next_event: u64,
    /// Bumped by every write: the optimistic lock.
    version: u64,
    /// The claim wrote no event; the next transition writes its `LEASED`
    /// event (number 0 of the attempt) in the same transaction.
    lease_event_pending: bool,
    resources: Resources,
    constraints: BTreeMap<String, String>,
    retry: RetryPolicy,
    timeout_secs: u64,
    shard: u32,
    /// The recorded outcome of the last completed attempt:
    /// (attempt, session, outcome, exit code).
    done: Option<(u64, String, String, Option<i32>)>,
    /// The workflow run and step of a workflow job.
    workflow: Option<WorkflowLink>,
    /// While PENDING: how many dependency jobs have not yet reported success
    /// (a counter: only a hint of when to look; releases check state).
    deps: i64,
    /// Written by a chunked `create_run` that has not yet published it:
    /// no index keys, and a short expiry from this time.
    unpublished_at_ms: Option<i64>,
}

impl JobRow {
    fn holds(&self, lease: &LeaseRef) -> bool {
        self.attempt == lease.attempt
            && self.session_id.as_deref() == Some(lease.session_id.as_str())
            && matches!(self.state, JobState::Leased | JobState::Running)
    }

    fn from_item(item: &Item) -> StoreResult<JobRow> {
        let resources = Resources {
            cpu_millis: req_n(item, "cpu")?,
            memory_mib: req_n(item, "mem")?,
            gpus: req_n(item, "gpus")?,
            disk_gib: req_n(item, "disk")?,
            gpu_model: get_s(item, "gmodel").map(str::to_string),
        };
        let done = match get_n::<u64>(item, "done_attempt") {
            Some(attempt) => Some((
                attempt,
                req_s(item, "done_session")?,
                req_s(item, "done_outcome")?,
                get_n(item, "done_exit"),
            )),
            None => None,
        };
        Ok(JobRow {
            id: req_s(item, "id")?,
            pool: req_s(item, "pool")?,
            name: get_s(item, "name").unwrap_or_default().to_string(),
            priority: req_n(item, "prio")?,
            state: parse_state(&req_s(item, "state")?)?,
            attempt: req_n(item, "attempt")?,
            failures: req_n(item, "failures")?,
            infra_retries: req_n(item, "infra")?,
            created_at_ms: req_n(item, "created")?,
            updated_at_ms: req_n(item, "updated")?,
            not_before_ms: get_n(item, "nb").unwrap_or(0),
            enqueued_at_ms: get_n(item, "enq").unwrap_or(0),
            session_id: get_s(item, "sid").map(str::to_string),
            agent_id: get_s(item, "agent").map(str::to_string),
            leased_at_ms: get_n(item, "leased_at"),
            started_at_ms: get_n(item, "started"),
            finished_at_ms: get_n(item, "finished"),
            exit_code: get_n(item, "exit"),
            reason: get_s(item, "reason").map(str::to_string),
            cancel_requested: get_b(item, "cancel"),
            missed_reports: get_n(item, "missed").unwrap_or(0),
            next_event: req_n(item, "evn")?,
            version: req_n(item, "ver")?,
            lease_event_pending: get_b(item, "lev"),
            resources,
            constraints: constraints_of(item),
            retry: serde_json::from_str(&req_s(item, "retry")?).map_err(json_err)?,
            timeout_secs: get_n(item, "timeout").unwrap_or(0),
            shard: get_n(item, "shard").unwrap_or(0),
            done,
            workflow: match get_s(item, "run") {
                Some(run_id) => Some(WorkflowLink {
                    run_id: run_id.to_string(),
                    step: req_s(item, "step")?,
                    task_index: get_n(item, "task"),
                }),
                None => None,
            },
            deps: get_n(item, "deps").unwrap_or(0),
            unpublished_at_ms: get_n(item, "unpub"),
        })
    }

    fn to_item(&self, retention_ms: i64) -> StoreResult<Item> {
        let mut item = key(job_pk(&self.id), "STATE");
        let mut put = |k: &str, v: AttributeValue| {
            item.insert(k.to_string(), v);
        };
        put("id", s(&self.id));
        put("pool", s(&self.pool));
        put("name", s(&self.name));
        put("prio", n(self.priority));
        put("state", s(self.state.as_str()));
        put("attempt", n(self.attempt));
        put("failures", n(self.failures));
        put("infra", n(self.infra_retries));
        put("created", n(self.created_at_ms));
        put("updated", n(self.updated_at_ms));
        put("nb", n(self.not_before_ms));
        put("enq", n(self.enqueued_at_ms));
        if let Some(v) = &self.session_id {
            put("sid", s(v));
        }
        if let Some(v) = &self.agent_id {
            put("agent", s(v));
        }
        if let Some(v) = self.leased_at_ms {
            put("leased_at", n(v));
        }
        if let Some(v) = self.started_at_ms {
            put("started", n(v));
        }
        if let Some(v) = self.finished_at_ms {
            put("finished", n(v));
        }
        if let Some(v) = self.exit_code {
            put("exit", n(v));
        }
        if let Some(v) = &self.reason {
            put("reason", s(v));
        }
        put("cancel", b(self.cancel_requested));
        put("missed", n(self.missed_reports));
        put("evn", n(self.next_event));
        put("ver", n(self.version));
        if self.lease_event_pending {
            put("lev", b(true));
        }
        put("cpu", n(self.resources.cpu_millis));
        put("mem", n(self.resources.memory_mib));
        put("gpus", n(self.resources.gpus));
        put("disk", n(self.resources.disk_gib));
        if let Some(v) = &self.resources.gpu_model {
            put("gmodel", s(v));
        }
        if !self.constraints.is_empty() {
            put(
                "cons",
                AttributeValue::M(
                    self.constraints
                        .iter()
                        .map(|(k, v)| (k.clone(), s(v)))
                        .collect(),
                ),
            );
        }
        put(
            "retry",
            s(serde_json::to_string(&self.retry).map_err(json_err)?),
        );
        put("timeout", n(self.timeout_secs));
        put("shard", n(self.shard));
        if let Some((attempt, session, outcome, exit)) = &self.done {
            put("done_attempt", n(attempt));
            put("done_session", s(session));
            put("done_outcome", s(outcome));
            if let Some(exit) = exit {
                put("done_exit", n(exit));
            }
        }
        if let Some(link) = &self.workflow {
            put("run", s(&link.run_id));
            put("step", s(&link.step));
            if let Some(task) = link.task_index {
                put("task", n(task));
            }
            if self.state == JobState::Pending {
                put("deps", n(self.deps));
            }
        }
        if let Some(at) = self.unpublished_at_ms {
            // Invisible to claims, listings and sweeps until published.
            put("unpub", n(at));
            put(TTL_ATTRIBUTE, ttl_secs(at + workflows::UNPUBLISHED_TTL_MS));
            return Ok(item);
        }
        match self.state {
            JobState::Queued if self.not_before_ms > self.enqueued_at_ms => {
                put("gsi1pk", s(self.delayed_partition()));
                put(
                    "gsi1sk",
                    s(format!("{:013}#{}", self.not_before_ms, self.id)),
                );
            }
            JobState::Queued => {
                put("gsi1pk", s(self.queue_partition()));
                put(
                    "gsi1sk",
                    s(queue_sort_key(self.priority, self.enqueued_at_ms, &self.id)),
                );
            }
            JobState::Leased | JobState::Running => {
                if let Some(sid) = &self.session_id {
                    put("gsi2pk", s(format!("S#{sid}")));
                    put("gsi2sk", s(&self.id));
                }
            }
            JobState::Pending => {
                put("gsi2pk", s(workflows::PENDING_PARTITION));
                put("gsi2sk", s(&self.id));
            }
            _ => {}
        }
        put(
            "gsi3pk",
            s(format!("L#{:06}", id_day(&self.id, self.created_at_ms))),
        );
        put("gsi3sk", s(&self.id));
        if let (true, Some(finished)) = (self.state.is_terminal(), self.finished_at_ms) {
            put(TTL_ATTRIBUTE, ttl_secs(finished + retention_ms));
        }
        Ok(item)
    }

    /// The `LEASED` event a claim deferred, rebuilt from the row.
    fn pending_lease_event(&self) -> Option<JobEvent> {
        if !self.lease_event_pending {
            return None;
        }
        Some(JobEvent {
            seq: 0,
            at_ms: self.leased_at_ms.unwrap_or(self.updated_at_ms),
            attempt: self.attempt,
            state: JobState::Leased,
            agent_id: self.agent_id.clone(),
            reason: format!(
                "leased to session {}",
                self.session_id.as_deref().unwrap_or("?")
            ),
            usd_per_hour: None,
        })
    }

    fn queue_partition(&self) -> String {
        format!("Q#{}#{}", self.pool, self.shard)
    }

    fn delayed_partition(&self) -> String {
        format!("D#{}#{}", self.pool, self.shard)
    }

    fn to_job(&self, spec: JobSpec) -> Job {
        Job {
            id: self.id.clone(),
            spec: spec.redacted(),
            state: self.state,
            attempt: self.attempt,
            failures: self.failures,
            infra_retries: self.infra_retries,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            not_before_ms: (self.not_before_ms > 0).then_some(self.not_before_ms),
            session_id: self.session_id.clone(),
            agent_id: self.agent_id.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            exit_code: self.exit_code,
            reason: self.reason.clone(),
            cancel_requested: self.cancel_requested,
            workflow: self.workflow.clone(),
            cost_usd: None,
        }
    }

    /// Back to the queue on the infrastructure budget, or ended when the
    /// budget is spent or a cancel was requested.
    fn requeue_infra(&mut self, reason: &str, now_ms: i64) -> Transition {
        let next = super::next_after_infra_loss(
            &self.retry,
            self.failures,
            self.infra_retries,
            self.cancel_requested,
            reason,
        );
        self.apply(next, None, now_ms)
    }

    /// Records a held lease's outcome and moves the job on (`Store::complete`).
    fn complete(&mut self, lease: &LeaseRef, c: &Completion, now_ms: i64) -> Transition {
        self.done = Some((
            lease.attempt,
            lease.session_id.clone(),
            c.outcome.as_str().to_string(),
            c.exit_code,
        ));
        let next = super::next_after_completion(
            &self.retry,
            self.failures,
            self.infra_retries,
            self.cancel_requested,
            c,
            now_ms,
        );
        let requeued_on_infra = next.infra_retries != self.infra_retries;
        self.apply(next, (!requeued_on_infra).then_some(c.exit_code), now_ms)
    }

    /// Moves the item to `next`: out of the lease, back in the queue or done.
    fn apply(
        &mut self,
        next: super::NextState,
        exit_code: Option<Option<i32>>,
        now_ms: i64,
    ) -> Transition {
        let terminal = next.state.is_terminal();
        self.state = next.state;
        self.failures = next.failures;
        self.infra_retries = next.infra_retries;
        self.updated_at_ms = now_ms;
        self.not_before_ms = next.not_before_ms;
        self.enqueued_at_ms = now_ms;
        self.missed_reports = 0;
        if let Some(code) = exit_code {
            self.exit_code = code;
        }
        self.reason = Some(next.reason.clone());
        self.finished_at_ms = terminal.then_some(now_ms);
        if !terminal {
            self.session_id = None;
            self.started_at_ms = None;
        }
        Transition::event(next.state, self.agent_id.clone(), next.reason)
    }
}

fn queue_sort_key(priority: i32, enqueued_at_ms: i64, id: &str) -> String {
    format!(
        "{:07}#{enqueued_at_ms:013}#{id}",
        1_000_000i64 - priority as i64
    )
}

fn constraints_of(item: &Item) -> BTreeMap<String, String> {
    item.get("cons")
        .and_then(|v| v.as_m().ok())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_s().ok()?.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// What a read-decide-write step does to a job.
struct Transition {
    event: Option<(JobState, Option<String>, String)>,
    /// Recorded on the event (RUNNING: the attempt's price).
    usd_per_hour: Option<f64>,
}

impl Transition {
    fn event(state: JobState, agent: Option<String>, reason: String) -> Transition {
        Transition {
            event: Some((state, agent, reason)),
            usd_per_hour: None,
        }
    }
    fn silent() -> Transition {
        Transition {
            event: None,
            usd_per_hour: None,
        }
    }
}

enum Step<T> {
    /// Nothing to write.
    Keep(T),
    Write(T, Transition),
}

/// Why a `TransactWriteItems` did not apply.
enum TxError {
    /// Cancelled: the per-item reason codes (`None` where the item was fine).
    Cancelled(Vec<Option<String>>),
    Other(StoreError),
}

/// A DynamoDB-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
    retention_ms: i64,
    shards: u32,
    /// Pools this process has recorded a pool item for.
    known_pools: Arc<Mutex<HashSet<String>>>,
    /// Whether this process has recorded the listing horizon.
    listing_marked: Arc<AtomicBool>,
    /// Whether this process has recorded the runs' listing horizon.
    runs_marked: Arc<AtomicBool>,
}

/// An HTTPS client on rustls with ring (no aws-lc build), also fine for
/// plain-HTTP endpoints such as a local emulator.
pub fn https_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// A DynamoDB client from the standard AWS chain (env, profile, IMDS, ECS),
/// pointed at `config.endpoint` when set.
pub async fn client_from_config(config: &DynamoDbConfig) -> Client {
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(https_client());
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Client::from_conf(tuned(builder, shared.retry_config(), config).build())
}

/// Settings every DynamoDB client of the store gets: explicit retries with
/// backoff for throttling and transient errors ([`crate::aws::retry_config`]
/// over the AWS chain's `chain`), and the throttle counter.
pub(crate) fn tuned(
    builder: aws_sdk_dynamodb::config::Builder,
    chain: Option<&aws_config::retry::RetryConfig>,
    config: &DynamoDbConfig,
) -> aws_sdk_dynamodb::config::Builder {
    builder
        .retry_config(crate::aws::retry_config(chain, config.max_attempts))
        .interceptor(crate::aws::ThrottleCounter)
}

impl DynamoStore {
    /// Connects with the standard AWS chain; creates the table first when
    /// `config.create_table` is set (dev and test setups).
    pub async fn connect(config: &DynamoDbConfig) -> StoreResult<DynamoStore> {
        let client = client_from_config(config).await;
        if config.create_table {
            create_table(&client, &config.table).await?;
        }
        Ok(DynamoStore::new(client, config))
    }

    pub fn new(client: Client, config: &DynamoDbConfig) -> DynamoStore {
        DynamoStore {
            client,
            table: config.table.as_str().into(),
            retention_ms: config.retention_days as i64 * DAY_MS,
            shards: config.queue_shards.max(1),
            known_pools: Arc::default(),
            listing_marked: Arc::default(),
            runs_marked: Arc::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn horizon_ttl(&self, now_ms: i64) -> AttributeValue {
        ttl_secs(now_ms + self.retention_ms + JOB_HORIZON_MS)
    }

    // ---- low-level calls ----

    async fn get(&self, pk: String, sk: &str) -> StoreResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| aws_err("GetItem", e))?;
        Ok(out.item)
    }

    /// `BatchGetItem` in chunks of 100, retrying unprocessed keys.
    async fn batch_get(&self, keys: Vec<Item>, consistent: bool) -> StoreResult<Vec<Item>> {
        let mut out = Vec::with_capacity(keys.len());
        let mut seen = HashSet::new();
        let keys: Vec<Item> = keys
            .into_iter()
            .filter(|k| {
                seen.insert((
                    get_s(k, "pk").unwrap_or_default().to_string(),
                    get_s(k, "sk").unwrap_or_default().to_string(),
                ))
            })
            .collect();
        for chunk in keys.chunks(100) {
            let mut pending = Some(built(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(consistent)
                    .build(),
            )?);
            let mut rounds = 0;
            while let Some(request) = pending.take() {
                rounds += 1;
                if rounds > 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(20 * rounds.min(50))).await;
                }
                let resp = self
                    .client
                    .batch_get_item()
                    .request_items(&*self.table, request)
                    .send()
                    .await
                    .map_err(|e| aws_err("BatchGetItem", e))?;
                if let Some(mut items) = resp.responses {
                    out.extend(items.remove(&*self.table).unwrap_or_default());
                }
                pending = resp
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&*self.table))
                    .filter(|k| !k.keys().is_empty());
            }
        }
        Ok(out)
    }

    /// Every page of a query on `index` for `pk` (optionally `sk < before`).
    async fn query_index(
        &self,
        index: &str,
        pk_attr: &str,
        pk: String,
        sk_below: Option<(&str, String)>,
    ) -> StoreResult<Vec<Item>> {
        let mut expr = Expr::new();
        let mut cond = format!("{} = {}", expr.name(pk_attr), expr.value(s(pk)));
        if let Some((sk_attr, below)) = sk_below {
            cond.push_str(&format!(
                " AND {} < {}",
                expr.name(sk_attr),
                expr.value(s(below))
            ));
        }
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let resp = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(index)
                .key_condition_expression(&cond)
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| aws_err("Query", e))?;
            out.extend(resp.items.unwrap_or_default());
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    async fn count_index(&self, index: &str, pk_attr: &str, pk: String) -> StoreResult<u64> {
        let mut expr = Expr::new();
        let cond = format!("{} = {}", expr.name(pk_attr), expr.value(s(pk)));
        let mut total = 0u64;
        let mut start = None;
        loop {
            let resp = self
                .client
                .query()
                .table_name(&*self.table)
                .index_name(index)
                .key_condition_expression(&cond)
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .select(Select::Count)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| aws_err("Query", e))?;
            total += resp.count.max(0) as u64;
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(total),
            }
        }
    }

    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<(), TxError> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c)) =
                    e.as_service_error()
                {
                    let reasons = c
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().filter(|c| *c != "None").map(str::to_string))
                        .collect();
                    return Err(TxError::Cancelled(reasons));
                }
                Err(TxError::Other(aws_err("TransactWriteItems", e)))
            }
        }
    }

    fn put(&self, item: Item, expr: Option<Expr>) -> StoreResult<TransactWriteItem> {
        let mut put = Put::builder().table_name(&*self.table).set_item(Some(item));
        if let Some(expr) = expr {
            put = put
                .set_condition_expression(expr.condition())
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values());
        }
        Ok(TransactWriteItem::builder()
            .put(built(put.build())?)
            .build())
    }

    /// `UpdateItem`; `Ok(None)` when the condition failed.
    async fn update_item(
        &self,
        key: Item,
        expr: &Expr,
        returns: ReturnValue,
    ) -> StoreResult<Option<Item>> {
        Ok(self
            .update_item_or_old(key, expr, returns, false)
            .await?
            .ok())
    }

    /// `UpdateItem`; `Ok(Err(old))` when the condition failed, with the item
    /// as it was then when `old_on_failure` asks for it.
    async fn update_item_or_old(
        &self,
        key: Item,
        expr: &Expr,
        returns: ReturnValue,
        old_on_failure: bool,
    ) -> StoreResult<Result<Item, Option<Item>>> {
        let resp = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key))
            .update_expression(expr.update_expression())
            .set_condition_expression(expr.condition())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .return_values(returns)
            .set_return_values_on_condition_check_failure(
                old_on_failure.then_some(ReturnValuesOnConditionCheckFailure::AllOld),
            )
            .send()
            .await;
        match resp {
            Ok(out) => Ok(Ok(out.attributes.unwrap_or_default())),
            Err(e) => match e.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    Ok(Err(failed.item.clone()))
                }
                _ => Err(aws_err("UpdateItem", e)),
            },
        }
    }

    fn event_item(
        &self,
        job_id: &str,
        attempt: u64,
        number: u64,
        now_ms: i64,
        (state, agent, reason): (JobState, Option<String>, String),
    ) -> Item {
        let mut item = key(job_pk(job_id), event_sk(attempt, number));
        item.insert("at".into(), n(now_ms));
        item.insert("attempt".into(), n(attempt));
        item.insert("state".into(), s(state.as_str()));
        if let Some(agent) = agent {
            item.insert("agent".into(), s(agent));
        }
        item.insert("reason".into(), s(reason));
        item.insert(TTL_ATTRIBUTE.into(), self.horizon_ttl(now_ms));
        item
    }

    async fn load_row(&self, job_id: &str) -> StoreResult<Option<JobRow>> {
        self.get(job_pk(job_id), "STATE")
            .await?
            .map(|item| JobRow::from_item(&item))
            .transpose()
    }

    async fn load_rows(&self, ids: &[String]) -> StoreResult<HashMap<String, JobRow>> {
        let keys = ids.iter().map(|id| key(job_pk(id), "STATE")).collect();
        let mut rows = HashMap::new();
        for item in self.batch_get(keys, true).await? {
            let row = JobRow::from_item(&item)?;
            rows.insert(row.id.clone(), row);
        }
        Ok(rows)
    }

    async fn load_specs(&self, ids: &[String]) -> StoreResult<HashMap<String, JobSpec>> {
        let keys = ids.iter().map(|id| key(job_pk(id), "SPEC")).collect();
        let mut specs = HashMap::new();
        for item in self.batch_get(keys, true).await? {
            let id = req_s(&item, "id")?;
            let spec = serde_json::from_str(&req_s(&item, "spec")?).map_err(json_err)?;
            specs.insert(id, spec);
        }
        Ok(specs)
    }

    async fn load_job(&self, job_id: &str) -> StoreResult<Job> {
        let id = [job_id.to_string()];
        let row = self
            .load_rows(&id)
            .await?
            .remove(job_id)
            .filter(|r| r.unpublished_at_ms.is_none())
            .ok_or_else(|| StoreError::NotFound(format!("job {job_id}")))?;
        let spec = self.load_specs(&id).await?.remove(job_id).ok_or_else(|| {
            StoreError::Backend(format!("job {job_id} has no spec item (expired?)"))
        })?;
        Ok(row.to_job(spec))
    }

    /// Read, decide with `f`, write the state item back conditioned on its
    /// version together with the transition's event; re-run on a lost race.
    /// A workflow job's dependents hear of its end ([`Self::mutate_settling`]).
    async fn mutate<T, F>(&self, job_id: &str, f: F) -> StoreResult<T>
    where
        F: FnMut(&mut JobRow) -> StoreResult<Step<T>>,
    {
        Ok(self.mutate_settling(job_id, f).await?.0)
    }

    /// `mutate`, plus what the write means for a workflow job's dependents:
    /// a success counts them down in the same transaction (when they fit)
    /// and then releases those whose counter reached zero; a FAILED,
    /// CANCELLED or TIMED_OUT end fails the PENDING ones, transitively.
    /// Returns the pools of the jobs released. Plain jobs cost nothing more.
    async fn mutate_settling<T, F>(&self, job_id: &str, mut f: F) -> StoreResult<(T, Vec<String>)>
    where
        F: FnMut(&mut JobRow) -> StoreResult<Step<T>>,
    {
        // The run, read once (consistently) when a success needs it.
        let mut run: Option<Option<RunRecord>> = None;
        // Dependents whose item no longer exists (expired): not counted.
        let mut gone: HashSet<String> = HashSet::new();
        for _ in 0..MAX_RACES {
            let row = self
                .load_row(job_id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("job {job_id}")))?;
            let mut next = row.clone();
            let (out, transition) = match f(&mut next)? {
                Step::Keep(out) => return Ok((out, Vec::new())),
                Step::Write(out, transition) => (out, transition),
            };
            next.version = row.version + 1;
            let mut items = self.transition_items(&row, &mut next, transition)?;
            let mut counted: Vec<String> = Vec::new();
            let mut uncounted: Vec<String> = Vec::new();
            if let (Some(link), Some(JobState::Succeeded)) =
                (&next.workflow, workflows::ended(&row, &next))
            {
                if run.is_none() {
                    run = Some(self.load_run(&link.run_id).await?.map(|r| r.run));
                }
                let dependents: Vec<String> = run
                    .iter()
                    .flatten()
                    .flat_map(|r| workflows::dependents(&r.steps, &link.step))
                    .filter(|d| !gone.contains(d))
                    .collect();
                if dependents.len() <= workflows::INLINE_DEPENDENTS {
                    for d in &dependents {
                        items.push(self.count_down_item(d)?);
                    }
                    counted = dependents;
                } else {
                    uncounted = dependents;
                }
            }
            let first_counted = items.len() - counted.len();
            match self.transact(items).await {
                Ok(()) => {
                    let released = self
                        .settle(&row, &next, run.flatten(), counted, uncounted)
                        .await;
                    return Ok((out, released));
                }
                Err(TxError::Cancelled(reasons)) => {
                    for (reason, id) in reasons.iter().skip(first_counted).zip(&counted) {
                        if reason.as_deref() == Some("ConditionalCheckFailed") {
                            gone.insert(id.clone());
                        }
                    }
                    continue;
                }
                Err(TxError::Other(e)) => return Err(e),
            }
        }
        Err(StoreError::Backend(format!(
            "job {job_id}: gave up after {MAX_RACES} concurrent updates"
        )))
    }

    /// The transaction items of one transition, `row` → `next` (whose
    /// version is already bumped): the state item conditioned on `row`'s
    /// version first, then a deferred LEASED event and the transition's.
    fn transition_items(
        &self,
        row: &JobRow,
        next: &mut JobRow,
        transition: Transition,
    ) -> StoreResult<Vec<TransactWriteItem>> {
        let mut items = Vec::with_capacity(3);
        if let Some(lease) = row.pending_lease_event() {
            next.lease_event_pending = false;
            items.push(self.put(
                self.event_item(
                    &row.id,
                    row.attempt,
                    0,
                    lease.at_ms,
                    (lease.state, lease.agent_id, lease.reason),
                ),
                None,
            )?);
        }
        if let Some(event) = transition.event {
            if next.attempt != row.attempt {
                next.next_event = 0;
            }
            let number = next.next_event;
            next.next_event += 1;
            let mut item =
                self.event_item(&row.id, next.attempt, number, next.updated_at_ms, event);
            if let Some(price) = transition.usd_per_hour.filter(|p| p.is_finite()) {
                item.insert("usd_per_hour".into(), n(price));
            }
            items.push(self.put(item, None)?);
        }
        let mut cond = Expr::new();
        cond.when_eq("ver", n(row.version));
        items.insert(0, self.put(next.to_item(self.retention_ms)?, Some(cond))?);
        Ok(items)
    }

    /// Jobs the index says `session_id` holds, confirmed by consistent reads.
    async fn held_by(&self, session_id: &str) -> StoreResult<Vec<JobRow>> {
        let ids: Vec<String> = self
            .query_index(OWNER_INDEX, "gsi2pk", format!("S#{session_id}"), None)
            .await?
            .iter()
            .filter_map(|i| get_s(i, "gsi2sk").map(str::to_string))
            .collect();
        let mut rows: Vec<JobRow> = self
            .load_rows(&ids)
            .await?
            .into_values()
            .filter(|r| {
                r.session_id.as_deref() == Some(session_id)
                    && matches!(r.state, JobState::Leased | JobState::Running)
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    /// Requeues (or ends) a job while `lease` still holds it. `None` when it
    /// no longer does.
    async fn requeue_lease(
        &self,
        lease: &LeaseRef,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Option<JobState>> {
        let result = self
            .mutate(&lease.job_id, |row| {
                if !row.holds(lease) {
                    return Ok(Step::Keep(None));
                }
                let t = row.requeue_infra(reason, now_ms);
                Ok(Step::Write(Some(row.state), t))
            })
            .await;
        match result {
            Err(StoreError::NotFound(_)) => Ok(None),
            other => other,
        }
    }

    /// Session items under a gsi2 partition, read consistently.
    async fn sessions_in(&self, partition: String) -> StoreResult<Vec<Item>> {
        let keys = self
            .query_index(OWNER_INDEX, "gsi2pk", partition, None)
            .await?
            .iter()
            .filter_map(|i| get_s(i, "pk").map(|pk| key(pk, "SESSION")))
            .collect();
        self.batch_get(keys, true).await
    }

    async fn live_session_items(&self) -> StoreResult<Vec<Item>> {
        Ok(self
            .sessions_in("SESSIONS".into())
            .await?
            .into_iter()
            .filter(|i| !get_b(i, "gone"))
            .collect())
    }

    /// Live sessions and those gone since `since_ms`.
    async fn sessions_since(&self, since_ms: i64, now_ms: i64) -> StoreResult<Vec<Item>> {
        let mut out = self.live_session_items().await?;
        let mut day = since_ms.div_euclid(DAY_MS);
        while day <= now_ms.div_euclid(DAY_MS) {
            out.extend(
                self.sessions_in(format!("GONE#{day:06}"))
                    .await?
                    .into_iter()
                    .filter(|i| {
                        get_b(i, "gone") && get_n::<i64>(i, "ended").unwrap_or(0) >= since_ms
                    }),
            );
            day += 1;
        }
        Ok(out)
    }

    async fn agent_of(&self, item: &Item, now_ms: i64) -> StoreResult<Agent> {
        let session_id = req_s(item, "session_id")?;
        let expires: i64 = req_n(item, "expires")?;
        let state = if get_b(item, "gone") || expires < now_ms {
            AgentState::Gone
        } else if get_b(item, "draining") || get_b(item, "drain_requested") {
            AgentState::Draining
        } else {
            AgentState::Active
        };
        let running = self
            .count_index(OWNER_INDEX, "gsi2pk", format!("S#{session_id}"))
            .await?;
        Ok(Agent {
            agent_id: req_s(item, "agent_id")?,
            session_id,
            pool: req_s(item, "pool")?,
            hostname: req_s(item, "hostname")?,
            labels: serde_json::from_str(&req_s(item, "labels")?).map_err(json_err)?,
            capacity: serde_json::from_str(&req_s(item, "capacity")?).map_err(json_err)?,
            runtime: req_s(item, "runtime")?,
            version: req_s(item, "version")?,
            state,
            registered_at_ms: req_n(item, "created")?,
            last_heartbeat_ms: req_n(item, "last_heartbeat")?,
            running: running as u32,
            health_addr: get_s(item, "health_addr").unwrap_or_default().to_string(),
            note: get_s(item, "note").map(str::to_string),
        })
    }

    /// Records a pool item the first time this process sees the pool, so
    /// `pools()` lists pools that have jobs but never had an agent.
    async fn note_pools(&self, pools: impl Iterator<Item = &str>) -> StoreResult<()> {
        let new: Vec<String> = {
            let known = self
                .known_pools
                .lock()
                .map_err(|_| StoreError::Backend("pool cache poisoned".into()))?;
            pools
                .filter(|p| !known.contains(*p))
                .map(str::to_string)
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        for pool in new {
            let mut expr = Expr::new();
            expr.set("name", s(&pool))
                .set("gsi2pk", s("POOLS"))
                .set("gsi2sk", s(&pool));
            self.update_item(key(pool_pk(&pool), "POOL"), &expr, ReturnValue::None)
                .await?;
            if let Ok(mut known) = self.known_pools.lock() {
                known.insert(pool);
            }
        }
        Ok(())
    }

    /// Records the first day that holds jobs (the listing walks back to it).
    async fn mark_listing(&self, day: i64) -> StoreResult<()> {
        self.mark_first_day("LISTING", &self.listing_marked, day)
            .await
    }

    /// Records `day` as the first of the listing `sk` (`META` / `sk`) unless
    /// one is recorded already; once per process (`marked`).
    async fn mark_first_day(&self, sk: &str, marked: &AtomicBool, day: i64) -> StoreResult<()> {
        if marked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut expr = Expr::new();
        let first = expr.name("first_day");
        let value = expr.value(n(day));
        expr.set_raw("first_day", format!("if_not_exists({first}, {value})"));
        self.update_item(key("META", sk), &expr, ReturnValue::None)
            .await?;
        marked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Moves delayed jobs whose backoff has passed to the ready queue.
    async fn promote_due(&self, pool: &str, shard: u32, now_ms: i64) -> StoreResult<()> {
        let due = self
            .query_index(
                QUEUE_INDEX,
                "gsi1pk",
                format!("D#{pool}#{shard}"),
                Some(("gsi1sk", format!("{:013}", now_ms + 1))),
            )
            .await?;
        for item in due {
            let (Some(pk), Some(attempt), Some(prio), Some(nb)) = (
                get_s(&item, "pk"),
                get_n::<u64>(&item, "attempt"),
                get_n::<i32>(&item, "prio"),
                get_n::<i64>(&item, "nb"),
            ) else {
                continue;
            };
            let id = pk.trim_start_matches("JOB#");
            let mut expr = Expr::new();
            expr.set("gsi1pk", s(format!("Q#{pool}#{shard}")))
                .set("gsi1sk", s(queue_sort_key(prio, nb, id)))
                .set("enq", n(nb))
                .when_eq("state", s(JobState::Queued.as_str()))
                .when_eq("attempt", n(attempt))
                .when_eq("gsi1pk", s(format!("D#{pool}#{shard}")));
            let ver = expr.name("ver");
            let one = expr.value(n(1));
            expr.set_raw("ver", format!("{ver} + {one}"));
            self.update_item(key(pk, "STATE"), &expr, ReturnValue::None)
                .await?;
        }
        Ok(())
    }

    /// The next `limit` ready jobs of a queue partition, after `after` (the
    /// previous page's last key), and the key to read on from, if any
    /// (eventually consistent: every claim is conditional anyway).
    async fn queue_page(
        &self,
        pool: &str,
        shard: u32,
        limit: usize,
        after: Option<Item>,
    ) -> StoreResult<(Vec<Item>, Option<Item>)> {
        let mut expr = Expr::new();
        let cond = format!(
            "{} = {}",
            expr.name("gsi1pk"),
            expr.value(s(format!("Q#{pool}#{shard}")))
        );
        let resp = self
            .client
            .query()
            .table_name(&*self.table)
            .index_name(QUEUE_INDEX)
            .key_condition_expression(cond)
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .set_exclusive_start_key(after)
            .limit(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| aws_err("Query", e))?;
        let next = resp.last_evaluated_key.filter(|k| !k.is_empty());
        Ok((resp.items.unwrap_or_default(), next))
    }

    /// One conditional claim of a candidate from the queue index.
    async fn try_claim(
        &self,
        candidate: &Item,
        offer: &ClaimOffer,
        now_ms: i64,
    ) -> StoreResult<Option<LeaseRef>> {
        let (Some(pk), Some(attempt), Some(queue)) = (
            get_s(candidate, "pk"),
            get_n::<u64>(candidate, "attempt"),
            get_s(candidate, "gsi1pk"),
        ) else {
            return Ok(None);
        };
        let job_id = pk.trim_start_matches("JOB#").to_string();
        let next = attempt + 1;
        let mut expr = Expr::new();
        expr.set("state", s(JobState::Leased.as_str()))
            .set("attempt", n(next))
            .set("sid", s(&offer.session_id))
            .set("agent", s(&offer.agent_id))
            .set("leased_at", n(now_ms))
            .set("updated", n(now_ms))
            .set("evn", n(1))
            .set("missed", n(0))
            .set("gsi2pk", s(format!("S#{}", offer.session_id)))
            .set("gsi2sk", s(&job_id))
            .remove("gsi1pk")
            .remove("gsi1sk")
            .remove("started")
            .remove("exit")
            .remove("reason")
            .when_eq("state", s(JobState::Queued.as_str()))
            .when_eq("attempt", n(attempt))
            .when_eq("gsi1pk", s(queue));
        let ver = expr.name("ver");
        let one = expr.value(n(1));
        expr.set_raw("ver", format!("{ver} + {one}"));
        expr.set("lev", b(true));
        // This claim's mark (dropped by the job's next write): when an
        // earlier try of this call was applied but its answer lost, the
        // SDK's retry fails the condition on our own lease.
        let token = ulid::Ulid::new().to_string();
        expr.set("ctok", s(&token));
        let won = match self
            .update_item_or_old(key(pk, "STATE"), &expr, ReturnValue::None, true)
            .await?
        {
            Ok(_) => true,
            Err(old) => old.is_some_and(|old| get_s(&old, "ctok") == Some(token.as_str())),
        };
        Ok(won.then(|| LeaseRef {
            job_id,
            attempt: next,
            session_id: offer.session_id.clone(),
        }))
    }

    fn new_row(&self, job: &NewJob, now_ms: i64) -> JobRow {
        let spec = &job.spec;
        JobRow {
            id: job.id.clone(),
            pool: spec.pool.clone(),
            name: spec.name.clone(),
            priority: spec.priority,
            state: JobState::Queued,
            attempt: 0,
            failures: 0,
            infra_retries: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            not_before_ms: 0,
            enqueued_at_ms: now_ms,
            session_id: None,
            agent_id: None,
            leased_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            exit_code: None,
            reason: None,
            cancel_requested: false,
            missed_reports: 0,
            next_event: 1,
            version: 1,
            lease_event_pending: false,
            resources: spec.resources.clone(),
            constraints: spec.constraints.clone(),
            retry: spec.retry.clone(),
            timeout_secs: spec.timeout_secs,
            shard: shard_of(&job.id, self.shards),
            done: None,
            workflow: job.workflow.clone(),
            deps: 0,
            unpublished_at_ms: None,
        }
    }

    /// The transaction items that insert one job.
    fn insert_items(&self, job: &NewJob, now_ms: i64) -> StoreResult<Vec<TransactWriteItem>> {
        let row = self.new_row(job, now_ms);
        let submitted = (JobState::Queued, None, "submitted".to_string());
        self.job_items(&row, &job.spec, submitted, now_ms)
    }

    /// The transaction items that insert the job `row` (new, event 0 next)
    /// with its spec, its first event and its idempotency key: state item
    /// first, then spec, event and key.
    fn job_items(
        &self,
        row: &JobRow,
        job_spec: &JobSpec,
        first_event: (JobState, Option<String>, String),
        now_ms: i64,
    ) -> StoreResult<Vec<TransactWriteItem>> {
        let mut not_there = Expr::new();
        not_there.when_absent("pk");
        let mut items = vec![self.put(row.to_item(self.retention_ms)?, Some(not_there))?];
        let mut spec = key(job_pk(&row.id), "SPEC");
        spec.insert("id".into(), s(&row.id));
        spec.insert(
            "spec".into(),
            s(serde_json::to_string(job_spec).map_err(json_err)?),
        );
        spec.insert(TTL_ATTRIBUTE.into(), self.horizon_ttl(now_ms));
        items.push(self.put(spec, None)?);
        items.push(self.put(self.event_item(&row.id, 0, 0, now_ms, first_event), None)?);
        if let Some(k) = &job_spec.idempotency_key {
            let mut idem = key(format!("IDEM#{k}"), "IDEM");
            idem.insert("job_id".into(), s(&row.id));
            idem.insert(TTL_ATTRIBUTE.into(), self.horizon_ttl(now_ms));
            let mut not_there = Expr::new();
            not_there.when_absent("pk");
            items.push(self.put(idem, Some(not_there))?);
        }
        Ok(items)
    }

    async fn existing_for_key(&self, idem_key: &str) -> StoreResult<Option<SubmittedJob>> {
        let Some(item) = self.get(format!("IDEM#{idem_key}"), "IDEM").await? else {
            return Ok(None);
        };
        let id = req_s(&item, "job_id")?;
        let row = self.load_row(&id).await?.ok_or_else(|| {
            StoreError::Backend(format!("idempotency key points at missing job {id}"))
        })?;
        Ok(Some(SubmittedJob {
            id,
            state: row.state,
            created: false,
        }))
    }
}

fn encode_cursor(day: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{day}:{id}"))
}

fn decode_cursor(cursor: &str) -> StoreResult<(i64, String)> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let (day, id) = s.split_once(':')?;
            Some((day.parse().ok()?, id.to_string()))
        })
        .ok_or_else(|| {
            FieldError::new(
                "cursor",
                "is not a cursor this API returned; pass next_cursor from the previous page",
            )
            .into()
        })
}

fn now_wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl Store for DynamoStore {
    async fn submit(&self, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<Vec<SubmittedJob>> {
        let mut out: Vec<Option<SubmittedJob>> = vec![None; jobs.len()];
        // Repeats of a key within the batch resolve to its first job.
        let mut first_with_key: HashMap<String, usize> = HashMap::new();
        let mut pending = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            match &job.spec.idempotency_key {
                Some(k) if first_with_key.contains_key(k) => {}
                Some(k) => {
                    first_with_key.insert(k.clone(), i);
                    pending.push(i);
                }
                None => pending.push(i),
            }
        }
        self.note_pools(jobs.iter().map(|j| j.spec.pool.as_str()))
            .await?;
        if let Some(day) = jobs.iter().map(|j| id_day(&j.id, now_ms)).min() {
            self.mark_listing(day).await?;
        }
        // Chunks that fit one transaction are all-or-nothing; a larger
        // batch is several transactions.
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for i in pending {
            let items = 3 + jobs[i].spec.idempotency_key.is_some() as usize;
            if chunks.is_empty() || size + items > MAX_TX_ITEMS {
                chunks.push(Vec::new());
                size = 0;
            }
            size += items;
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(i);
            }
        }
        for mut chunk in chunks {
            for _ in 0..MAX_RACES {
                if chunk.is_empty() {
                    break;
                }
                let mut items = Vec::new();
                let mut owner = Vec::new();
                for &i in &chunk {
                    for item in self.insert_items(&jobs[i], now_ms)? {
                        items.push(item);
                        owner.push(i);
                    }
                }
                match self.transact(items).await {
                    Ok(()) => {
                        for &i in &chunk {
                            out[i] = Some(SubmittedJob {
                                id: jobs[i].id.clone(),
                                state: JobState::Queued,
                                created: true,
                            });
                        }
                        chunk.clear();
                    }
                    Err(TxError::Other(e)) => return Err(e),
                    Err(TxError::Cancelled(reasons)) => {
                        let mut resolved = HashSet::new();
                        for (pos, reason) in reasons.iter().enumerate() {
                            if reason.as_deref() != Some("ConditionalCheckFailed") {
                                continue;
                            }
                            let Some(&i) = owner.get(pos) else { continue };
                            match &jobs[i].spec.idempotency_key {
                                Some(k) => {
                                    if let Some(existing) = self.existing_for_key(k).await? {
                                        out[i] = Some(existing);
                                        resolved.insert(i);
                                    }
                                }
                                None => {
                                    return Err(StoreError::Conflict(format!(
                                        "job id {} exists already",
                                        jobs[i].id
                                    )))
                                }
                            }
                        }
                        chunk.retain(|i| !resolved.contains(i));
                    }
                }
            }
            if !chunk.is_empty() {
                return Err(StoreError::Backend(
                    "submit kept conflicting with concurrent submits; try again".into(),
                ));
            }
        }
        for (i, job) in jobs.iter().enumerate() {
            if out[i].is_none() {
                let first = job
                    .spec
                    .idempotency_key
                    .as_ref()
                    .and_then(|k| first_with_key.get(k))
                    .and_then(|&f| out[f].clone());
                out[i] = first.map(|f| SubmittedJob {
                    created: false,
                    ..f
                });
            }
        }
        out.into_iter()
            .map(|o| {
                o.ok_or_else(|| StoreError::Backend("a submitted job was not resolved".into()))
            })
            .collect()
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Job> {
        self.load_job(job_id).await
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        let limit = limit.clamp(1, 1000);
        let (mut day, mut before) = match cursor {
            Some(c) => {
                let (day, id) = decode_cursor(c)?;
                (day, Some(id))
            }
            None => (now_wall_ms().div_euclid(DAY_MS) + 1, None),
        };
        let Some(first_day) = self
            .get("META".into(), "LISTING")
            .await?
            .and_then(|i| get_n::<i64>(&i, "first_day"))
        else {
            return Ok(Page {
                items: Vec::new(),
                next_cursor: None,
            });
        };
        let mut found: Vec<(i64, Job)> = Vec::new();
        while day >= first_day && found.len() <= limit {
            let below = before.take().unwrap_or_else(|| "\u{7f}".to_string());
            let mut expr = Expr::new();
            let cond = format!(
                "{} = {} AND {} < {}",
                expr.name("gsi3pk"),
                expr.value(s(format!("L#{day:06}"))),
                expr.name("gsi3sk"),
                expr.value(s(below))
            );
            let mut start = None;
            loop {
                let resp = self
                    .client
                    .query()
                    .table_name(&*self.table)
                    .index_name(LIST_INDEX)
                    .key_condition_expression(&cond)
                    .set_expression_attribute_names(expr.names())
                    .set_expression_attribute_values(expr.values())
                    .scan_index_forward(false)
                    .limit((limit + 1).min(100) as i32)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|e| aws_err("Query", e))?;
                let ids: Vec<String> = resp
                    .items
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|i| get_s(i, "gsi3sk").map(str::to_string))
                    .collect();
                let rows = self.load_rows(&ids).await?;
                let matching: Vec<&JobRow> = ids
                    .iter()
                    .filter_map(|id| rows.get(id))
                    .filter(|r| {
                        filter.state.is_none_or(|s| r.state == s)
                            && filter.pool.as_ref().is_none_or(|p| &r.pool == p)
                            && filter.name.as_ref().is_none_or(|n| &r.name == n)
                    })
                    .collect();
                let wanted: Vec<String> = matching
                    .iter()
                    .take(limit + 1 - found.len())
                    .map(|r| r.id.clone())
                    .collect();
                let specs = self.load_specs(&wanted).await?;
                for row in matching.into_iter().take(wanted.len()) {
                    let spec = specs.get(&row.id).cloned().ok_or_else(|| {
                        StoreError::Backend(format!("job {} has no spec item", row.id))
                    })?;
                    found.push((day, row.to_job(spec)));
                }
                match resp.last_evaluated_key {
                    Some(k) if !k.is_empty() && found.len() <= limit => start = Some(k),
                    _ => break,
                }
            }
            day -= 1;
        }
        let next_cursor = if found.len() > limit {
            found.truncate(limit);
            found.last().map(|(day, job)| encode_cursor(*day, &job.id))
        } else {
            None
        };
        Ok(Page {
            items: found.into_iter().map(|(_, j)| j).collect(),
            next_cursor,
        })
    }

    async fn events(&self, job_id: &str) -> StoreResult<Vec<JobEvent>> {
        let row = self
            .load_row(job_id)
            .await?
            .filter(|r| r.unpublished_at_ms.is_none())
            .ok_or_else(|| StoreError::NotFound(format!("job {job_id}")))?;
        let mut expr = Expr::new();
        let cond = format!(
            "{} = {} AND begins_with({}, {})",
            expr.name("pk"),
            expr.value(s(job_pk(job_id))),
            expr.name("sk"),
            expr.value(s("EV#"))
        );
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let resp = self
                .client
                .query()
                .table_name(&*self.table)
                .key_condition_expression(&cond)
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| aws_err("Query", e))?;
            items.extend(resp.items.unwrap_or_default());
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        let mut events = items
            .iter()
            .map(|item| {
                Ok(JobEvent {
                    seq: 0,
                    at_ms: req_n(item, "at")?,
                    attempt: req_n(item, "attempt")?,
                    state: parse_state(&req_s(item, "state")?)?,
                    agent_id: get_s(item, "agent").map(str::to_string),
                    reason: req_s(item, "reason")?,
                    usd_per_hour: get_n(item, "usd_per_hour"),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        // The claim's event is written by the next transition; until then
        // it is the newest event (the state item read came first, so a
        // concurrent flush can only make it appear twice: skip a duplicate).
        if let Some(lease) = row.pending_lease_event() {
            let flushed = events
                .iter()
                .any(|e| e.attempt == lease.attempt && e.state == JobState::Leased);
            if !flushed {
                events.push(lease);
            }
        }
        for (i, event) in events.iter_mut().enumerate() {
            event.seq = i as u64 + 1;
        }
        Ok(events)
    }

    async fn claim(
        &self,
        offer: &ClaimOffer,
        scan_limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let session = self.get(session_pk(&offer.session_id), "SESSION").await?;
        let live = session.as_ref().is_some_and(|i| {
            !get_b(i, "gone") && get_n::<i64>(i, "expires").is_some_and(|e| e >= now_ms)
        });
        if !live {
            return Err(StoreError::Conflict(format!(
                "session {} has expired or ended; register again",
                offer.session_id
            )));
        }
        if offer.max_jobs == 0 {
            return Ok(Vec::new());
        }
        if let Some(pool) = self.get(pool_pk(&offer.pool), "POOL").await? {
            if get_b(&pool, "paused") {
                return Ok(Vec::new());
            }
        }
        // A claim that fails part-way (DynamoDB still throttling after the
        // SDK's retries) answers with the leases it won: only a claim that
        // won nothing fails, so no job stays leased to a claimer that never
        // heard of it.
        let mut leases = Vec::new();
        if let Err(e) = self
            .win_leases(offer, scan_limit, now_ms, &mut leases)
            .await
        {
            if leases.is_empty() {
                return Err(e);
            }
            tracing::warn!(
                session = %offer.session_id,
                won = leases.len(),
                "claim stopped early; answering with the jobs leased so far: {e}"
            );
        }
        self.deliverable(leases, now_ms).await
    }

    async fn start(
        &self,
        lease: &LeaseRef,
        now_ms: i64,
        usd_per_hour: Option<f64>,
    ) -> StoreResult<()> {
        let result = self
            .mutate(&lease.job_id, |row| {
                if !row.holds(lease) {
                    return Err(lease_lost(lease));
                }
                if row.state == JobState::Running {
                    return Ok(Step::Keep(()));
                }
                row.state = JobState::Running;
                row.started_at_ms = Some(now_ms);
                row.updated_at_ms = now_ms;
                let mut t =
                    Transition::event(JobState::Running, row.agent_id.clone(), "started".into());
                t.usd_per_hour = usd_per_hour;
                Ok(Step::Write((), t))
            })
            .await;
        match result {
            Err(StoreError::NotFound(_)) => Err(lease_lost(lease)),
            other => other,
        }
    }

    async fn check_lease(&self, lease: &LeaseRef) -> StoreResult<()> {
        match self.load_row(&lease.job_id).await? {
            Some(row) if row.holds(lease) => Ok(()),
            _ => Err(lease_lost(lease)),
        }
    }

    async fn complete(
        &self,
        lease: &LeaseRef,
        completion: &Completion,
        now_ms: i64,
    ) -> StoreResult<Completed> {
        let result = self
            .mutate_settling(&lease.job_id, |row| {
                if !row.holds(lease) {
                    let repeat = row.done.as_ref().is_some_and(|(a, sid, outcome, exit)| {
                        *a == lease.attempt
                            && *sid == lease.session_id
                            && outcome == completion.outcome.as_str()
                            && *exit == completion.exit_code
                    });
                    return if repeat {
                        Ok(Step::Keep(row.state))
                    } else {
                        Err(lease_lost(lease))
                    };
                }
                let t = row.complete(lease, completion, now_ms);
                Ok(Step::Write(row.state, t))
            })
            .await;
        match result {
            Err(StoreError::NotFound(_)) => Err(lease_lost(lease)),
            other => other.map(|(state, released)| Completed { state, released }),
        }
    }

    async fn cancel(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        self.mutate(job_id, |row| cancel_row(row, now_ms)).await?;
        self.load_job(job_id).await
    }

    async fn create_run(&self, run: &RunRecord, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<()> {
        self.create_run_impl(run, jobs, now_ms).await
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord> {
        self.get_run_impl(run_id).await
    }

    async fn list_runs(&self, cursor: Option<&str>, limit: usize) -> StoreResult<Page<RunRecord>> {
        self.list_runs_impl(cursor, limit).await
    }

    async fn cancel_run(&self, run_id: &str, now_ms: i64) -> StoreResult<RunRecord> {
        self.cancel_run_impl(run_id, now_ms).await
    }

    async fn get_jobs(&self, job_ids: &[String]) -> StoreResult<Vec<Job>> {
        self.get_jobs_impl(job_ids).await
    }

    async fn release_pending(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.release_pending_impl(now_ms).await
    }

    async fn retry(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        self.mutate(job_id, |row| {
            if !row.state.is_terminal() {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} is {}; only finished jobs can be retried (cancel it first)",
                    row.state
                )));
            }
            if let (JobState::Succeeded, Some(link)) = (row.state, &row.workflow) {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} is step {} of workflow run {} and SUCCEEDED: the steps \
                     depending on it already counted it, so it cannot run again",
                    link.step, link.run_id
                )));
            }
            row.state = JobState::Queued;
            row.failures = 0;
            row.infra_retries = 0;
            row.cancel_requested = false;
            row.not_before_ms = 0;
            row.enqueued_at_ms = now_ms;
            row.session_id = None;
            row.started_at_ms = None;
            row.finished_at_ms = None;
            row.exit_code = None;
            row.reason = Some("retried by request".into());
            row.updated_at_ms = now_ms;
            Ok(Step::Write(
                (),
                Transition::event(JobState::Queued, None, "retried by request".into()),
            ))
        })
        .await?;
        self.load_job(job_id).await
    }

    async fn create_session(&self, session: &NewSession, now_ms: i64) -> StoreResult<()> {
        let mut item = key(session_pk(&session.session_id), "SESSION");
        for (k, v) in [
            ("session_id", s(&session.session_id)),
            ("token_hash", s(&session.token_hash)),
            ("agent_id", s(&session.agent_id)),
            ("pool", s(&session.pool)),
            ("hostname", s(&session.hostname)),
            (
                "labels",
                s(serde_json::to_string(&session.labels).map_err(json_err)?),
            ),
            (
                "capacity",
                s(serde_json::to_string(&session.capacity).map_err(json_err)?),
            ),
            ("runtime", s(&session.runtime)),
            ("version", s(&session.version)),
            ("health_addr", s(&session.health_addr)),
            ("ttl_ms", n(session.ttl_ms)),
            ("created", n(now_ms)),
            ("expires", n(now_ms + session.ttl_ms as i64)),
            ("last_heartbeat", n(now_ms)),
            ("gone", b(false)),
            ("draining", b(false)),
            ("drain_requested", b(false)),
            ("gsi2pk", s("SESSIONS")),
            ("gsi2sk", s(&session.session_id)),
        ] {
            item.insert(k.to_string(), v);
        }
        let created = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", "pk")
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                return Err(StoreError::Conflict(format!(
                    "session {} exists already",
                    session.session_id
                )))
            }
            Err(e) => return Err(aws_err("PutItem", e)),
        }
        // Largest capacity seen in the pool: read, merge, conditional write.
        for _ in 0..MAX_RACES {
            let current = self.get(pool_pk(&session.pool), "POOL").await?;
            let stored = current
                .as_ref()
                .and_then(|i| get_s(i, "largest"))
                .map(str::to_string);
            let largest = stored
                .as_deref()
                .map(serde_json::from_str::<Resources>)
                .transpose()
                .map_err(json_err)?;
            let merged = super::largest_of(largest.clone(), &session.capacity);
            if largest.as_ref() == Some(&merged) {
                break;
            }
            let mut expr = Expr::new();
            expr.set(
                "largest",
                s(serde_json::to_string(&merged).map_err(json_err)?),
            )
            .set("name", s(&session.pool))
            .set("gsi2pk", s("POOLS"))
            .set("gsi2sk", s(&session.pool));
            match stored {
                Some(old) => expr.when_eq("largest", s(old)),
                None => expr.when_absent("largest"),
            };
            if self
                .update_item(
                    key(pool_pk(&session.pool), "POOL"),
                    &expr,
                    ReturnValue::None,
                )
                .await?
                .is_some()
            {
                break;
            }
        }
        Ok(())
    }

    async fn session_auth(&self, session_id: &str) -> StoreResult<SessionAuth> {
        let item = self
            .get(session_pk(session_id), "SESSION")
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("session {session_id}")))?;
        Ok(SessionAuth {
            session_id: session_id.to_string(),
            token_hash: req_s(&item, "token_hash")?,
            agent_id: req_s(&item, "agent_id")?,
            pool: req_s(&item, "pool")?,
            labels: serde_json::from_str(&req_s(&item, "labels")?).map_err(json_err)?,
            ttl_ms: req_n(&item, "ttl_ms")?,
            expires_at_ms: req_n(&item, "expires")?,
            gone: get_b(&item, "gone"),
        })
    }

    async fn resume_session(&self, session_id: &str, now_ms: i64) -> StoreResult<Vec<LeaseRef>> {
        let mut expr = renewal(now_ms);
        if self
            .update_item(
                key(session_pk(session_id), "SESSION"),
                &expr_live(&mut expr, now_ms),
                ReturnValue::None,
            )
            .await?
            .is_none()
        {
            return Err(StoreError::Conflict(format!(
                "session {session_id} has expired or ended"
            )));
        }
        Ok(self
            .held_by(session_id)
            .await?
            .into_iter()
            .map(|r| LeaseRef {
                job_id: r.id,
                attempt: r.attempt,
                session_id: session_id.to_string(),
            })
            .collect())
    }

    async fn heartbeat(
        &self,
        session_id: &str,
        running: &[LeaseRef],
        draining: bool,
        now_ms: i64,
    ) -> StoreResult<HeartbeatAnswer> {
        let gone = || {
            StoreError::Conflict(format!(
                "session {session_id} has expired or ended; register again"
            ))
        };
        // Renewed lazily (`renewal_due`): a consistent read costs a fraction
        // of a write, and most heartbeats need no write at all.
        let stored = self
            .get(session_pk(session_id), "SESSION")
            .await?
            .filter(|s| !get_b(s, "gone"))
            .ok_or_else(gone)?;
        let stored_expires: i64 = req_n(&stored, "expires")?;
        if stored_expires < now_ms {
            return Err(gone());
        }
        let due = renewal_due(stored_expires, req_n(&stored, "ttl_ms")?, now_ms)
            || (draining && !get_b(&stored, "draining"));
        let session = if due {
            let mut expr = renewal(now_ms);
            if draining {
                expr.set("draining", b(true));
            }
            self.update_item(
                key(session_pk(session_id), "SESSION"),
                &expr_live(&mut expr, now_ms),
                ReturnValue::AllNew,
            )
            .await?
            .ok_or_else(gone)?
        } else {
            stored
        };
        let expires: i64 = req_n(&session, "expires")?;
        let mut answer = HeartbeatAnswer {
            remaining_ms: (expires - now_ms).max(0) as u64,
            drain: get_b(&session, "drain_requested"),
            ..HeartbeatAnswer::default()
        };
        // Leases the index knows of plus the reported ones, all confirmed by
        // one consistent batch read.
        let mut ids: Vec<String> = self
            .query_index(OWNER_INDEX, "gsi2pk", format!("S#{session_id}"), None)
            .await?
            .iter()
            .filter_map(|i| get_s(i, "gsi2sk").map(str::to_string))
            .collect();
        ids.extend(
            running
                .iter()
                .filter(|l| l.session_id == session_id)
                .map(|l| l.job_id.clone()),
        );
        let rows = self.load_rows(&ids).await?;
        for lease in running {
            let row = rows.get(&lease.job_id);
            let held = lease.session_id == session_id && row.is_some_and(|r| r.holds(lease));
            // A lease this session has just completed is not lost: the agent
            // simply has not dropped it from its list yet.
            let completed_here = lease.session_id == session_id
                && row
                    .and_then(|r| r.done.as_ref())
                    .is_some_and(|(a, sid, _, _)| *a == lease.attempt && sid == session_id);
            if !held && !completed_here {
                answer.lost.push(lease.clone());
            }
        }
        // A heartbeat sent before the agent saw a Claim answer cannot list
        // that lease: only leases older than about one heartbeat interval
        // (TTL/6 with the defaults) count as missing from a report.
        let ttl_ms: i64 = req_n(&session, "ttl_ms")?;
        let expected_before = now_ms - ttl_ms / 6;
        let mut held: Vec<&JobRow> = rows
            .values()
            .filter(|r| {
                r.session_id.as_deref() == Some(session_id)
                    && matches!(r.state, JobState::Leased | JobState::Running)
            })
            .collect();
        held.sort_by(|a, b| a.id.cmp(&b.id));
        for row in held {
            let lease = LeaseRef {
                job_id: row.id.clone(),
                attempt: row.attempt,
                session_id: session_id.to_string(),
            };
            if running.contains(&lease) {
                if row.missed_reports != 0 {
                    self.set_missed(&lease, 0).await?;
                }
                if row.cancel_requested {
                    answer.cancel.push(lease);
                }
            } else if row.leased_at_ms.unwrap_or(0) > expected_before {
                continue;
            } else if row.missed_reports + 1 >= 2 {
                if self
                    .requeue_lease(&lease, "lease never reported by its agent", now_ms)
                    .await?
                    .is_some()
                {
                    answer.requeued_unreported.push(lease);
                }
            } else {
                self.set_missed(&lease, row.missed_reports + 1).await?;
            }
        }
        Ok(answer)
    }

    async fn end_session(
        &self,
        session_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<EndedSession> {
        let item = self
            .get(session_pk(session_id), "SESSION")
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("session {session_id}")))?;
        if !get_b(&item, "gone") {
            let mut expr = Expr::new();
            expr.set("gone", b(true))
                .set("ended", n(now_ms))
                .set(
                    "gsi2pk",
                    s(format!("GONE#{:06}", now_ms.div_euclid(DAY_MS))),
                )
                .set(TTL_ATTRIBUTE, ttl_secs(now_ms + self.retention_ms))
                .when_eq("gone", b(false));
            let ended_it = self
                .update_item(
                    key(session_pk(session_id), "SESSION"),
                    &expr,
                    ReturnValue::None,
                )
                .await?
                .is_some();
            // Ended after its expiry: the agent was lost, not leaving.
            if ended_it && get_n::<i64>(&item, "expires").is_some_and(|e| e < now_ms) {
                self.mark_lost(&item, now_ms).await?;
            }
        }
        let mut ended = EndedSession {
            session_id: session_id.to_string(),
            ..EndedSession::default()
        };
        for row in self.held_by(session_id).await? {
            let lease = LeaseRef {
                job_id: row.id.clone(),
                attempt: row.attempt,
                session_id: session_id.to_string(),
            };
            match self.requeue_lease(&lease, reason, now_ms).await? {
                Some(JobState::Queued) => ended.requeued.push(row.id),
                Some(_) => ended.finished.push(row.id),
                None => {}
            }
        }
        Ok(ended)
    }

    async fn expired_sessions(&self, before_ms: i64) -> StoreResult<Vec<String>> {
        let mut out: Vec<String> = self
            .live_session_items()
            .await?
            .iter()
            .filter(|i| get_n::<i64>(i, "expires").is_some_and(|e| e < before_ms))
            .filter_map(|i| get_s(i, "session_id").map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn live_sessions(&self) -> StoreResult<u64> {
        Ok(self.live_session_items().await?.len() as u64)
    }

    async fn reap_jobs(
        &self,
        grace_ms: i64,
        start_deadline_ms: i64,
        now_ms: i64,
    ) -> StoreResult<ReapedJobs> {
        let mut reaped = ReapedJobs::default();
        let sessions = self.sessions_since(now_ms - GONE_RESCAN_MS, now_ms).await?;
        for session in sessions {
            let session_id = req_s(&session, "session_id")?;
            for row in self.held_by(&session_id).await? {
                let lease = LeaseRef {
                    job_id: row.id.clone(),
                    attempt: row.attempt,
                    session_id: session_id.clone(),
                };
                if row.state == JobState::Leased {
                    if row
                        .leased_at_ms
                        .is_some_and(|t| t + start_deadline_ms < now_ms)
                        && self
                            .requeue_lease(&lease, "not started within the start deadline", now_ms)
                            .await?
                            .is_some()
                    {
                        reaped.not_started.push(lease);
                    }
                    continue;
                }
                if row.timeout_secs == 0 {
                    continue;
                }
                let deadline =
                    row.started_at_ms.unwrap_or(now_ms) + row.timeout_secs as i64 * 1000 + grace_ms;
                if deadline >= now_ms {
                    continue;
                }
                let completion = Completion {
                    outcome: OutcomeKind::TimedOut,
                    exit_code: None,
                    reason: format!(
                        "timed out after {}s (enforced by the coordinator)",
                        row.timeout_secs
                    ),
                };
                let applied = self
                    .mutate(&lease.job_id, |row| {
                        if !row.holds(&lease) {
                            return Ok(Step::Keep(false));
                        }
                        let t = row.complete(&lease, &completion, now_ms);
                        Ok(Step::Write(true, t))
                    })
                    .await?;
                if applied {
                    reaped.timed_out.push(lease);
                }
            }
        }
        Ok(reaped)
    }

    async fn request_drain(&self, agent_id: &str, now_ms: i64) -> StoreResult<Agent> {
        let mut sessions: Vec<Item> = self
            .live_session_items()
            .await?
            .into_iter()
            .filter(|i| {
                get_s(i, "agent_id") == Some(agent_id)
                    && get_n::<i64>(i, "expires").is_some_and(|e| e >= now_ms)
            })
            .collect();
        if sessions.is_empty() {
            return Err(StoreError::NotFound(format!(
                "agent {agent_id} (no live session; see `drover agents`)"
            )));
        }
        for session in &mut sessions {
            let pk = req_s(session, "pk")?;
            let mut expr = Expr::new();
            expr.set("drain_requested", b(true)).when_present("pk");
            self.update_item(key(pk, "SESSION"), &expr, ReturnValue::None)
                .await?;
            session.insert("drain_requested".into(), b(true));
        }
        sessions.sort_by_key(|i| get_n::<i64>(i, "created").unwrap_or(0));
        let newest = sessions
            .last()
            .ok_or_else(|| StoreError::NotFound(format!("agent {agent_id} (no live session)")))?;
        self.agent_of(newest, now_ms).await
    }

    async fn note_agent(&self, session_id: &str, note: &str) -> StoreResult<()> {
        let mut expr = Expr::new();
        expr.set("note", s(note)).when_present("pk");
        self.update_item(
            key(session_pk(session_id), "SESSION"),
            &expr,
            ReturnValue::None,
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("session {session_id}")))?;
        Ok(())
    }

    async fn list_agents(&self, now_ms: i64, recent_ms: i64) -> StoreResult<Vec<Agent>> {
        let mut agents = Vec::new();
        for item in self.sessions_since(now_ms - recent_ms, now_ms).await? {
            agents.push(self.agent_of(&item, now_ms).await?);
        }
        agents.sort_by(|a, b| {
            (&a.pool, &a.agent_id, a.registered_at_ms).cmp(&(
                &b.pool,
                &b.agent_id,
                b.registered_at_ms,
            ))
        });
        Ok(agents)
    }

    async fn pools(&self, now_ms: i64) -> StoreResult<Vec<Pool>> {
        let keys = self
            .query_index(OWNER_INDEX, "gsi2pk", "POOLS".into(), None)
            .await?
            .iter()
            .filter_map(|i| get_s(i, "pk").map(|pk| key(pk, "POOL")))
            .collect();
        let mut pools: BTreeMap<String, Pool> = BTreeMap::new();
        for item in self.batch_get(keys, false).await? {
            let name = req_s(&item, "name")?;
            pools.insert(
                name.clone(),
                Pool {
                    pool: name,
                    queued: 0,
                    running: 0,
                    agents: 0,
                    paused: get_b(&item, "paused"),
                    oldest_queued_age_ms: None,
                    scaling: None,
                },
            );
        }
        for pool in pools.values_mut() {
            let mut oldest: Option<i64> = None;
            for shard in 0..self.shards {
                for partition in [
                    format!("Q#{}#{shard}", pool.pool),
                    format!("D#{}#{shard}", pool.pool),
                ] {
                    for item in self
                        .query_index(QUEUE_INDEX, "gsi1pk", partition, None)
                        .await?
                    {
                        pool.queued += 1;
                        if let Some(created) = get_n::<i64>(&item, "created") {
                            oldest = Some(oldest.map_or(created, |o| o.min(created)));
                        }
                    }
                }
            }
            pool.oldest_queued_age_ms = oldest.map(|o| now_ms - o);
        }
        let mut agents: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        for session in self.live_session_items().await? {
            let pool_name = req_s(&session, "pool")?;
            let session_id = req_s(&session, "session_id")?;
            let running = self
                .count_index(OWNER_INDEX, "gsi2pk", format!("S#{session_id}"))
                .await?;
            let pool = pools.entry(pool_name.clone()).or_insert_with(|| Pool {
                pool: pool_name.clone(),
                queued: 0,
                running: 0,
                agents: 0,
                paused: false,
                oldest_queued_age_ms: None,
                scaling: None,
            });
            pool.running += running;
            if get_n::<i64>(&session, "expires").is_some_and(|e| e >= now_ms) {
                agents
                    .entry(pool_name)
                    .or_default()
                    .insert(req_s(&session, "agent_id")?);
            }
        }
        for (name, ids) in agents {
            if let Some(pool) = pools.get_mut(&name) {
                pool.agents = ids.len() as u64;
            }
        }
        Ok(pools.into_values().collect())
    }

    async fn set_pool_paused(&self, pool: &str, paused: bool) -> StoreResult<()> {
        let mut expr = Expr::new();
        expr.set("paused", b(paused))
            .set("name", s(pool))
            .set("gsi2pk", s("POOLS"))
            .set("gsi2sk", s(pool));
        self.update_item(key(pool_pk(pool), "POOL"), &expr, ReturnValue::None)
            .await?;
        Ok(())
    }

    async fn queued_needs(&self, pool: &str, limit: usize) -> StoreResult<Vec<JobNeeds>> {
        self.queued_needs_impl(pool, limit).await
    }

    async fn lost_sessions(&self, since_ms: i64, now_ms: i64) -> StoreResult<Vec<LostSession>> {
        self.lost_sessions_impl(since_ms, now_ms).await
    }

    async fn try_acquire_leader(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: i64,
    ) -> StoreResult<Option<LeaderLease>> {
        self.try_acquire_leader_impl(name, holder, ttl_ms, now_ms)
            .await
    }

    async fn release_leader(&self, lease: &LeaderLease) -> StoreResult<()> {
        self.release_leader_impl(lease).await
    }

    async fn scaler_states(&self) -> StoreResult<BTreeMap<String, String>> {
        self.scaler_states_impl().await
    }

    async fn put_scaler_state(
        &self,
        pool: &str,
        state: &str,
        lease: &LeaderLease,
    ) -> StoreResult<()> {
        self.put_scaler_state_impl(pool, state, lease).await
    }

    async fn pool_capacity(&self, pool: &str) -> StoreResult<PoolCapacity> {
        let Some(item) = self.get(pool_pk(pool), "POOL").await? else {
            return Ok(PoolCapacity::default());
        };
        Ok(PoolCapacity {
            paused: get_b(&item, "paused"),
            largest: get_s(&item, "largest")
                .map(serde_json::from_str)
                .transpose()
                .map_err(json_err)?,
        })
    }
}

impl DynamoStore {
    /// Claims' queue walk: leases fitting candidates into `leases` until the
    /// offer is full or the queue is read. On an error, `leases` holds what
    /// was won before it.
    async fn win_leases(
        &self,
        offer: &ClaimOffer,
        scan_limit: usize,
        now_ms: i64,
        leases: &mut Vec<LeaseRef>,
    ) -> StoreResult<()> {
        // Start at a random shard so claimers spread over them.
        let first = rand::random::<u32>() % self.shards;
        let mut free = offer.free.clone();
        // A round that lost every race it ran saw a stale queue head: look
        // again (bounded), so contention never reads as an empty queue.
        for _round in 0..CLAIM_ROUNDS {
            let mut lost_any = false;
            for k in 0..self.shards {
                if leases.len() >= offer.max_jobs as usize {
                    break;
                }
                let shard = (first + k) % self.shards;
                self.promote_due(&offer.pool, shard, now_ms).await?;
                // The head is read in pages sized to the claim (a few
                // candidates per job wanted, for lost races), up to
                // `scan_limit` candidates when jobs that do not fit are in
                // the way: a claim reads (and pays for) little when the
                // head fits.
                let page = (2 * offer.max_jobs as usize + 4).min(scan_limit);
                let (mut candidates, mut more) =
                    self.queue_page(&offer.pool, shard, page, None).await?;
                let mut read = candidates.len();
                let mut i = 0;
                while leases.len() < offer.max_jobs as usize {
                    if i == candidates.len() {
                        let Some(after) = more.take().filter(|_| read < scan_limit) else {
                            break;
                        };
                        let limit = page.min(scan_limit - read);
                        (candidates, more) = self
                            .queue_page(&offer.pool, shard, limit, Some(after))
                            .await?;
                        read += candidates.len();
                        i = 0;
                        if candidates.is_empty() {
                            break;
                        }
                    }
                    let candidate = &candidates[i];
                    i += 1;
                    let wants = Resources {
                        cpu_millis: get_n(candidate, "cpu").unwrap_or(0),
                        memory_mib: get_n(candidate, "mem").unwrap_or(0),
                        gpus: get_n(candidate, "gpus").unwrap_or(0),
                        disk_gib: get_n(candidate, "disk").unwrap_or(0),
                        gpu_model: get_s(candidate, "gmodel").map(str::to_string),
                    };
                    if !wants.fits_in(&free)
                        || !constraints_of(candidate)
                            .iter()
                            .all(|(k, v)| offer.labels.get(k) == Some(v))
                    {
                        continue;
                    }
                    match self.try_claim(candidate, offer, now_ms).await? {
                        Some(lease) => {
                            free.cpu_millis -= wants.cpu_millis;
                            free.memory_mib -= wants.memory_mib;
                            free.gpus -= wants.gpus;
                            free.disk_gib -= wants.disk_gib;
                            leases.push(lease);
                        }
                        None => {
                            // Contended: spread over the rest of the head
                            // instead of racing the other claimers in order.
                            if !lost_any {
                                use rand::seq::SliceRandom;
                                candidates[i..].shuffle(&mut rand::thread_rng());
                            }
                            lost_any = true;
                        }
                    }
                }
            }
            if !lost_any || leases.len() >= offer.max_jobs as usize {
                break;
            }
        }
        Ok(())
    }

    /// Freshly won leases with their specs. When the specs cannot be read,
    /// the leases go back to the queue ([`Self::release_unsent`]) and the
    /// error is returned: the claimer never hears of them.
    async fn deliverable(
        &self,
        leases: Vec<LeaseRef>,
        now_ms: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = leases.iter().map(|l| l.job_id.clone()).collect();
        let mut specs = match self.load_specs(&ids).await {
            Ok(specs) => specs,
            Err(e) => {
                let reason = "lease not delivered (its claim could not read the spec)";
                self.release_unsent(&leases, reason, now_ms).await;
                return Err(e);
            }
        };
        let mut claimed = Vec::with_capacity(leases.len());
        for lease in leases {
            match specs.remove(&lease.job_id) {
                Some(spec) => claimed.push(ClaimedJob { lease, spec }),
                // Corrupt or expired: left leased, so the session's
                // heartbeats requeue it on the infra budget until it fails.
                None => tracing::error!(
                    job = %lease.job_id,
                    "leased job has no spec item; not handed out"
                ),
            }
        }
        if claimed.is_empty() {
            return Err(StoreError::Backend(format!(
                "job {} has no spec item",
                ids[0]
            )));
        }
        Ok(claimed)
    }

    /// Puts leases their claimer never received back in the queue, where
    /// they were, spending no budget (`next_after_unsent_lease`). A lease
    /// that cannot be released now is requeued by the session's heartbeats
    /// once they miss it (`HeartbeatAnswer::requeued_unreported`).
    async fn release_unsent(&self, leases: &[LeaseRef], reason: &str, now_ms: i64) {
        for lease in leases {
            let released = self
                .mutate(&lease.job_id, |row| {
                    if !row.holds(lease) {
                        return Ok(Step::Keep(()));
                    }
                    let enqueued_at_ms = row.enqueued_at_ms;
                    let next = super::next_after_unsent_lease(
                        row.failures,
                        row.infra_retries,
                        row.cancel_requested,
                        reason,
                    );
                    let t = row.apply(next, None, now_ms);
                    row.enqueued_at_ms = enqueued_at_ms;
                    Ok(Step::Write((), t))
                })
                .await;
            if let Err(e) = released {
                tracing::warn!(
                    job = %lease.job_id,
                    "could not release an undelivered lease (its session's heartbeats will requeue it): {e}"
                );
            }
        }
    }

    /// Sets a held job's missed-report counter (no event: not a transition).
    async fn set_missed(&self, lease: &LeaseRef, missed: u32) -> StoreResult<()> {
        let result = self
            .mutate(&lease.job_id, |row| {
                if !row.holds(lease) || row.missed_reports == missed {
                    return Ok(Step::Keep(()));
                }
                row.missed_reports = missed;
                Ok(Step::Write((), Transition::silent()))
            })
            .await;
        match result {
            Err(StoreError::NotFound(_)) => Ok(()),
            other => other,
        }
    }
}

/// What `cancel` does to a job: QUEUED/PENDING → CANCELLED at once;
/// LEASED/RUNNING → the cancel recorded; CANCELLED again → nothing; other
/// terminal states → `Conflict`.
fn cancel_row(row: &mut JobRow, now_ms: i64) -> StoreResult<Step<()>> {
    match row.state {
        JobState::Pending | JobState::Queued => {
            row.state = JobState::Cancelled;
            row.cancel_requested = true;
            row.updated_at_ms = now_ms;
            row.finished_at_ms = Some(now_ms);
            row.reason = Some("cancelled by request".into());
            Ok(Step::Write(
                (),
                Transition::event(JobState::Cancelled, None, "cancelled by request".into()),
            ))
        }
        JobState::Leased | JobState::Running if !row.cancel_requested => {
            row.cancel_requested = true;
            row.updated_at_ms = now_ms;
            Ok(Step::Write(
                (),
                Transition::event(
                    row.state,
                    row.agent_id.clone(),
                    "cancel requested; the agent is stopping the job".into(),
                ),
            ))
        }
        JobState::Leased | JobState::Running | JobState::Cancelled => Ok(Step::Keep(())),
        state => Err(StoreError::Conflict(format!(
            "job {} already finished ({state}); nothing to cancel",
            row.id
        ))),
    }
}

/// `SET expires = :now + ttl_ms, last_heartbeat = :now`.
fn renewal(now_ms: i64) -> Expr {
    let mut expr = Expr::new();
    let now = expr.value(n(now_ms));
    let ttl = expr.name("ttl_ms");
    expr.set_raw("expires", format!("{now} + {ttl}"))
        .set("last_heartbeat", n(now_ms));
    expr
}

/// Adds "the session exists, is not gone and has not expired".
fn expr_live(expr: &mut Expr, now_ms: i64) -> Expr {
    expr.when_present("pk").when_eq("gone", b(false));
    let expires = expr.name("expires");
    let now = expr.value(n(now_ms));
    expr.when(format!("{expires} >= {now}"));
    std::mem::take(expr)
}
