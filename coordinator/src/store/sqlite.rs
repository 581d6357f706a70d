//! The embedded default store: one SQLite file (bundled, WAL).
//!
//! Every operation runs as one `BEGIN IMMEDIATE` transaction on a single
//! connection behind a mutex, on the blocking pool. That makes each trait
//! method atomic and serialises claims, which is what gives exclusivity here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use drover_proto::model::{
    Agent, AgentState, Job, JobEvent, JobSpec, JobState, Pool, Resources, SubmittedJob,
};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use drover_proto::workflow::WorkflowLink;

use super::{
    ClaimOffer, ClaimedJob, Completed, Completion, EndedSession, HeartbeatAnswer, JobFilter,
    JobNeeds, LeaderLease, LeaseRef, LostSession, NewJob, NewSession, OutcomeKind, Page,
    PoolCapacity, ReapedJobs, RunRecord, SessionAuth, Store, StoreError, StoreResult,
};

mod workflows;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    spec TEXT NOT NULL,
    cpu_millis INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    disk_gib INTEGER NOT NULL,
    gpu_model TEXT,
    constraints TEXT,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    infra_retries INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    not_before_ms INTEGER NOT NULL DEFAULT 0,
    session_id TEXT,
    agent_id TEXT,
    leased_at_ms INTEGER,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    exit_code INTEGER,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    missed_reports INTEGER NOT NULL DEFAULT 0,
    next_event_seq INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(pool, priority DESC) WHERE state = 'QUEUED';
CREATE INDEX IF NOT EXISTS jobs_session ON jobs(session_id) WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state) WHERE state IN ('LEASED', 'RUNNING');
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    agent_id TEXT,
    reason TEXT NOT NULL,
    usd_per_hour REAL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT NOT NULL,
    finished_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL,
    capacity TEXT NOT NULL,
    runtime TEXT NOT NULL,
    version TEXT NOT NULL,
    health_addr TEXT NOT NULL,
    ttl_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    gone INTEGER NOT NULL DEFAULT 0,
    ended_at_ms INTEGER,
    draining INTEGER NOT NULL DEFAULT 0,
    drain_requested INTEGER NOT NULL DEFAULT 0,
    note TEXT
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions(expires_at_ms) WHERE gone = 0;
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    largest TEXT
);
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions(ended_at_ms) WHERE gone = 1;
CREATE TABLE IF NOT EXISTS leaders (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS scaler_states (
    pool TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    steps TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_links (
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    task_index INTEGER,
    deps_remaining INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs(id) WHERE state = 'PENDING';
"#;

/// Columns added after a table's first release: `(table, column, type)`.
/// [`SqliteStore::init`] adds each one a database file lacks, so files
/// written by older versions keep opening.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("events", "usd_per_hour", "REAL"),
    ("sessions", "note", "TEXT"),
];

/// The first event of a job that starts QUEUED.
const SUBMITTED: &str = "submitted";

/// What [`row_to_job`] reads, from [`JOB_FROM`].
const JOB_COLUMNS: &str = "jobs.id, jobs.spec, jobs.state, jobs.attempt, jobs.failures, \
     jobs.infra_retries, jobs.created_at_ms, jobs.updated_at_ms, jobs.not_before_ms, \
     jobs.session_id, jobs.agent_id, jobs.started_at_ms, jobs.finished_at_ms, jobs.exit_code, \
     jobs.reason, jobs.cancel_requested, l.run_id, l.step, l.task_index";

/// Jobs with their workflow link (if any).
const JOB_FROM: &str = "jobs LEFT JOIN job_links l ON l.job_id = jobs.id";

#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Writer>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let checkpoints = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        Self::init(conn, Some(checkpoints))
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> StoreResult<Self> {
        Self::init(Connection::open_in_memory().map_err(backend)?, None)
    }

    fn init(mut conn: Connection, checkpoints: Option<Connection>) -> StoreResult<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        if checkpoints.is_some() {
            // The checkpoint thread keeps the WAL short; the connection
            // only checkpoints itself (and waits for the disk) past this.
            conn.pragma_update(None, "wal_autocheckpoint", WAL_FALLBACK_PAGES)
                .map_err(backend)?;
        }
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn)?;
        Ok(SqliteStore {
            writer: Arc::new(Writer::start(conn, checkpoints)?),
        })
    }

    /// Runs `f` in an immediate transaction on the store's connection
    /// thread: alone, or with the operations queued behind it (group
    /// commit), each inside its own savepoint so that one failing rolls back
    /// only its own writes. The answer comes once the transaction committed.
    async fn tx<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer.send(Box::new(Call {
            f: Some(f),
            out: None,
            reply,
        }))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the store's connection thread stopped".into()))?
    }

    /// Runs `f` on the connection, outside the store's operations (tests
    /// that look at or change the file behind the store's back).
    #[cfg(test)]
    fn with_conn<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> T + Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::channel();
        self.writer
            .send(Box::new(Call {
                f: Some(move |conn: &Connection| Ok(f(conn))),
                out: None,
                reply: Reply::Sync(reply),
            }))
            .unwrap();
        answer.recv().unwrap().unwrap()
    }
}

/// Operations the connection thread takes into one transaction at most.
const MAX_BATCH: usize = 64;

/// The store's one connection, owned by its own thread, which runs the
/// operations sent to it in batches: everything queued when a transaction
/// begins goes into it. Under load many claims, starts and completions
/// share one BEGIN/COMMIT, one write of each page they touch to the WAL and
/// one wake-up of the thread; an operation arriving alone runs alone.
struct Writer {
    ops: Option<std::sync::mpsc::Sender<Box<dyn Pending>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    checkpoints: Option<Checkpointer>,
}

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// WAL pages (4 KiB) past which the writing connection checkpoints itself:
/// only if the checkpoint thread falls far behind.
const WAL_FALLBACK_PAGES: i64 = 16_384;

/// Copies the WAL into the database file from a second connection, on its
/// own thread: a checkpoint waits for the disk (fsync), and done by the
/// writing connection (SQLite's default, every 1,000 pages) it stalled every
/// operation behind it for tens of milliseconds. PASSIVE checkpoints never
/// block the writer; once the WAL is wholly copied, the writer starts it
/// over from the beginning.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(conn: Connection) -> StoreResult<Checkpointer> {
        conn.busy_timeout(std::time::Duration::from_secs(1))
            .map_err(backend)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("drover-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    let done = conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
                    if let Err(e) = done {
                        tracing::warn!(
                            "SQLite checkpoint failed (the WAL grows until one works): {e}"
                        );
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop, thread })
    }
}

impl Writer {
    fn start(conn: Connection, checkpoints: Option<Connection>) -> StoreResult<Writer> {
        let checkpoints = checkpoints.map(Checkpointer::start).transpose()?;
        let (ops, queue) = std::sync::mpsc::channel::<Box<dyn Pending>>();
        let thread = std::thread::Builder::new()
            .name("drover-sqlite".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    run_batch(&conn, batch);
                }
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the store's thread: {e}")))?;
        Ok(Writer {
            ops: Some(ops),
            thread: Some(thread),
            checkpoints,
        })
    }

    fn send(&self, op: Box<dyn Pending>) -> StoreResult<()> {
        self.ops
            .as_ref()
            .and_then(|ops| ops.send(op).ok())
            .ok_or_else(|| StoreError::Backend("the store's connection thread stopped".into()))
    }
}

impl Drop for Writer {
    /// Closes the connection before returning, so that the file is settled
    /// (WAL checkpointed) when the last handle on the store is gone.
    fn drop(&mut self) {
        if let Some(checkpoints) = self.checkpoints.take() {
            let _ = checkpoints.stop.send(());
            let _ = checkpoints.thread.join();
        }
        self.ops.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One queued operation.
trait Pending: Send {
    /// Runs it; `false` when it failed (its writes are to be undone).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers its caller: its own result, or `failed` when the transaction
    /// it ran in did not commit (or it never ran).
    fn answer(self: Box<Self>, failed: Option<&str>);
}

enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<StoreResult<T>>),
    #[cfg(test)]
    Sync(std::sync::mpsc::Sender<StoreResult<T>>),
}

impl<T> From<tokio::sync::oneshot::Sender<StoreResult<T>>> for Reply<T> {
    fn from(reply: tokio::sync::oneshot::Sender<StoreResult<T>>) -> Self {
        Reply::Async(reply)
    }
}

struct Call<T, F, R> {
    f: Option<F>,
    out: Option<StoreResult<T>>,
    reply: R,
}

impl<T, F, R> Pending for Call<T, F, R>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    R: Into<Reply<T>> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)))
            .unwrap_or_else(|_| Err(StoreError::Backend("a store operation panicked".into())));
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn answer(self: Box<Self>, failed: Option<&str>) {
        let out = match (self.out, failed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(out)), None) => Ok(out),
            (_, failed) => Err(StoreError::Backend(
                failed.unwrap_or("the operation did not run").to_string(),
            )),
        };
        match self.reply.into() {
            Reply::Async(reply) => {
                let _ = reply.send(out);
            }
            #[cfg(test)]
            Reply::Sync(reply) => {
                let _ = reply.send(out);
            }
        }
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs `batch` in one immediate transaction, each operation in its own
/// savepoint, and answers every operation once the transaction ended.
fn run_batch(conn: &Connection, batch: Vec<Box<dyn Pending>>) {
    // The operations that ran in the open transaction, to be answered
    // when it ends.
    let mut ran: Vec<Box<dyn Pending>> = Vec::with_capacity(batch.len());
    let mut open = false;
    for mut op in batch {
        if !open {
            if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
                op.answer(Some(&format!("cannot begin a transaction: {e}")));
                continue;
            }
            open = true;
        }
        if let Err(e) = exec(conn, "SAVEPOINT op") {
            op.answer(Some(&format!("cannot begin a savepoint: {e}")));
            continue;
        }
        let ok = op.run(conn);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O
            // error): what ran in it before is undone too.
            let why = "the store rolled its transaction back (see the coordinator's log); retry";
            tracing::error!("{why}");
            op.answer(Some(why));
            for done in ran.drain(..) {
                done.answer(Some(why));
            }
            open = false;
            continue;
        }
        let undone = ok || exec(conn, "ROLLBACK TO op").is_ok();
        if !undone || exec(conn, "RELEASE op").is_err() {
            // Its writes cannot be told apart from the others': none stay.
            let _ = exec(conn, "ROLLBACK");
            let why = "a store operation could not be undone alone; retry";
            op.answer(Some(why));
            for done in ran.drain(..) {
                done.answer(Some(why));
            }
            open = false;
            continue;
        }
        ran.push(op);
    }
    if !open {
        return;
    }
    let failed = exec(conn, "COMMIT").err().map(|e| {
        let _ = exec(conn, "ROLLBACK");
        format!("cannot commit: {e}")
    });
    for op in ran {
        op.answer(failed.as_deref());
    }
}

/// Creates what is missing (tables, indexes, columns added since), in one
/// immediate transaction so that coordinators opening the same file at once
/// cannot both add a column.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    tx.execute_batch(SCHEMA).map_err(backend)?;
    for (table, column, kind) in ADDED_COLUMNS {
        let present: i64 = tx
            .query_row_cached(
                "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if present == 0 {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                .map_err(backend)?;
        }
    }
    tx.commit().map_err(backend)
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Backend(format!("corrupt stored JSON: {e}"))
}

fn parse_state(s: &str) -> StoreResult<JobState> {
    s.parse()
        .map_err(|_| StoreError::Backend(format!("unknown stored state {s:?}")))
}

/// A job row as read: the job, its stored state and its spec JSON (parsed by
/// [`finish_job`], which can report bad JSON as a store error).
type JobRow = (Job, String, String);

fn row_to_job(row: &Row<'_>) -> rusqlite::Result<JobRow> {
    let spec_json: String = row.get(1)?;
    let state: String = row.get(2)?;
    let job = Job {
        id: row.get(0)?,
        // Filled by the caller, which can report JSON errors properly.
        spec: JobSpec::command(Vec::<String>::new()),
        state: JobState::Queued,
        attempt: row.get::<_, i64>(3)? as u64,
        failures: row.get::<_, i64>(4)? as u32,
        infra_retries: row.get::<_, i64>(5)? as u32,
        created_at_ms: row.get(6)?,
        updated_at_ms: row.get(7)?,
        not_before_ms: row.get::<_, i64>(8).map(|v| (v > 0).then_some(v))?,
        session_id: row.get(9)?,
        agent_id: row.get(10)?,
        started_at_ms: row.get(11)?,
        finished_at_ms: row.get(12)?,
        exit_code: row.get(13)?,
        reason: row.get(14)?,
        cancel_requested: row.get::<_, i64>(15)? != 0,
        workflow: match row.get::<_, Option<String>>(16)? {
            None => None,
            Some(run_id) => Some(WorkflowLink {
                run_id,
                step: row.get(17)?,
                task_index: row.get::<_, Option<i64>>(18)?.map(|i| i as u32),
            }),
        },
        cost_usd: None,
    };
    Ok((job, state, spec_json))
}

/// Finishes what `row_to_job` started: state and spec, redacted.
fn finish_job((mut job, state, spec_json): JobRow) -> StoreResult<Job> {
    job.state = parse_state(&state)?;
    let spec: JobSpec = serde_json::from_str(&spec_json).map_err(json_err)?;
    job.spec = spec.redacted();
    Ok(job)
}

/// `execute` and `query_row` through the connection's statement cache: the
/// hot paths run the same few dozen statements, so none is parsed twice
/// (rusqlite's own `Connection::execute`/`query_row` prepare every time).
/// Only for fixed SQL: dynamic statements would evict the hot ones.
pub(super) trait Cached {
    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

fn load_job(tx: &Connection, job_id: &str) -> StoreResult<Job> {
    let row = tx
        .query_row_cached(
            &format!("SELECT {JOB_COLUMNS} FROM {JOB_FROM} WHERE jobs.id = ?1"),
            [job_id],
            row_to_job,
        )
        .optional()
        .map_err(backend)?
        .ok_or_else(|| StoreError::NotFound(format!("job {job_id}")))?;
    finish_job(row)
}

fn load_spec(tx: &Connection, job_id: &str) -> StoreResult<JobSpec> {
    let json: String = tx
        .query_row_cached("SELECT spec FROM jobs WHERE id = ?1", [job_id], |r| {
            r.get(0)
        })
        .map_err(backend)?;
    serde_json::from_str(&json).map_err(json_err)
}

fn append_event(
    tx: &Connection,
    job_id: &str,
    now_ms: i64,
    attempt: u64,
    state: JobState,
    agent_id: Option<&str>,
    reason: &str,
) -> StoreResult<()> {
    append_priced_event(tx, job_id, now_ms, attempt, state, agent_id, reason, None)
}

/// [`append_event`] with the attempt's price (RUNNING events).
#[allow(clippy::too_many_arguments)]
fn append_priced_event(
    tx: &Connection,
    job_id: &str,
    now_ms: i64,
    attempt: u64,
    state: JobState,
    agent_id: Option<&str>,
    reason: &str,
    usd_per_hour: Option<f64>,
) -> StoreResult<()> {
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE jobs SET next_event_seq = next_event_seq + 1 WHERE id = ?1 \
             RETURNING next_event_seq - 1",
        )
        .map_err(backend)?
        .query_row([job_id], |r| r.get(0))
        .map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO events (job_id, seq, at_ms, attempt, state, agent_id, reason, usd_per_hour) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(backend)?
    .execute(params![
        job_id,
        seq,
        now_ms,
        attempt as i64,
        state.as_str(),
        agent_id,
        reason,
        usd_per_hour
    ])
    .map_err(backend)?;
    Ok(())
}

/// Inserts a new job row in `state` (QUEUED, or PENDING for a workflow job
/// waiting for its dependencies) with its first event: the one insert
/// behind `submit` and `create_run`.
fn insert_job(
    tx: &Connection,
    job_id: &str,
    spec: &JobSpec,
    state: JobState,
    reason: &str,
    now_ms: i64,
) -> StoreResult<()> {
    let constraints = if spec.constraints.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&spec.constraints).map_err(json_err)?)
    };
    // Only a state's own reason is kept on the row: "submitted" is not one.
    let row_reason = (state != JobState::Queued).then_some(reason);
    tx.prepare_cached(
        "INSERT INTO jobs (id, pool, name, priority, spec, cpu_millis, memory_mib, gpus, \
         disk_gib, gpu_model, constraints, state, created_at_ms, updated_at_ms, reason) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14)",
    )
    .map_err(backend)?
    .execute(params![
        job_id,
        spec.pool,
        spec.name,
        spec.priority,
        serde_json::to_string(spec).map_err(json_err)?,
        spec.resources.cpu_millis,
        spec.resources.memory_mib as i64,
        spec.resources.gpus,
        spec.resources.disk_gib,
        spec.resources.gpu_model,
        constraints,
        state.as_str(),
        now_ms,
        row_reason,
    ])
    .map_err(backend)?;
    append_event(tx, job_id, now_ms, 0, state, None, reason)
}

/// The lease's job row, if the lease still holds it.
fn held(tx: &Connection, lease: &LeaseRef) -> StoreResult<Option<(JobState, Option<String>)>> {
    let row: Option<(String, Option<String>)> = tx
        .query_row_cached(
            "SELECT state, agent_id FROM jobs WHERE id = ?1 AND attempt = ?2 AND session_id = ?3 \
             AND state IN ('LEASED', 'RUNNING')",
            params![lease.job_id, lease.attempt as i64, lease.session_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(backend)?;
    row.map(|(s, a)| Ok((parse_state(&s)?, a))).transpose()
}

fn lease_lost(lease: &LeaseRef) -> StoreError {
    StoreError::LeaseLost {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
        session_id: lease.session_id.clone(),
    }
}

/// The fields the next-state rules read.
struct Counters {
    attempt: u64,
    failures: u32,
    infra_retries: u32,
    cancel_requested: bool,
    agent_id: Option<String>,
    spec: JobSpec,
}

fn counters(tx: &Connection, job_id: &str) -> StoreResult<Counters> {
    let (attempt, failures, infra, cancel, agent_id, spec): (i64, i64, i64, i64, Option<String>, String) = tx
        .query_row_cached(
            "SELECT attempt, failures, infra_retries, cancel_requested, agent_id, spec FROM jobs WHERE id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .map_err(backend)?;
    Ok(Counters {
        attempt: attempt as u64,
        failures: failures as u32,
        infra_retries: infra as u32,
        cancel_requested: cancel != 0,
        agent_id,
        spec: serde_json::from_str(&spec).map_err(json_err)?,
    })
}

/// Writes the job's next state (out of its lease: back in the queue or done)
/// and its event. `exit_code` is recorded when given. Every end of a leased
/// job passes here, so this is where a workflow job's dependents learn of
/// it ([`workflows::settle_dependents`]). Returns the new state and the
/// pools of the dependents released to QUEUED.
fn move_job(
    tx: &Connection,
    job_id: &str,
    job: &Counters,
    next: &super::NextState,
    exit_code: Option<Option<i32>>,
    now_ms: i64,
) -> StoreResult<Completed> {
    let terminal = next.state.is_terminal();
    tx.execute_cached(
        "UPDATE jobs SET state = ?2, failures = ?3, infra_retries = ?4, updated_at_ms = ?5, \
         not_before_ms = ?6, reason = ?7, missed_reports = 0, \
         exit_code = CASE WHEN ?8 THEN ?9 ELSE exit_code END, \
         session_id = CASE WHEN ?10 THEN session_id ELSE NULL END, \
         started_at_ms = CASE WHEN ?10 THEN started_at_ms ELSE NULL END, \
         finished_at_ms = CASE WHEN ?10 THEN ?5 ELSE NULL END WHERE id = ?1",
        params![
            job_id,
            next.state.as_str(),
            next.failures,
            next.infra_retries,
            now_ms,
            next.not_before_ms,
            next.reason,
            exit_code.is_some(),
            exit_code.flatten(),
            terminal,
        ],
    )
    .map_err(backend)?;
    append_event(
        tx,
        job_id,
        now_ms,
        job.attempt,
        next.state,
        job.agent_id.as_deref(),
        &next.reason,
    )?;
    let released = workflows::settle_dependents(tx, job_id, next.state, now_ms)?;
    Ok(Completed {
        state: next.state,
        released,
    })
}

/// Puts a leased job back in the queue on the infrastructure budget, or ends
/// it when the budget is spent or a cancel was requested. Returns the new state.
fn requeue_infra(
    tx: &Connection,
    job_id: &str,
    reason: &str,
    now_ms: i64,
) -> StoreResult<JobState> {
    let job = counters(tx, job_id)?;
    let next = super::next_after_infra_loss(
        &job.spec.retry,
        job.failures,
        job.infra_retries,
        job.cancel_requested,
        reason,
    );
    // An infrastructure loss never succeeds, so it releases nothing.
    Ok(move_job(tx, job_id, &job, &next, None, now_ms)?.state)
}

/// Records a held lease's outcome and moves the job on (see `Store::complete`).
fn apply_completion(
    tx: &Connection,
    lease: &LeaseRef,
    completion: &Completion,
    now_ms: i64,
) -> StoreResult<Completed> {
    tx.execute_cached(
        "INSERT INTO attempts (job_id, attempt, session_id, outcome, exit_code, reason, \
         finished_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            lease.job_id,
            lease.attempt as i64,
            lease.session_id,
            completion.outcome.as_str(),
            completion.exit_code,
            completion.reason,
            now_ms
        ],
    )
    .map_err(backend)?;
    let job = counters(tx, &lease.job_id)?;
    let next = super::next_after_completion(
        &job.spec.retry,
        job.failures,
        job.infra_retries,
        job.cancel_requested,
        completion,
        now_ms,
    );
    let requeued_on_infra = next.infra_retries != job.infra_retries;
    let exit_code = (!requeued_on_infra).then_some(completion.exit_code);
    move_job(tx, &lease.job_id, &job, &next, exit_code, now_ms)
}

fn encode_cursor(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

/// A page from up to `limit + 1` rows read newest first: the extra row only
/// says there is more, and the cursor names the last id kept.
fn page_of<T>(mut items: Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> Page<T> {
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|item| encode_cursor(id(item)))
    } else {
        None
    };
    Page { items, next_cursor }
}

fn decode_cursor(cursor: &str) -> StoreResult<String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            drover_proto::model::FieldError::new(
                "cursor",
                "is not a cursor this API returned; pass next_cursor from the previous page",
            )
            .into()
        })
}

fn row_to_agent(row: &Row<'_>, now_ms: i64) -> rusqlite::Result<(Agent, String, String)> {
    let gone: i64 = row.get(12)?;
    let draining: i64 = row.get(13)?;
    let expires: i64 = row.get(14)?;
    let state = if gone != 0 || expires < now_ms {
        AgentState::Gone
    } else if draining != 0 {
        AgentState::Draining
    } else {
        AgentState::Active
    };
    let agent = Agent {
        agent_id: row.get(0)?,
        session_id: row.get(1)?,
        pool: row.get(2)?,
        hostname: row.get(3)?,
        labels: BTreeMap::new(),
        capacity: Resources::default(),
        runtime: row.get(6)?,
        version: row.get(7)?,
        state,
        registered_at_ms: row.get(8)?,
        last_heartbeat_ms: row.get(9)?,
        running: row.get::<_, i64>(10)? as u32,
        health_addr: row.get(11)?,
        note: row.get(15)?,
    };
    Ok((agent, row.get(4)?, row.get(5)?))
}

const AGENT_SELECT: &str = "SELECT s.agent_id, s.session_id, s.pool, s.hostname, s.labels, \
     s.capacity, s.runtime, s.version, s.created_at_ms, s.last_heartbeat_ms, \
     (SELECT COUNT(*) FROM jobs j WHERE j.session_id = s.session_id \
        AND j.state IN ('LEASED', 'RUNNING')), \
     s.health_addr, s.gone, s.draining OR s.drain_requested, s.expires_at_ms, s.note \
     FROM sessions s";

fn finish_agent((mut agent, labels, capacity): (Agent, String, String)) -> StoreResult<Agent> {
    agent.labels = serde_json::from_str(&labels).map_err(json_err)?;
    agent.capacity = serde_json::from_str(&capacity).map_err(json_err)?;
    Ok(agent)
}

/// What `cancel` does to one job (see [`Store::cancel`]); a QUEUED or
/// PENDING workflow job fails its PENDING dependents.
fn cancel_tx(tx: &Connection, job: &Job, now_ms: i64) -> StoreResult<()> {
    let job_id = job.id.as_str();
    match job.state {
        JobState::Pending | JobState::Queued => {
            tx.execute_cached(
                "UPDATE jobs SET state = 'CANCELLED', cancel_requested = 1, updated_at_ms = ?2, \
                 finished_at_ms = ?2, reason = 'cancelled by request' WHERE id = ?1",
                params![job_id, now_ms],
            )
            .map_err(backend)?;
            append_event(
                tx,
                job_id,
                now_ms,
                job.attempt,
                JobState::Cancelled,
                None,
                "cancelled by request",
            )?;
            workflows::settle_dependents(tx, job_id, JobState::Cancelled, now_ms)?;
        }
        JobState::Leased | JobState::Running => {
            if !job.cancel_requested {
                tx.execute_cached(
                    "UPDATE jobs SET cancel_requested = 1, updated_at_ms = ?2 WHERE id = ?1",
                    params![job_id, now_ms],
                )
                .map_err(backend)?;
                append_event(
                    tx,
                    job_id,
                    now_ms,
                    job.attempt,
                    job.state,
                    job.agent_id.as_deref(),
                    "cancel requested; the agent is stopping the job",
                )?;
            }
        }
        JobState::Cancelled => {}
        state => {
            return Err(StoreError::Conflict(format!(
                "job {job_id} already finished ({state}); nothing to cancel"
            )))
        }
    }
    Ok(())
}

fn end_session_tx(
    tx: &Connection,
    session_id: &str,
    reason: &str,
    now_ms: i64,
) -> StoreResult<EndedSession> {
    let exists: Option<i64> = tx
        .query_row_cached(
            "SELECT gone FROM sessions WHERE session_id = ?1",
            [session_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?;
    if exists.is_none() {
        return Err(StoreError::NotFound(format!("session {session_id}")));
    }
    tx.execute_cached(
        "UPDATE sessions SET gone = 1, ended_at_ms = COALESCE(ended_at_ms, ?2) WHERE session_id = ?1",
        params![session_id, now_ms],
    )
    .map_err(backend)?;
    let jobs: Vec<String> = {
        let mut stmt = tx
            .prepare(
                "SELECT id FROM jobs WHERE session_id = ?1 AND state IN ('LEASED', 'RUNNING') \
                 ORDER BY id",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([session_id], |r| r.get(0))
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    let mut ended = EndedSession {
        session_id: session_id.to_string(),
        ..EndedSession::default()
    };
    for job_id in jobs {
        match requeue_infra(tx, &job_id, reason, now_ms)? {
            JobState::Queued => ended.requeued.push(job_id),
            _ => ended.finished.push(job_id),
        }
    }
    Ok(ended)
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<Vec<SubmittedJob>> {
        self.tx(move |tx| {
            let mut out = Vec::with_capacity(jobs.len());
            for job in jobs {
                if let Some(key) = &job.spec.idempotency_key {
                    let existing: Option<String> = tx
                        .query_row_cached(
                            "SELECT job_id FROM idempotency WHERE key = ?1",
                            [key],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(backend)?;
                    if let Some(id) = existing {
                        let state: String = tx
                            .query_row_cached("SELECT state FROM jobs WHERE id = ?1", [&id], |r| {
                                r.get(0)
                            })
                            .map_err(backend)?;
                        out.push(SubmittedJob {
                            id,
                            state: parse_state(&state)?,
                            created: false,
                        });
                        continue;
                    }
                    tx.execute_cached(
                        "INSERT INTO idempotency (key, job_id) VALUES (?1, ?2)",
                        params![key, job.id],
                    )
                    .map_err(backend)?;
                }
                insert_job(tx, &job.id, &job.spec, JobState::Queued, SUBMITTED, now_ms)?;
                out.push(SubmittedJob {
                    id: job.id,
                    state: JobState::Queued,
                    created: true,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Job> {
        let job_id = job_id.to_string();
        self.tx(move |tx| load_job(tx, &job_id)).await
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page<Job>> {
        let after = cursor.map(decode_cursor).transpose()?;
        let filter = filter.clone();
        let limit = limit.clamp(1, 1000);
        self.tx(move |tx| {
            let mut sql = format!("SELECT {JOB_COLUMNS} FROM {JOB_FROM} WHERE 1 = 1");
            let mut args: Vec<String> = Vec::new();
            if let Some(state) = filter.state {
                args.push(state.as_str().to_string());
                sql.push_str(&format!(" AND jobs.state = ?{}", args.len()));
            }
            if let Some(pool) = filter.pool {
                args.push(pool);
                sql.push_str(&format!(" AND jobs.pool = ?{}", args.len()));
            }
            if let Some(name) = filter.name {
                args.push(name);
                sql.push_str(&format!(" AND jobs.name = ?{}", args.len()));
            }
            if let Some(after) = after {
                args.push(after);
                sql.push_str(&format!(" AND jobs.id < ?{}", args.len()));
            }
            sql.push_str(&format!(" ORDER BY jobs.id DESC LIMIT {}", limit + 1));
            let mut stmt = tx.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), row_to_job)
                .map_err(backend)?;
            let mut items = Vec::new();
            for row in rows {
                items.push(finish_job(row.map_err(backend)?)?);
            }
            Ok(page_of(items, limit, |j| &j.id))
        })
        .await
    }

    async fn events(&self, job_id: &str) -> StoreResult<Vec<JobEvent>> {
        let job_id = job_id.to_string();
        self.tx(move |tx| {
            load_job(tx, &job_id)?;
            let mut stmt = tx
                .prepare(
                    "SELECT seq, at_ms, attempt, state, agent_id, reason, usd_per_hour \
                     FROM events WHERE job_id = ?1 ORDER BY seq",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([&job_id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<f64>>(6)?,
                    ))
                })
                .map_err(backend)?;
            let mut events = Vec::new();
            for row in rows {
                let (seq, at_ms, attempt, state, agent_id, reason, usd_per_hour) =
                    row.map_err(backend)?;
                events.push(JobEvent {
                    seq: seq as u64,
                    at_ms,
                    attempt: attempt as u64,
                    state: parse_state(&state)?,
                    agent_id,
                    reason,
                    usd_per_hour,
                });
            }
            Ok(events)
        })
        .await
    }

    async fn claim(
        &self,
        offer: &ClaimOffer,
        scan_limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let offer = offer.clone();
        self.tx(move |tx| {
            let live: Option<i64> = tx
                .query_row_cached(
                    "SELECT 1 FROM sessions WHERE session_id = ?1 AND gone = 0 AND expires_at_ms >= ?2",
                    params![offer.session_id, now_ms],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            if live.is_none() {
                return Err(StoreError::Conflict(format!(
                    "session {} has expired or ended; register again",
                    offer.session_id
                )));
            }
            if offer.max_jobs == 0 {
                return Ok(Vec::new());
            }
            let paused: Option<i64> = tx
                .query_row_cached("SELECT paused FROM pools WHERE name = ?1", [&offer.pool], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(backend)?;
            if paused == Some(1) {
                return Ok(Vec::new());
            }
            let candidates: Vec<(String, Resources, Option<String>)> = {
                // The limit is written into the statement: with a bound
                // LIMIT under ORDER BY, SQLite prepares the statement again
                // on every run (its sort plan depends on the value).
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT id, cpu_millis, memory_mib, gpus, disk_gib, gpu_model, constraints \
                         FROM jobs INDEXED BY jobs_queue \
                         WHERE pool = ?1 AND state = 'QUEUED' AND not_before_ms <= ?2 \
                         ORDER BY priority DESC, rowid ASC LIMIT {scan_limit}"
                    ))
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![offer.pool, now_ms], |r| {
                        Ok((
                            r.get(0)?,
                            Resources {
                                cpu_millis: r.get(1)?,
                                memory_mib: r.get::<_, i64>(2)? as u64,
                                gpus: r.get(3)?,
                                disk_gib: r.get(4)?,
                                gpu_model: r.get(5)?,
                            },
                            r.get(6)?,
                        ))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut free = offer.free.clone();
            let mut claimed = Vec::new();
            for (job_id, wants, constraints) in candidates {
                if claimed.len() >= offer.max_jobs as usize {
                    break;
                }
                if !wants.fits_in(&free) {
                    continue;
                }
                if let Some(constraints) = constraints {
                    let constraints: BTreeMap<String, String> =
                        serde_json::from_str(&constraints).map_err(json_err)?;
                    if !constraints
                        .iter()
                        .all(|(k, v)| offer.labels.get(k) == Some(v))
                    {
                        continue;
                    }
                }
                let attempt: i64 = tx
                    .query_row_cached(
                        "UPDATE jobs SET state = 'LEASED', attempt = attempt + 1, session_id = ?2, \
                         agent_id = ?3, leased_at_ms = ?4, started_at_ms = NULL, updated_at_ms = ?4, \
                         missed_reports = 0, exit_code = NULL, reason = NULL \
                         WHERE id = ?1 AND state = 'QUEUED' RETURNING attempt",
                        params![job_id, offer.session_id, offer.agent_id, now_ms],
                        |r| r.get(0),
                    )
                    .map_err(backend)?;
                let attempt = attempt as u64;
                append_event(
                    tx,
                    &job_id,
                    now_ms,
                    attempt,
                    JobState::Leased,
                    Some(&offer.agent_id),
                    &format!("leased to session {}", offer.session_id),
                )?;
                free.cpu_millis -= wants.cpu_millis;
                free.memory_mib -= wants.memory_mib;
                free.gpus -= wants.gpus;
                free.disk_gib -= wants.disk_gib;
                let spec = load_spec(tx, &job_id)?;
                claimed.push(ClaimedJob {
                    lease: LeaseRef {
                        job_id,
                        attempt,
                        session_id: offer.session_id.clone(),
                    },
                    spec,
                });
            }
            Ok(claimed)
        })
        .await
    }

    async fn start(
        &self,
        lease: &LeaseRef,
        now_ms: i64,
        usd_per_hour: Option<f64>,
    ) -> StoreResult<()> {
        let lease = lease.clone();
        self.tx(move |tx| {
            let (state, agent) = held(tx, &lease)?.ok_or_else(|| lease_lost(&lease))?;
            if state == JobState::Running {
                return Ok(());
            }
            tx.execute_cached(
                "UPDATE jobs SET state = 'RUNNING', started_at_ms = ?2, updated_at_ms = ?2 WHERE id = ?1",
                params![lease.job_id, now_ms],
            )
            .map_err(backend)?;
            append_priced_event(
                tx,
                &lease.job_id,
                now_ms,
                lease.attempt,
                JobState::Running,
                agent.as_deref(),
                "started",
                usd_per_hour,
            )
        })
        .await
    }

    async fn check_lease(&self, lease: &LeaseRef) -> StoreResult<()> {
        let lease = lease.clone();
        self.tx(move |tx| {
            held(tx, &lease)?
                .map(|_| ())
                .ok_or_else(|| lease_lost(&lease))
        })
        .await
    }

    async fn complete(
        &self,
        lease: &LeaseRef,
        completion: &Completion,
        now_ms: i64,
    ) -> StoreResult<Completed> {
        let lease = lease.clone();
        let completion = completion.clone();
        self.tx(move |tx| {
            let Some(_) = held(tx, &lease)? else {
                // Idempotent repeat of the recorded completion?
                let recorded: Option<(String, String, Option<i32>)> = tx
                    .query_row_cached(
                        "SELECT session_id, outcome, exit_code FROM attempts \
                         WHERE job_id = ?1 AND attempt = ?2",
                        params![lease.job_id, lease.attempt as i64],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(backend)?;
                return match recorded {
                    Some((session, outcome, exit_code))
                        if session == lease.session_id
                            && outcome == completion.outcome.as_str()
                            && exit_code == completion.exit_code =>
                    {
                        Ok(Completed {
                            state: load_job(tx, &lease.job_id)?.state,
                            released: Vec::new(),
                        })
                    }
                    _ => Err(lease_lost(&lease)),
                };
            };
            apply_completion(tx, &lease, &completion, now_ms)
        })
        .await
    }

    async fn cancel(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        let job_id = job_id.to_string();
        self.tx(move |tx| {
            let job = load_job(tx, &job_id)?;
            cancel_tx(tx, &job, now_ms)?;
            load_job(tx, &job_id)
        })
        .await
    }

    async fn create_run(&self, run: &RunRecord, jobs: Vec<NewJob>, now_ms: i64) -> StoreResult<()> {
        let run = run.clone();
        self.tx(move |tx| workflows::create_run(tx, &run, jobs, now_ms))
            .await
    }

    async fn get_run(&self, run_id: &str) -> StoreResult<RunRecord> {
        let run_id = run_id.to_string();
        self.tx(move |tx| workflows::load_run(tx, &run_id)).await
    }

    async fn list_runs(&self, cursor: Option<&str>, limit: usize) -> StoreResult<Page<RunRecord>> {
        let after = cursor.map(decode_cursor).transpose()?;
        let limit = limit.clamp(1, 1000);
        self.tx(move |tx| workflows::list_runs(tx, after.as_deref(), limit))
            .await
    }

    async fn cancel_run(&self, run_id: &str, now_ms: i64) -> StoreResult<RunRecord> {
        let run_id = run_id.to_string();
        self.tx(move |tx| workflows::cancel_run(tx, &run_id, now_ms))
            .await
    }

    async fn get_jobs(&self, job_ids: &[String]) -> StoreResult<Vec<Job>> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(job_ids).map_err(json_err)?;
        self.tx(move |tx| {
            // One query; `json_each` keeps the order the ids were given in.
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM json_each(?1) AS w \
                     JOIN jobs ON jobs.id = w.value \
                     LEFT JOIN job_links l ON l.job_id = jobs.id ORDER BY w.key"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([&ids], row_to_job).map_err(backend)?;
            let mut jobs = Vec::new();
            for row in rows {
                jobs.push(finish_job(row.map_err(backend)?)?);
            }
            Ok(jobs)
        })
        .await
    }

    async fn release_pending(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.tx(move |tx| workflows::release_pending(tx, now_ms))
            .await
    }

    async fn retry(&self, job_id: &str, now_ms: i64) -> StoreResult<Job> {
        let job_id = job_id.to_string();
        self.tx(move |tx| {
            let job = load_job(tx, &job_id)?;
            if !job.state.is_terminal() {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} is {}; only finished jobs can be retried (cancel it first)",
                    job.state
                )));
            }
            if let (JobState::Succeeded, Some(link)) = (job.state, &job.workflow) {
                return Err(StoreError::Conflict(format!(
                    "job {job_id} is step {} of workflow run {} and SUCCEEDED: the steps \
                     depending on it already counted it, so it cannot run again",
                    link.step, link.run_id
                )));
            }
            tx.execute_cached(
                "UPDATE jobs SET state = 'QUEUED', failures = 0, infra_retries = 0, cancel_requested = 0, \
                 not_before_ms = 0, session_id = NULL, started_at_ms = NULL, finished_at_ms = NULL, \
                 exit_code = NULL, reason = 'retried by request', updated_at_ms = ?2 WHERE id = ?1",
                params![job_id, now_ms],
            )
            .map_err(backend)?;
            append_event(tx, &job_id, now_ms, job.attempt, JobState::Queued, None, "retried by request")?;
            load_job(tx, &job_id)
        })
        .await
    }

    async fn create_session(&self, s: &NewSession, now_ms: i64) -> StoreResult<()> {
        let s = s.clone();
        self.tx(move |tx| {
            tx.execute_cached(
                "INSERT INTO sessions (session_id, token_hash, agent_id, pool, hostname, labels, capacity, \
                 runtime, version, health_addr, ttl_ms, created_at_ms, expires_at_ms, last_heartbeat_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?12)",
                params![
                    s.session_id,
                    s.token_hash,
                    s.agent_id,
                    s.pool,
                    s.hostname,
                    serde_json::to_string(&s.labels).map_err(json_err)?,
                    serde_json::to_string(&s.capacity).map_err(json_err)?,
                    s.runtime,
                    s.version,
                    s.health_addr,
                    s.ttl_ms as i64,
                    now_ms,
                    now_ms + s.ttl_ms as i64,
                ],
            )
            .map_err(backend)?;
            let largest: Option<String> = tx
                .query_row_cached("SELECT largest FROM pools WHERE name = ?1", [&s.pool], |r| r.get(0))
                .optional()
                .map_err(backend)?
                .flatten();
            let largest = largest
                .map(|l| serde_json::from_str::<Resources>(&l))
                .transpose()
                .map_err(json_err)?;
            let largest = serde_json::to_string(&super::largest_of(largest, &s.capacity)).map_err(json_err)?;
            tx.execute_cached(
                "INSERT INTO pools (name, largest) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET largest = excluded.largest",
                params![s.pool, largest],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn session_auth(&self, session_id: &str) -> StoreResult<SessionAuth> {
        let session_id = session_id.to_string();
        self.tx(move |tx| {
            let row = tx
                .query_row_cached(
                    "SELECT token_hash, agent_id, pool, labels, ttl_ms, expires_at_ms, gone \
                     FROM sessions WHERE session_id = ?1",
                    [&session_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("session {session_id}")))?;
            Ok(SessionAuth {
                session_id,
                token_hash: row.0,
                agent_id: row.1,
                pool: row.2,
                labels: serde_json::from_str(&row.3).map_err(json_err)?,
                ttl_ms: row.4 as u64,
                expires_at_ms: row.5,
                gone: row.6 != 0,
            })
        })
        .await
    }

    async fn resume_session(&self, session_id: &str, now_ms: i64) -> StoreResult<Vec<LeaseRef>> {
        let session_id = session_id.to_string();
        self.tx(move |tx| {
            let renewed = tx
                .execute_cached(
                    "UPDATE sessions SET expires_at_ms = ?2 + ttl_ms, last_heartbeat_ms = ?2 \
                     WHERE session_id = ?1 AND gone = 0 AND expires_at_ms >= ?2",
                    params![session_id, now_ms],
                )
                .map_err(backend)?;
            if renewed == 0 {
                return Err(StoreError::Conflict(format!(
                    "session {session_id} has expired or ended"
                )));
            }
            let mut stmt = tx
                .prepare(
                    "SELECT id, attempt FROM jobs WHERE session_id = ?1 \
                     AND state IN ('LEASED', 'RUNNING') ORDER BY id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([&session_id], |r| {
                    Ok(LeaseRef {
                        job_id: r.get(0)?,
                        attempt: r.get::<_, i64>(1)? as u64,
                        session_id: session_id.clone(),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn heartbeat(
        &self,
        session_id: &str,
        running: &[LeaseRef],
        draining: bool,
        now_ms: i64,
    ) -> StoreResult<HeartbeatAnswer> {
        let session_id = session_id.to_string();
        let running = running.to_vec();
        self.tx(move |tx| {
            // Renewed lazily: the same rule as `renewal_due`.
            let renewed: Option<(i64, i64, i64)> = tx
                .prepare_cached(
                    "UPDATE sessions SET expires_at_ms = ?2 + ttl_ms, last_heartbeat_ms = ?2, \
                     draining = MAX(draining, ?3) WHERE session_id = ?1 AND gone = 0 \
                     AND expires_at_ms >= ?2 \
                     AND (expires_at_ms - ?2 < ttl_ms - ttl_ms / 3 OR draining < ?3) \
                     RETURNING expires_at_ms, drain_requested, ttl_ms",
                )
                .map_err(backend)?
                .query_row(params![session_id, now_ms, draining as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(backend)?;
            let row = match renewed {
                Some(row) => Some(row),
                None => tx
                    .prepare_cached(
                        "SELECT expires_at_ms, drain_requested, ttl_ms FROM sessions \
                         WHERE session_id = ?1 AND gone = 0 AND expires_at_ms >= ?2",
                    )
                    .map_err(backend)?
                    .query_row(params![session_id, now_ms], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                    .map_err(backend)?,
            };
            let Some((expires_at_ms, drain_requested, ttl_ms)) = row else {
                return Err(StoreError::Conflict(format!(
                    "session {session_id} has expired or ended; register again"
                )));
            };
            let mut answer = HeartbeatAnswer {
                remaining_ms: (expires_at_ms - now_ms).max(0) as u64,
                drain: drain_requested != 0,
                ..HeartbeatAnswer::default()
            };
            for lease in &running {
                if lease.session_id != session_id {
                    answer.lost.push(lease.clone());
                } else if held(tx, lease)?.is_none() {
                    // A lease this session has just completed is not lost:
                    // the agent simply has not dropped it from its list yet.
                    let completed_here: Option<i64> = tx
                        .query_row_cached(
                            "SELECT 1 FROM attempts WHERE job_id = ?1 AND attempt = ?2 AND session_id = ?3",
                            params![lease.job_id, lease.attempt as i64, session_id],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(backend)?;
                    if completed_here.is_none() {
                        answer.lost.push(lease.clone());
                    }
                }
            }
            // A heartbeat sent before the agent saw a Claim answer cannot list
            // that lease: only leases older than about one heartbeat interval
            // (TTL/6 with the defaults) count as missing from a report.
            let expected_before = now_ms - ttl_ms / 6;
            let held_jobs: Vec<(String, i64, i64, i64, Option<i64>)> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, attempt, cancel_requested, missed_reports, leased_at_ms FROM jobs \
                         WHERE session_id = ?1 AND state IN ('LEASED', 'RUNNING')",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([&session_id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            for (job_id, attempt, cancel, missed, leased_at) in held_jobs {
                let lease = LeaseRef {
                    job_id,
                    attempt: attempt as u64,
                    session_id: session_id.clone(),
                };
                if running.contains(&lease) {
                    if missed != 0 {
                        tx.execute_cached(
                            "UPDATE jobs SET missed_reports = 0 WHERE id = ?1",
                            [&lease.job_id],
                        )
                        .map_err(backend)?;
                    }
                    if cancel != 0 {
                        answer.cancel.push(lease);
                    }
                } else if leased_at.unwrap_or(0) > expected_before {
                    continue;
                } else if missed + 1 >= 2 {
                    requeue_infra(
                        tx,
                        &lease.job_id,
                        "lease never reported by its agent",
                        now_ms,
                    )?;
                    answer.requeued_unreported.push(lease);
                } else {
                    tx.execute_cached(
                        "UPDATE jobs SET missed_reports = missed_reports + 1 WHERE id = ?1",
                        [&lease.job_id],
                    )
                    .map_err(backend)?;
                }
            }
            Ok(answer)
        })
        .await
    }

    async fn end_session(
        &self,
        session_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<EndedSession> {
        let session_id = session_id.to_string();
        let reason = reason.to_string();
        self.tx(move |tx| end_session_tx(tx, &session_id, &reason, now_ms))
            .await
    }

    async fn expired_sessions(&self, before_ms: i64) -> StoreResult<Vec<String>> {
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare("SELECT session_id FROM sessions WHERE gone = 0 AND expires_at_ms < ?1")
                .map_err(backend)?;
            let rows = stmt.query_map([before_ms], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn live_sessions(&self) -> StoreResult<u64> {
        self.tx(|tx| {
            tx.query_row_cached("SELECT COUNT(*) FROM sessions WHERE gone = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(backend)
        })
        .await
    }

    async fn reap_jobs(
        &self,
        grace_ms: i64,
        start_deadline_ms: i64,
        now_ms: i64,
    ) -> StoreResult<ReapedJobs> {
        self.tx(move |tx| {
            let active: Vec<(String, i64, String, String, Option<i64>, Option<i64>)> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT id, attempt, session_id, state, leased_at_ms, started_at_ms FROM jobs \
                         INDEXED BY jobs_active WHERE state IN ('LEASED', 'RUNNING')",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut reaped = ReapedJobs::default();
            for (job_id, attempt, session_id, state, leased_at, started_at) in active {
                let lease = LeaseRef {
                    job_id: job_id.clone(),
                    attempt: attempt as u64,
                    session_id,
                };
                if state == "LEASED" {
                    if leased_at.is_some_and(|t| t + start_deadline_ms < now_ms) {
                        requeue_infra(tx, &job_id, "not started within the start deadline", now_ms)?;
                        reaped.not_started.push(lease);
                    }
                    continue;
                }
                let spec = load_spec(tx, &job_id)?;
                if spec.timeout_secs == 0 {
                    continue;
                }
                let deadline =
                    started_at.unwrap_or(now_ms) + spec.timeout_secs as i64 * 1000 + grace_ms;
                if deadline < now_ms {
                    let completion = Completion {
                        outcome: OutcomeKind::TimedOut,
                        exit_code: None,
                        reason: format!(
                            "timed out after {}s (enforced by the coordinator)",
                            spec.timeout_secs
                        ),
                    };
                    apply_completion(tx, &lease, &completion, now_ms)?;
                    reaped.timed_out.push(lease);
                }
            }
            Ok(reaped)
        })
        .await
    }

    async fn request_drain(&self, agent_id: &str, now_ms: i64) -> StoreResult<Agent> {
        let agent_id = agent_id.to_string();
        self.tx(move |tx| {
            let n = tx
                .execute_cached(
                    "UPDATE sessions SET drain_requested = 1 WHERE agent_id = ?1 AND gone = 0 \
                     AND expires_at_ms >= ?2",
                    params![agent_id, now_ms],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!(
                    "agent {agent_id} (no live session; see `drover agents`)"
                )));
            }
            let row = tx
                .query_row_cached(
                    &format!(
                        "{AGENT_SELECT} WHERE s.agent_id = ?1 AND s.gone = 0 \
                         ORDER BY s.created_at_ms DESC LIMIT 1"
                    ),
                    [&agent_id],
                    |r| row_to_agent(r, now_ms),
                )
                .map_err(backend)?;
            finish_agent(row)
        })
        .await
    }

    async fn note_agent(&self, session_id: &str, note: &str) -> StoreResult<()> {
        let (session_id, note) = (session_id.to_string(), note.to_string());
        self.tx(move |tx| {
            let changed = tx
                .execute_cached(
                    "UPDATE sessions SET note = ?2 WHERE session_id = ?1",
                    params![session_id, note],
                )
                .map_err(backend)?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("session {session_id}")));
            }
            Ok(())
        })
        .await
    }

    async fn list_agents(&self, now_ms: i64, recent_ms: i64) -> StoreResult<Vec<Agent>> {
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare(&format!(
                    "{AGENT_SELECT} WHERE s.gone = 0 OR s.ended_at_ms >= ?1 \
                     ORDER BY s.pool, s.agent_id, s.created_at_ms"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map([now_ms - recent_ms], |r| row_to_agent(r, now_ms))
                .map_err(backend)?;
            let mut agents = Vec::new();
            for row in rows {
                agents.push(finish_agent(row.map_err(backend)?)?);
            }
            Ok(agents)
        })
        .await
    }

    async fn pools(&self, now_ms: i64) -> StoreResult<Vec<Pool>> {
        self.tx(move |tx| {
            let mut pools: BTreeMap<String, Pool> = BTreeMap::new();
            {
                let mut stmt = tx
                    .prepare("SELECT name, paused FROM pools")
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(backend)?;
                for row in rows {
                    let (name, paused) = row.map_err(backend)?;
                    pool_entry(&mut pools, &name).paused = paused != 0;
                }
            }
            {
                let mut stmt = tx
                    .prepare(
                        "SELECT pool, state, COUNT(*), MIN(created_at_ms) FROM jobs \
                         WHERE state IN ('QUEUED', 'LEASED', 'RUNNING') GROUP BY pool, state",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })
                    .map_err(backend)?;
                for row in rows {
                    let (name, state, count, oldest) = row.map_err(backend)?;
                    let pool = pool_entry(&mut pools, &name);
                    if state == "QUEUED" {
                        pool.queued += count as u64;
                        pool.oldest_queued_age_ms = Some(now_ms - oldest);
                    } else {
                        pool.running += count as u64;
                    }
                }
            }
            {
                let mut stmt = tx
                    .prepare(
                        "SELECT pool, COUNT(DISTINCT agent_id) FROM sessions \
                         WHERE gone = 0 AND expires_at_ms >= ?1 GROUP BY pool",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map([now_ms], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })
                    .map_err(backend)?;
                for row in rows {
                    let (name, agents) = row.map_err(backend)?;
                    pool_entry(&mut pools, &name).agents = agents as u64;
                }
            }
            Ok(pools.into_values().collect())
        })
        .await
    }

    async fn set_pool_paused(&self, pool: &str, paused: bool) -> StoreResult<()> {
        let pool = pool.to_string();
        self.tx(move |tx| {
            tx.execute_cached(
                "INSERT INTO pools (name, paused) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                params![pool, paused as i64],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn queued_needs(&self, pool: &str, limit: usize) -> StoreResult<Vec<JobNeeds>> {
        self.queued_needs_impl(pool, limit).await
    }

    async fn lost_sessions(&self, since_ms: i64, _now_ms: i64) -> StoreResult<Vec<LostSession>> {
        self.lost_sessions_impl(since_ms).await
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
        let lease = lease.clone();
        self.tx(move |tx| {
            tx.execute_cached(
                "UPDATE leaders SET expires_at_ms = ?4 \
                 WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
                params![lease.name, lease.holder, lease.epoch as i64, i64::MIN],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn scaler_states(&self) -> StoreResult<BTreeMap<String, String>> {
        self.tx(|tx| {
            let mut stmt = tx
                .prepare_cached("SELECT pool, state FROM scaler_states")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn put_scaler_state(
        &self,
        pool: &str,
        state: &str,
        lease: &LeaderLease,
    ) -> StoreResult<()> {
        let (pool, state, lease) = (pool.to_string(), state.to_string(), lease.clone());
        self.tx(move |tx| {
            let holds: Option<i64> = tx
                .query_row_cached(
                    "SELECT 1 FROM leaders WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
                    params![lease.name, lease.holder, lease.epoch as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            if holds.is_none() {
                return Err(StoreError::Conflict(format!(
                    "the {} lease (epoch {}) is no longer held by {}",
                    lease.name, lease.epoch, lease.holder
                )));
            }
            tx.execute_cached(
                "INSERT INTO scaler_states (pool, state) VALUES (?1, ?2) \
                 ON CONFLICT (pool) DO UPDATE SET state = excluded.state",
                params![pool, state],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn pool_capacity(&self, pool: &str) -> StoreResult<PoolCapacity> {
        let pool = pool.to_string();
        self.tx(move |tx| {
            let row: Option<(i64, Option<String>)> = tx
                .query_row_cached(
                    "SELECT paused, largest FROM pools WHERE name = ?1",
                    [&pool],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            Ok(match row {
                None => PoolCapacity::default(),
                Some((paused, largest)) => PoolCapacity {
                    paused: paused != 0,
                    largest: largest
                        .map(|l| serde_json::from_str(&l))
                        .transpose()
                        .map_err(json_err)?,
                },
            })
        })
        .await
    }
}

/// The scaler's side of the store: demand, lost sessions, its leader lease
/// and its per-pool records.
impl SqliteStore {
    async fn queued_needs_impl(&self, pool: &str, limit: usize) -> StoreResult<Vec<JobNeeds>> {
        let pool = pool.to_string();
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT cpu_millis, memory_mib, gpus, disk_gib, gpu_model, constraints \
                     FROM jobs INDEXED BY jobs_queue WHERE pool = ?1 AND state = 'QUEUED' \
                     ORDER BY priority DESC, rowid ASC LIMIT {limit}"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![pool], |r| {
                    Ok((
                        Resources {
                            cpu_millis: r.get(0)?,
                            memory_mib: r.get::<_, i64>(1)? as u64,
                            gpus: r.get(2)?,
                            disk_gib: r.get(3)?,
                            gpu_model: r.get(4)?,
                        },
                        r.get::<_, Option<String>>(5)?,
                    ))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (resources, constraints) = row.map_err(backend)?;
                let constraints = match constraints {
                    Some(c) => serde_json::from_str(&c).map_err(json_err)?,
                    None => BTreeMap::new(),
                };
                out.push(JobNeeds {
                    resources,
                    constraints,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn lost_sessions_impl(&self, since_ms: i64) -> StoreResult<Vec<LostSession>> {
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT session_id, agent_id, pool, labels, ended_at_ms FROM sessions \
                     WHERE gone = 1 AND ended_at_ms >= ?1 AND ended_at_ms > expires_at_ms \
                     ORDER BY ended_at_ms, session_id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([since_ms], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (session_id, agent_id, pool, labels, ended_at_ms) = row.map_err(backend)?;
                out.push(LostSession {
                    session_id,
                    agent_id,
                    pool,
                    labels: serde_json::from_str(&labels).map_err(json_err)?,
                    ended_at_ms,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn try_acquire_leader_impl(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: i64,
    ) -> StoreResult<Option<LeaderLease>> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.tx(move |tx| {
            let current: Option<(String, i64, i64)> = tx
                .query_row_cached(
                    "SELECT holder, epoch, expires_at_ms FROM leaders WHERE name = ?1",
                    [&name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            let epoch = match current {
                None => 1,
                Some((h, epoch, _)) if h == holder => epoch,
                Some((_, epoch, expires)) if expires < now_ms => epoch + 1,
                Some(_) => return Ok(None),
            };
            let expires_at_ms = now_ms + ttl_ms as i64;
            tx.execute_cached(
                "INSERT INTO leaders (name, holder, epoch, expires_at_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                 epoch = excluded.epoch, expires_at_ms = excluded.expires_at_ms",
                params![name, holder, epoch, expires_at_ms],
            )
            .map_err(backend)?;
            Ok(Some(LeaderLease {
                name,
                holder,
                epoch: epoch as u64,
                expires_at_ms,
            }))
        })
        .await
    }
}

fn pool_entry<'a>(pools: &'a mut BTreeMap<String, Pool>, name: &str) -> &'a mut Pool {
    pools.entry(name.to_string()).or_insert_with(|| Pool {
        pool: name.to_string(),
        queued: 0,
        running: 0,
        agents: 0,
        paused: false,
        oldest_queued_age_ms: None,
        scaling: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    type Answer<T> = tokio::sync::oneshot::Receiver<StoreResult<T>>;

    /// An operation for [`run_batch`] and where its answer arrives.
    fn call<T, F>(f: F) -> (Box<dyn Pending>, Answer<T>)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let op = Box::new(Call {
            f: Some(f),
            out: None,
            reply,
        });
        (op, answer)
    }

    fn keys(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT k FROM t ORDER BY k").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    fn insert(conn: &Connection, k: &str) -> StoreResult<()> {
        conn.execute("INSERT INTO t (k) VALUES (?1)", [k])
            .map(|_| ())
            .map_err(backend)
    }

    #[test]
    fn operations_batched_together_commit_or_fail_each_on_its_own() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .unwrap();
        let (a, mut a_answer) = call(|c| insert(c, "a").map(|()| 1));
        let (b, mut b_answer) = call(|c| -> StoreResult<()> {
            insert(c, "b")?;
            Err(StoreError::Conflict("changed its mind".into()))
        });
        // Sees what ran before it in the batch, not what was undone.
        let (c, mut c_answer) = call(|c| Ok(keys(c)));
        let (d, mut d_answer) = call(|c| -> StoreResult<()> {
            insert(c, "d")?;
            panic!("a bug in one operation")
        });
        let (e, mut e_answer) = call(|c| insert(c, "a"));
        run_batch(&conn, vec![a, b, c, d, e]);
        assert_eq!(a_answer.try_recv().unwrap().unwrap(), 1);
        assert!(matches!(
            b_answer.try_recv().unwrap(),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(c_answer.try_recv().unwrap().unwrap(), ["a"]);
        assert!(
            matches!(d_answer.try_recv().unwrap(), Err(StoreError::Backend(m)) if m.contains("panicked"))
        );
        // A constraint violation (the key "a" again) fails only itself.
        assert!(matches!(
            e_answer.try_recv().unwrap(),
            Err(StoreError::Backend(_))
        ));
        assert!(conn.is_autocommit());
        assert_eq!(keys(&conn), ["a"]);
    }

    #[test]
    fn a_transaction_sqlite_abandons_fails_every_operation_that_ran_in_it() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .unwrap();
        let (a, mut a_answer) = call(|c| insert(c, "a"));
        // What SQLite does on a full disk or an I/O error: the whole
        // transaction is rolled back under the operation's feet.
        let (b, mut b_answer) = call(|c| {
            c.execute_batch("ROLLBACK").map_err(backend)?;
            Ok(())
        });
        let (c, mut c_answer) = call(|c| insert(c, "c"));
        run_batch(&conn, vec![a, b, c]);
        assert!(a_answer.try_recv().unwrap().is_err());
        assert!(b_answer.try_recv().unwrap().is_err());
        // The next operations run in a transaction of their own.
        c_answer.try_recv().unwrap().unwrap();
        assert_eq!(keys(&conn), ["c"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_thread_copies_commits_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        let store = SqliteStore::open(&path).unwrap();
        store.with_conn(|c| {
            c.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY)")
                .unwrap()
        });
        for i in 0..50 {
            store
                .tx(move |c| insert(c, &format!("{i:02}")))
                .await
                .unwrap();
        }
        // The file alone (without its WAL) holds every commit once the
        // checkpoint thread has been by; the writer never checkpointed
        // (its threshold is far away).
        let copy = dir.path().join("copy.db");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            std::fs::copy(&path, &copy).unwrap();
            let rows = Connection::open(&copy)
                .and_then(|c| c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0)))
                .unwrap_or(0);
            if rows == 50 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never checkpointed: {rows} rows in the file"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_operations_all_commit_through_the_connection_thread() {
        let store = SqliteStore::in_memory().unwrap();
        store.with_conn(|c| {
            c.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY)")
                .unwrap()
        });
        let calls = (0..500).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.tx(move |c| insert(c, &format!("{i:03}"))).await })
        });
        for done in futures::future::join_all(calls).await {
            done.unwrap().unwrap();
        }
        assert_eq!(store.with_conn(keys).len(), 500);
    }

    /// The `jobs`, `events` and `sessions` tables as releases before
    /// workflows, attempt prices and agent notes created them.
    const OLD_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    spec TEXT NOT NULL,
    cpu_millis INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    disk_gib INTEGER NOT NULL,
    gpu_model TEXT,
    constraints TEXT,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    infra_retries INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    not_before_ms INTEGER NOT NULL DEFAULT 0,
    session_id TEXT,
    agent_id TEXT,
    leased_at_ms INTEGER,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    exit_code INTEGER,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    missed_reports INTEGER NOT NULL DEFAULT 0,
    next_event_seq INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(pool, priority DESC) WHERE state = 'QUEUED';
CREATE INDEX IF NOT EXISTS jobs_session ON jobs(session_id) WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state) WHERE state IN ('LEASED', 'RUNNING');
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    agent_id TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL,
    capacity TEXT NOT NULL,
    runtime TEXT NOT NULL,
    version TEXT NOT NULL,
    health_addr TEXT NOT NULL,
    ttl_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    gone INTEGER NOT NULL DEFAULT 0,
    ended_at_ms INTEGER,
    draining INTEGER NOT NULL DEFAULT 0,
    drain_requested INTEGER NOT NULL DEFAULT 0
);
"#;

    const OLD_JOB: &str = "01HZZZZZZZZZZZZZZZZZZZZZZZ";

    /// An old-version database file holding one QUEUED job and its event.
    fn old_database(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(OLD_SCHEMA).unwrap();
        let spec = serde_json::to_string(&JobSpec::command(["true"])).unwrap();
        conn.execute(
            "INSERT INTO jobs (id, pool, name, priority, spec, cpu_millis, memory_mib, gpus, \
             disk_gib, state, created_at_ms, updated_at_ms, next_event_seq) \
             VALUES (?1, 'default', '', 0, ?2, 1000, 512, 0, 0, 'QUEUED', ?3, ?3, 2)",
            params![OLD_JOB, spec, T0],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO events (job_id, seq, at_ms, attempt, state, reason) \
             VALUES (?1, 1, ?2, 0, 'QUEUED', 'submitted')",
            params![OLD_JOB, T0],
        )
        .unwrap();
    }

    fn columns(store: &SqliteStore, table: &str) -> Vec<String> {
        let table = table.to_string();
        store.with_conn(move |conn| {
            let mut stmt = conn
                .prepare("SELECT name FROM pragma_table_info(?1)")
                .unwrap();
            let rows = stmt.query_map([table], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        })
    }

    #[tokio::test]
    async fn a_database_from_before_workflows_opens_and_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        old_database(&path);

        let store = SqliteStore::open(&path).unwrap();
        assert!(columns(&store, "events").contains(&"usd_per_hour".to_string()));
        assert!(columns(&store, "sessions").contains(&"note".to_string()));
        for table in ["runs", "job_links"] {
            assert!(!columns(&store, table).is_empty(), "{table}");
        }
        let old = store.get_job(OLD_JOB).await.unwrap();
        assert_eq!((old.state, old.workflow), (JobState::Queued, None));
        let events = store.events(OLD_JOB).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].usd_per_hour, None);

        // The old job runs, with a price on its RUNNING event.
        store
            .create_session(
                &NewSession {
                    session_id: "s1".into(),
                    token_hash: "h".into(),
                    agent_id: "a1".into(),
                    pool: "default".into(),
                    hostname: "host".into(),
                    labels: BTreeMap::new(),
                    capacity: Resources::default(),
                    runtime: "process".into(),
                    version: "test".into(),
                    health_addr: String::new(),
                    ttl_ms: 60_000,
                },
                T0,
            )
            .await
            .unwrap();
        let offer = ClaimOffer {
            session_id: "s1".into(),
            agent_id: "a1".into(),
            pool: "default".into(),
            labels: BTreeMap::new(),
            free: Resources {
                cpu_millis: 4000,
                memory_mib: 4096,
                gpus: 0,
                disk_gib: 10,
                gpu_model: None,
            },
            max_jobs: 1,
        };
        store.note_agent("s1", "noted").await.unwrap();
        let agents = store.list_agents(T0, 0).await.unwrap();
        assert_eq!(agents[0].note.as_deref(), Some("noted"));
        let claimed = store.claim(&offer, 8, T0 + 1).await.unwrap();
        assert_eq!(claimed[0].lease.job_id, OLD_JOB);
        store
            .start(&claimed[0].lease, T0 + 2, Some(0.5))
            .await
            .unwrap();
        let done = store
            .complete(
                &claimed[0].lease,
                &Completion {
                    outcome: OutcomeKind::Succeeded,
                    exit_code: Some(0),
                    reason: "ok".into(),
                },
                T0 + 3,
            )
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert!(done.released.is_empty());
        let events = store.events(OLD_JOB).await.unwrap();
        let prices: Vec<_> = events.iter().map(|e| (e.state, e.usd_per_hour)).collect();
        assert_eq!(
            prices,
            [
                (JobState::Queued, None),
                (JobState::Leased, None),
                (JobState::Running, Some(0.5)),
                (JobState::Succeeded, None),
            ]
        );

        // New jobs and workflow runs go in next to it.
        let run_id = ulid::Ulid::new().to_string();
        let job_id = ulid::Ulid::new().to_string();
        let run = RunRecord {
            id: run_id.clone(),
            name: "wf".into(),
            description: "after the upgrade".into(),
            created_at_ms: T0,
            steps: vec![drover_proto::workflow::RunStep {
                name: "only".into(),
                depends_on: Vec::new(),
                array: None,
                jobs: vec![job_id.clone()],
            }],
            cancel_requested: false,
        };
        store
            .create_run(
                &run,
                vec![NewJob {
                    id: job_id.clone(),
                    spec: JobSpec::command(["true"]),
                    workflow: Some(WorkflowLink {
                        run_id,
                        step: "only".into(),
                        task_index: None,
                    }),
                }],
                T0 + 4,
            )
            .await
            .unwrap();
        assert_eq!(
            store.get_job(&job_id).await.unwrap().state,
            JobState::Queued
        );
        drop(store);

        // Opening it again (already migrated) changes nothing.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get_run(&run.id).await.unwrap(), run);
        assert_eq!(store.events(OLD_JOB).await.unwrap().len(), 4);
        let usd = columns(&store, "events")
            .iter()
            .filter(|c| *c == "usd_per_hour")
            .count();
        assert_eq!(usd, 1);
        let note = columns(&store, "sessions")
            .iter()
            .filter(|c| *c == "note")
            .count();
        assert_eq!(note, 1);
    }

    #[test]
    fn coordinators_opening_an_old_file_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        old_database(&path);
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(columns(&store, "events").contains(&"usd_per_hour".to_string()));
        assert!(columns(&store, "sessions").contains(&"note".to_string()));
    }
}
