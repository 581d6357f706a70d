//! One attempt of one job: start it, report it started, stream its output,
//! supervise it (timeout, stop orders) and record its outcome.
//!
//! Guarantees: log chunks are flushed before Complete; a lease found lost
//! (FAILED_PRECONDITION, a Kill order, a fence) kills the job and never
//! completes it; transient coordinator errors are retried with backoff.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::agent::Shared;
use crate::artifacts;
use crate::client::{Auth, Backoff, CallError};
use crate::gpu::GpuDevice;
use crate::runtime::docker::PullPolicy;
use crate::runtime::{supervise, JobDirs, OutputChunk, RunSpec, RuntimeError, StopOrder, Stream};

/// Largest AppendLogs batch, in bytes of output.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Longest a piece of output waits before it is sent.
pub const BATCH_DELAY: Duration = Duration::from_millis(100);
/// Most output an attempt keeps after sending it until the coordinator says
/// it is durable, to resend what a stopped coordinator lost. Past it the
/// oldest bytes are let go; if a coordinator then loses them, the log gets a
/// marker of the same length in their place ([`RetainedTail::rewind`]).
pub const RETAIN_BYTES: usize = 16 << 20;
/// Resend orders in a row before the shipper gives up on the attempt's
/// output (the job carries on): a coordinator that keeps losing what it
/// is sent is broken, not crashed.
const MAX_RESENDS: u32 = 8;

fn name(lease: &v1::LeaseRef) -> String {
    format!("{}#{}", lease.job_id, lease.attempt)
}

/// Where attempts keep their input, output and scratch directories.
fn attempts_root(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("attempts")
}

/// Where finished attempts' directories wait for the next attempts.
pub(crate) fn free_dirs_root(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("attempts-free")
}

fn attempt_dir(data_dir: &std::path::Path, lease: &v1::LeaseRef) -> std::path::PathBuf {
    let safe: String = lease
        .job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    attempts_root(data_dir).join(format!("{safe}-{}", lease.attempt))
}

fn outcome_of(e: &RuntimeError) -> v1::Outcome {
    if e.is_job_failure() {
        v1::Outcome::Failed
    } else {
        v1::Outcome::Interrupted
    }
}

fn spec_from(
    lease: &v1::LeaseRef,
    payload: v1::JobPayload,
    gpus: Vec<GpuDevice>,
    dirs: JobDirs,
) -> RunSpec {
    RunSpec {
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
        name: payload.name,
        image: payload.image,
        argv: payload.command,
        env: payload.env.into_iter().collect(),
        secret_env: payload.secret_env.into_iter().collect(),
        workdir: (!payload.workdir.is_empty()).then(|| payload.workdir.into()),
        user: (!payload.user.is_empty()).then_some(payload.user),
        resources: payload.resources.unwrap_or_default(),
        cpu_hard_limit: payload.cpu_hard_limit,
        gpus,
        session: lease.session_id.clone(),
        // Empty or unknown: the image reference decides.
        pull_policy: match payload.pull_policy.as_str() {
            "always" => Some(PullPolicy::Always),
            "if-not-present" => Some(PullPolicy::IfNotPresent),
            _ => None,
        },
        dirs: Some(dirs),
    }
}

fn killed(orders: &watch::Receiver<Option<StopOrder>>) -> bool {
    matches!(*orders.borrow(), Some(StopOrder::Kill))
}

/// Resolves once a Kill order arrives (never if the sender is gone first).
async fn kill_ordered(orders: &mut watch::Receiver<Option<StopOrder>>) {
    if orders
        .wait_for(|o| matches!(o, Some(StopOrder::Kill)))
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

/// Runs the attempt to its end. The caller removes it from the job table.
pub(crate) async fn run(
    shared: Arc<Shared>,
    auth: Auth,
    lease: v1::LeaseRef,
    payload: v1::JobPayload,
    gpus: Vec<GpuDevice>,
    orders: watch::Receiver<Option<StopOrder>>,
    begin: Begin,
) {
    let timeout = (payload.timeout_ms > 0).then(|| Duration::from_millis(payload.timeout_ms));
    let timeout_ms = payload.timeout_ms;
    let grace = Duration::from_millis(if payload.kill_grace_ms > 0 {
        payload.kill_grace_ms
    } else {
        shared.config.kill_grace_ms
    });
    if killed(&orders) {
        shared.metrics.job_finished("lost");
        return;
    }
    let root = attempt_dir(&shared.config.data_dir, &lease);
    let keep_outputs = payload.outputs;
    let reusable = shared.runtime.confines_jobs() || payload.user.is_empty();
    let (dirs, started) = match begin {
        // Everything before the job runs: its directories, its lease kept
        // beside them (for adoption), its inputs, the start.
        Begin::Start => {
            let empty_input = shared.config.data_dir.join(EMPTY_INPUT_DIR);
            let shared_input = payload.inputs.is_empty().then_some(empty_input.as_path());
            let dirs = match JobDirs::create_in(&shared.dirs, root, shared_input).await {
                Ok(dirs) => dirs,
                Err(e) => return not_started(&shared, &auth, &lease, &orders, e, None).await,
            };
            if shared.runtime.adopts() {
                save_lease(&dirs, &lease, &payload, &gpus).await;
            }
            if let Err(e) =
                artifacts::fetch_inputs(shared.client.http(), &dirs, &payload.inputs).await
            {
                return not_started(&shared, &auth, &lease, &orders, e, Some(&dirs)).await;
            }
            let spec = spec_from(&lease, payload, gpus, dirs.clone());
            match shared.runtime.start(spec).await {
                Ok(started) => (dirs, started),
                Err(e) => {
                    return not_started(&shared, &auth, &lease, &orders, e, Some(&dirs)).await
                }
            }
        }
        // An earlier run of this agent started it; take it over.
        Begin::Adopt => {
            let dirs = JobDirs::at(root);
            let spec = spec_from(&lease, payload, gpus, dirs.clone());
            match shared.runtime.adopt(&spec).await {
                Ok(Some(started)) => (dirs, started),
                Ok(None) => {
                    let e = RuntimeError::Infra(format!(
                        "agent restarted; the {} runtime found no job to adopt",
                        shared.runtime.name()
                    ));
                    return not_started(&shared, &auth, &lease, &orders, e, Some(&dirs)).await;
                }
                Err(e) => {
                    return not_started(&shared, &auth, &lease, &orders, e, Some(&dirs)).await
                }
            }
        }
    };
    let crate::runtime::Started { mut job, output } = started;
    tracing::info!(job = %name(&lease), adopted = matches!(begin, Begin::Adopt), "started");
    let shipper = tokio::spawn(ship_output(
        shared.clone(),
        auth.clone(),
        lease.clone(),
        output,
        orders.clone(),
    ));
    let ended = supervise(job.as_mut(), timeout, grace, orders.clone()).await;
    // The output ends once the job's process group is gone; flush it all
    // before Complete.
    let shipped = shipper.await;

    let lease_lost = matches!(shipped, Ok(Err(CallError::LeaseLost(_))))
        || matches!(shipped, Ok(Err(CallError::SessionGone(_))));
    if killed(&orders) || lease_lost {
        tracing::warn!(job = %name(&lease), "lease lost: job killed, not completed");
        shared.metrics.job_finished("lost");
        job.cleanup().await;
        release_dirs(&shared, &dirs, reusable).await;
        return;
    }
    let (mut outcome, exit_code, mut reason) = match ended {
        Err(e) => (
            v1::Outcome::Interrupted,
            None,
            format!("agent lost track of the job: {e}"),
        ),
        Ok(ended) => {
            let status = ended.status;
            let how = status.describe();
            if ended.timed_out {
                (
                    v1::Outcome::TimedOut,
                    status.code,
                    format!("timed out after {timeout_ms} ms ({how})"),
                )
            } else {
                match ended.stopped_by {
                    Some(StopOrder::Cancel) => (
                        v1::Outcome::Cancelled,
                        status.code,
                        format!("cancelled by an operator ({how})"),
                    ),
                    Some(StopOrder::Interrupt) => {
                        let why = shared
                            .state()
                            .drain_reason
                            .clone()
                            .unwrap_or_else(|| "drain".into());
                        (
                            v1::Outcome::Interrupted,
                            status.code,
                            format!("stopped at the agent's drain deadline (drain: {why}; {how})"),
                        )
                    }
                    Some(StopOrder::Kill) => unreachable!("handled above"),
                    None if status.success() => (v1::Outcome::Succeeded, status.code, how),
                    None => (v1::Outcome::Failed, status.code, how),
                }
            }
        }
    };
    if let Ok(Err(e)) = &shipped {
        tracing::warn!(job = %name(&lease), "some output was not stored: {e}");
    }
    let ran_to_end = matches!(outcome, v1::Outcome::Succeeded | v1::Outcome::Failed);
    if keep_outputs && ran_to_end {
        let mut orders = orders.clone();
        match keep_output(&shared, &auth, &lease, &dirs, &mut orders).await {
            Ok(bytes) => tracing::info!(job = %name(&lease), bytes, "output kept"),
            Err(KeepError::LeaseLost) => {
                tracing::warn!(job = %name(&lease), "lease lost while keeping the output: not completed");
                shared.metrics.job_finished("lost");
                job.cleanup().await;
                release_dirs(&shared, &dirs, reusable).await;
                return;
            }
            Err(KeepError::Failed(e)) => {
                tracing::warn!(job = %name(&lease), "output not kept: {e}");
                if outcome == v1::Outcome::Succeeded {
                    // The result is incomplete without its output: a job
                    // fault fails it, an infrastructure fault runs it again.
                    outcome = outcome_of(&e);
                    reason = format!("the job succeeded but its output was not kept: {e}");
                } else {
                    reason = format!("{reason}; its output was not kept: {e}");
                }
            }
        }
    }
    complete(
        &shared,
        &auth,
        &lease,
        outcome,
        exit_code,
        reason,
        Some(&orders),
    )
    .await;
    // Removing the container and its directories is not part of the result:
    // report first, clean up after (the slot stays taken until then).
    job.cleanup().await;
    release_dirs(&shared, &dirs, reusable).await;
}

/// Done with the attempt's dirs (its job cleaned up): kept for the next
/// attempt when nothing of the job can reach them, else removed.
async fn release_dirs(shared: &Shared, dirs: &JobDirs, reusable: bool) {
    let agent_files: &'static [&'static str] = if shared.runtime.adopts() {
        &[LEASE_FILE, GPUS_FILE]
    } else {
        &[]
    };
    dirs.release(&shared.dirs, agent_files, reusable).await;
}

/// How an attempt begins on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Begin {
    /// A fresh lease: make its dirs, fetch its inputs, start it.
    Start,
    /// A lease an earlier run of this agent started (restart within the
    /// session's TTL): take over the job the runtime still has.
    Adopt,
}

/// The lease and its payload (env included: mode 0600) beside the
/// attempt's dirs, with the GPUs it was given, so a restarted agent can
/// adopt it.
async fn save_lease(
    dirs: &JobDirs,
    lease: &v1::LeaseRef,
    payload: &v1::JobPayload,
    gpus: &[GpuDevice],
) {
    use prost::Message;
    let saved = v1::Lease {
        lease: Some(lease.clone()),
        job: Some(payload.clone()),
    };
    let uuids: String = gpus.iter().map(|g| format!("{}\n", g.uuid)).collect();
    let write = async {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true).mode(0o600);
        std::io::Write::write_all(
            &mut options.open(dirs.root.join(LEASE_FILE))?,
            &saved.encode_to_vec(),
        )?;
        if uuids.is_empty() {
            return Ok(());
        }
        std::fs::write(dirs.root.join(GPUS_FILE), uuids)
    };
    if let Err(e) = write.await {
        tracing::warn!(job = %name(lease), "cannot keep the lease beside the job (a restart will not adopt it): {e}");
    }
}

const LEASE_FILE: &str = "lease.pb";
/// Under the data dir: the empty, read-only input dir that attempts without
/// inputs share.
const EMPTY_INPUT_DIR: &str = "empty-input";
const GPUS_FILE: &str = "gpus";

/// What [`save_lease`] kept for `lease`: its payload and GPU UUIDs.
pub(crate) fn saved_lease(
    data_dir: &std::path::Path,
    lease: &v1::LeaseRef,
) -> Option<(v1::JobPayload, Vec<String>)> {
    use prost::Message;
    let root = attempt_dir(data_dir, lease);
    let bytes = std::fs::read(root.join(LEASE_FILE)).ok()?;
    let saved = v1::Lease::decode(bytes.as_slice()).ok()?;
    let same = saved.lease.as_ref().is_some_and(|l| {
        l.job_id == lease.job_id && l.attempt == lease.attempt && l.session_id == lease.session_id
    });
    let gpus = std::fs::read_to_string(root.join(GPUS_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    same.then_some(())?;
    Some((saved.job?, gpus))
}

/// Removes the attempt dirs of an earlier run except those of `keep`.
pub(crate) async fn remove_leftover_dirs_except(data_dir: &std::path::Path, keep: &[v1::LeaseRef]) {
    let keep: Vec<std::path::PathBuf> = keep.iter().map(|l| attempt_dir(data_dir, l)).collect();
    let Ok(mut entries) = tokio::fs::read_dir(attempts_root(data_dir)).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if !keep.contains(&path) {
            if let Err(e) = tokio::fs::remove_dir_all(&path).await {
                tracing::warn!(dir = %path.display(), "cannot remove leftover attempt dirs: {e}");
            }
        }
    }
}

/// An attempt that could not start: completed as FAILED (the job's fault)
/// or INTERRUPTED (the host's), its directories removed.
async fn not_started(
    shared: &Arc<Shared>,
    auth: &Auth,
    lease: &v1::LeaseRef,
    orders: &watch::Receiver<Option<StopOrder>>,
    e: RuntimeError,
    dirs: Option<&JobDirs>,
) {
    tracing::warn!(job = %name(lease), "cannot start: {e}");
    complete(
        shared,
        auth,
        lease,
        outcome_of(&e),
        None,
        e.to_string(),
        Some(orders),
    )
    .await;
    if let Some(dirs) = dirs {
        dirs.remove().await;
    }
}

enum KeepError {
    LeaseLost,
    Failed(RuntimeError),
}

/// Upload attempts for one output (a fresh signed URL each).
const UPLOAD_TRIES: u32 = 3;

/// Packs the output directory and uploads it through a fenced, signed URL.
/// Returns the archive's size.
async fn keep_output(
    shared: &Arc<Shared>,
    auth: &Auth,
    lease: &v1::LeaseRef,
    dirs: &JobDirs,
    orders: &mut watch::Receiver<Option<StopOrder>>,
) -> Result<u64, KeepError> {
    let packed = artifacts::pack_output(dirs)
        .await
        .map_err(KeepError::Failed)?;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut tries = 0;
    loop {
        tries += 1;
        let url = match retry_call(orders, || {
            shared.client.artifact_upload_url(auth, lease.clone())
        })
        .await
        {
            Ok(url) => url,
            Err(CallError::LeaseLost(_) | CallError::SessionGone(_)) => {
                return Err(KeepError::LeaseLost)
            }
            Err(e) => {
                return Err(KeepError::Failed(RuntimeError::Infra(format!(
                    "no upload URL: {e}"
                ))))
            }
        };
        match artifacts::upload(shared.client.http(), &packed, &url).await {
            Ok(()) => return Ok(packed.bytes),
            Err(e) if e.is_job_failure() || tries >= UPLOAD_TRIES => {
                return Err(KeepError::Failed(e))
            }
            Err(e) => {
                tracing::warn!(job = %name(lease), "upload failed, retrying: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

fn outcome_label(outcome: v1::Outcome) -> &'static str {
    match outcome {
        v1::Outcome::Succeeded => "succeeded",
        v1::Outcome::Failed => "failed",
        v1::Outcome::Cancelled => "cancelled",
        v1::Outcome::TimedOut => "timed_out",
        v1::Outcome::Interrupted | v1::Outcome::Unspecified => "interrupted",
    }
}

/// Records the outcome, retrying transient failures until it is stored, the
/// lease is found lost, or (with `orders`) a Kill order arrives.
pub(crate) async fn complete(
    shared: &Arc<Shared>,
    auth: &Auth,
    lease: &v1::LeaseRef,
    outcome: v1::Outcome,
    exit_code: Option<i32>,
    reason: String,
    orders: Option<&watch::Receiver<Option<StopOrder>>>,
) {
    let req = v1::CompleteRequest {
        lease: Some(lease.clone()),
        outcome: outcome as i32,
        exit_code,
        reason: reason.clone(),
    };
    let mut orders = orders.cloned();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut warned = false;
    loop {
        // A call in flight always finishes: the coordinator may already
        // have recorded it. A kill order only stops further retries.
        let result = shared.client.complete(auth, req.clone()).await;
        match result {
            Ok(state) => {
                tracing::info!(job = %name(lease), outcome = outcome_label(outcome), %reason, %state, "completed");
                shared.metrics.job_finished(outcome_label(outcome));
                return;
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                if !warned {
                    tracing::warn!(job = %name(lease), "Complete failed: {e}; retrying");
                    warned = true;
                }
                match orders.as_mut() {
                    Some(o) => tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = kill_ordered(o) => {
                            shared.metrics.job_finished("lost");
                            return;
                        }
                    },
                    None => tokio::time::sleep(delay).await,
                }
            }
            Err(e) => {
                tracing::warn!(job = %name(lease), "Complete not recorded: {e}");
                shared.metrics.job_finished("lost");
                return;
            }
        }
    }
}

/// A batch of output waiting to be sent, with offsets already assigned.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Bytes of the combined log assigned so far (the next chunk's offset).
    pub next_offset: u64,
    pub chunks: Vec<v1::LogChunk>,
    pub bytes: usize,
}

impl Batch {
    /// Appends output at the next offset, merging with the previous chunk
    /// when it is from the same stream.
    pub fn push(&mut self, chunk: OutputChunk) {
        let stream = match chunk.stream {
            Stream::Stdout => v1::LogStream::Stdout,
            Stream::Stderr => v1::LogStream::Stderr,
        } as i32;
        let len = chunk.data.len();
        match self.chunks.last_mut() {
            Some(last) if last.stream == stream => last.data.extend_from_slice(&chunk.data),
            _ => self.chunks.push(v1::LogChunk {
                offset: self.next_offset,
                data: chunk.data.to_vec(),
                stream,
            }),
        }
        self.next_offset += len as u64;
        self.bytes += len;
    }

    pub fn take(&mut self) -> Vec<v1::LogChunk> {
        self.bytes = 0;
        std::mem::take(&mut self.chunks)
    }
}

/// Output sent but not yet durable (offsets `start()..end()`), kept to
/// resend when a coordinator stops before persisting it. At most `cap` bytes
/// of output are kept; older ones are let go even if not durable.
#[derive(Debug)]
pub(crate) struct RetainedTail {
    /// Contiguous, from `start` to `end`.
    pieces: VecDeque<Piece>,
    start: u64,
    end: u64,
    /// The furthest durable offset a coordinator reported.
    durable: u64,
    /// Bytes of output held (markers are made when sent, not held).
    held: usize,
    cap: usize,
}

#[derive(Debug)]
enum Piece {
    Output(v1::LogChunk),
    /// The region `at..at + len` of bytes a coordinator lost beyond what
    /// was kept: a marker of that length, held from offset `from`.
    Lost {
        at: u64,
        len: u64,
        from: u64,
    },
}

impl Piece {
    fn range(&self) -> (u64, u64) {
        match self {
            Piece::Output(c) => (c.offset, c.offset + c.data.len() as u64),
            Piece::Lost { at, len, from } => (*from, at + len),
        }
    }
}

/// The notice for `len` lost bytes.
fn marker(len: u64) -> String {
    format!("\n[drover: {len} bytes of output lost when a coordinator stopped]\n")
}

/// Byte `pos` of the `len` bytes standing in for lost output: the notice,
/// then spaces up to a final newline (cut short if `len` is shorter).
fn marker_byte(len: u64, pos: u64) -> u8 {
    let text = marker(len);
    let body = text.len() as u64 - 1;
    if len <= body || pos < body {
        text.as_bytes()[pos as usize]
    } else if pos + 1 == len {
        b'\n'
    } else {
        b' '
    }
}

impl RetainedTail {
    pub fn new(cap: usize) -> RetainedTail {
        RetainedTail {
            pieces: VecDeque::new(),
            start: 0,
            end: 0,
            durable: 0,
            held: 0,
            cap,
        }
    }

    /// The next offset to send (every byte before it was sent once).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// True when a coordinator reported every sent byte durable.
    pub fn is_durable(&self) -> bool {
        self.durable >= self.end
    }

    /// Keeps chunks just sent (they continue at [`end`](Self::end)); lets
    /// the oldest output go beyond the cap.
    pub fn keep(&mut self, chunks: Vec<v1::LogChunk>) {
        for chunk in chunks {
            debug_assert_eq!(chunk.offset, self.end, "output is kept in order");
            if chunk.data.is_empty() {
                continue;
            }
            self.end += chunk.data.len() as u64;
            self.held += chunk.data.len();
            self.pieces.push_back(Piece::Output(chunk));
        }
        while self.held > self.cap {
            let excess = (self.held - self.cap) as u64;
            self.drop_front(self.start + excess);
        }
    }

    /// Forgets what a coordinator reported durable.
    pub fn confirm(&mut self, durable: u64) {
        self.durable = self.durable.max(durable.min(self.end));
        self.drop_front(self.durable);
    }

    /// Drops kept bytes before `to`.
    fn drop_front(&mut self, to: u64) {
        let to = to.min(self.end);
        while let Some(front) = self.pieces.front_mut() {
            let (from, end) = front.range();
            if end <= to {
                if let Piece::Output(c) = front {
                    self.held -= c.data.len();
                }
                self.pieces.pop_front();
                continue;
            }
            if from < to {
                let cut = to - from;
                match front {
                    Piece::Output(c) => {
                        c.data.drain(..cut as usize);
                        c.offset = to;
                        self.held -= cut as usize;
                    }
                    Piece::Lost { from, .. } => *from = to,
                }
            }
            break;
        }
        self.start = self.start.max(to);
    }

    /// Prepares a resend from `from`, where a coordinator's stored output
    /// ends. Bytes from there that were let go (beyond the cap) become a
    /// marker of the same length, so every later offset stays as sent; a
    /// short loss takes a few kept bytes with it so that the marker fits.
    /// Returns how many bytes the marker replaces (0: all was kept).
    pub fn rewind(&mut self, from: u64) -> u64 {
        // That coordinator holds no more than `from`, durable or not.
        self.durable = self.durable.min(from);
        if from >= self.start {
            return 0;
        }
        let mut len = self.start - from;
        while (marker(len).len() as u64) > len {
            len = marker(len).len() as u64;
        }
        let len = len.min(self.end - from);
        self.drop_front(from + len);
        self.pieces.push_front(Piece::Lost {
            at: from,
            len,
            from,
        });
        self.start = from;
        len
    }

    /// Chunks holding up to `max_bytes` of the kept output from `from`.
    pub fn chunks(&self, from: u64, max_bytes: usize) -> Vec<v1::LogChunk> {
        let limit = from.max(self.start) + max_bytes as u64;
        let mut out = Vec::new();
        for piece in &self.pieces {
            let (start, end) = piece.range();
            let (lo, hi) = (start.max(from), end.min(limit));
            if lo >= hi {
                continue;
            }
            let chunk = match piece {
                Piece::Output(c) => v1::LogChunk {
                    offset: lo,
                    data: c.data[(lo - start) as usize..(hi - start) as usize].to_vec(),
                    stream: c.stream,
                },
                Piece::Lost { at, len, .. } => v1::LogChunk {
                    offset: lo,
                    data: (lo..hi).map(|p| marker_byte(*len, p - at)).collect(),
                    stream: v1::LogStream::Stderr as i32,
                },
            };
            out.push(chunk);
        }
        out
    }
}

/// Sends the kept output from `from` to its end in calls of up to
/// [`BATCH_BYTES`], resending from wherever a coordinator says its stored
/// output ends; with `flush`, the last call makes it all durable.
async fn send_kept(
    shared: &Shared,
    auth: &Auth,
    lease: &v1::LeaseRef,
    orders: &mut watch::Receiver<Option<StopOrder>>,
    tail: &mut RetainedTail,
    mut from: u64,
    flush: bool,
) -> Result<(), CallError> {
    let mut resends = 0;
    loop {
        if from >= tail.end() && (!flush || tail.is_durable()) {
            return Ok(());
        }
        let chunks = tail.chunks(from, BATCH_BYTES);
        let to = chunks
            .last()
            .map_or(from, |c| c.offset + c.data.len() as u64);
        let last = to >= tail.end();
        let req = v1::AppendLogsRequest {
            lease: Some(lease.clone()),
            chunks,
            flush: flush && last,
        };
        let answer = retry_call(orders, || shared.client.append_logs(auth, req.clone())).await?;
        tail.confirm(answer.durable_bytes);
        match answer.resend_from {
            Some(at) => {
                resends += 1;
                if resends > MAX_RESENDS {
                    return Err(CallError::Rejected {
                        code: tonic::Code::DataLoss,
                        message: format!(
                            "the coordinator asked to resend output from offset {at} {MAX_RESENDS} times in a row; the rest of this attempt's output is not stored"
                        ),
                    });
                }
                let lost = tail.rewind(at);
                if lost > 0 {
                    tracing::warn!(job = %name(lease), offset = at, bytes = lost, "a coordinator lost output beyond what the agent kept ({RETAIN_BYTES} bytes): marked in the log");
                } else {
                    tracing::info!(job = %name(lease), offset = at, "a coordinator lost output before persisting it: resending");
                }
                from = at.min(tail.end());
            }
            None if last => return Ok(()),
            None => {
                resends = 0;
                from = to;
            }
        }
    }
}

/// ReportStarted, then AppendLogs in batches of up to [`BATCH_BYTES`] or
/// [`BATCH_DELAY`] until the output ends, keeping what is not yet durable
/// to resend; the last call makes it all durable. Returns the error that
/// stopped it; on a lost lease it orders the job killed.
async fn ship_output(
    shared: Arc<Shared>,
    auth: Auth,
    lease: v1::LeaseRef,
    mut output: mpsc::Receiver<OutputChunk>,
    mut orders: watch::Receiver<Option<StopOrder>>,
) -> Result<(), CallError> {
    let result = async {
        retry_call(&mut orders, || {
            shared.client.report_started(&auth, lease.clone())
        })
        .await?;
        let mut batch = Batch::default();
        let mut tail = RetainedTail::new(RETAIN_BYTES);
        let mut flush_at: Option<Instant> = None;
        loop {
            let flush_due = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let done = tokio::select! {
                chunk = output.recv() => match chunk {
                    Some(chunk) => {
                        batch.push(chunk);
                        flush_at.get_or_insert_with(|| Instant::now() + BATCH_DELAY);
                        false
                    }
                    None => true,
                },
                () = flush_due => false,
            };
            let due = flush_at.is_some_and(|at| at <= Instant::now());
            if done || due || batch.bytes >= BATCH_BYTES {
                flush_at = None;
                let from = tail.end();
                tail.keep(batch.take());
                // The last call makes all output durable before Complete.
                send_kept(&shared, &auth, &lease, &mut orders, &mut tail, from, done).await?;
            }
            if done {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(CallError::LeaseLost(why) | CallError::SessionGone(why)) = &result {
        tracing::warn!(job = %name(&lease), "lease lost: {why}");
        shared.stop_job(&lease, StopOrder::Kill);
    }
    if result.is_err() {
        // Keep the job's pipes flowing until it is gone.
        while output.recv().await.is_some() {}
    }
    result
}

/// Retries a fenced call on transient errors (same request, so the same
/// offsets) until it succeeds, fails for good, or a Kill order arrives.
async fn retry_call<T, F, Fut>(
    orders: &mut watch::Receiver<Option<StopOrder>>,
    mut call: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let result = tokio::select! {
            r = call() => r,
            () = kill_ordered(orders) => return Err(CallError::LeaseLost("killed by the agent".into())),
        };
        match result {
            Err(e) if e.is_transient() => {
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = kill_ordered(orders) => return Err(CallError::LeaseLost("killed by the agent".into())),
                }
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_pull_policy_travels_from_the_payload_to_the_runtime() {
        let lease = v1::LeaseRef {
            job_id: "J".into(),
            attempt: 1,
            session_id: "S".into(),
        };
        let dirs = JobDirs::at("/tmp/x".into());
        for (wire, expected) in [
            ("always", Some(PullPolicy::Always)),
            ("if-not-present", Some(PullPolicy::IfNotPresent)),
            ("", None),
        ] {
            let payload = v1::JobPayload {
                command: vec!["true".into()],
                pull_policy: wire.into(),
                ..Default::default()
            };
            let spec = spec_from(&lease, payload, Vec::new(), dirs.clone());
            assert_eq!(spec.pull_policy, expected, "{wire:?}");
        }
    }

    fn out(stream: Stream, s: &str) -> OutputChunk {
        OutputChunk {
            stream,
            data: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    #[test]
    fn batch_assigns_combined_offsets_and_merges_runs_of_one_stream() {
        let mut b = Batch::default();
        b.push(out(Stream::Stdout, "abc"));
        b.push(out(Stream::Stdout, "de"));
        b.push(out(Stream::Stderr, "XY"));
        let first = b.take();
        assert_eq!(first.len(), 2);
        assert_eq!((first[0].offset, &first[0].data[..]), (0, &b"abcde"[..]));
        assert_eq!(first[0].stream, v1::LogStream::Stdout as i32);
        assert_eq!((first[1].offset, &first[1].data[..]), (5, &b"XY"[..]));
        assert_eq!(first[1].stream, v1::LogStream::Stderr as i32);
        b.push(out(Stream::Stdout, "z"));
        let second = b.take();
        assert_eq!(second[0].offset, 7, "offsets continue across batches");
        assert_eq!(b.bytes, 0);
    }

    /// `text` batched at the tail's end and kept, as the shipper does.
    fn sent(tail: &mut RetainedTail, text: &[u8]) {
        let mut b = Batch {
            next_offset: tail.end(),
            ..Batch::default()
        };
        for part in text.chunks(7) {
            b.push(OutputChunk {
                stream: Stream::Stdout,
                data: Bytes::copy_from_slice(part),
            });
        }
        tail.keep(b.take());
    }

    /// The bytes a resend from `from` carries, checking the chunks are
    /// contiguous and at most `max` bytes a call.
    fn resent(tail: &RetainedTail, from: u64, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        loop {
            let chunks = tail.chunks(at, max);
            if chunks.is_empty() {
                return out;
            }
            assert!(chunks.iter().map(|c| c.data.len()).sum::<usize>() <= max);
            for c in chunks {
                assert_eq!(c.offset, at, "chunks are contiguous");
                at += c.data.len() as u64;
                out.extend(c.data);
            }
        }
    }

    fn output(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"abcdefghij\n"[i % 11]).collect()
    }

    #[test]
    fn the_tail_keeps_sent_output_until_it_is_durable() {
        let log = output(300);
        let mut tail = RetainedTail::new(1 << 20);
        sent(&mut tail, &log[..100]);
        assert!(!tail.is_durable());
        tail.confirm(40);
        assert_eq!((tail.start, tail.end(), tail.held), (40, 100, 60));
        sent(&mut tail, &log[100..]);
        // A coordinator that stored 70 bytes: everything from there, in
        // calls of at most 64 bytes.
        assert_eq!(tail.rewind(70), 0, "nothing was let go");
        assert_eq!(resent(&tail, 70, 64), &log[70..]);
        tail.confirm(300);
        assert!(tail.is_durable());
        assert_eq!((tail.start, tail.held), (300, 0));
        assert!(tail.chunks(300, 64).is_empty());
        // A stale or smaller durable offset changes nothing.
        tail.confirm(10);
        assert_eq!(tail.start, 300);
    }

    #[test]
    fn the_tail_keeps_at_most_its_cap_and_marks_what_it_let_go() {
        let log = output(1000);
        let mut tail = RetainedTail::new(500);
        sent(&mut tail, &log);
        assert_eq!((tail.start, tail.end(), tail.held), (500, 1000, 500));
        // The coordinator kept 200 bytes: 300 are gone for good. They become
        // a 300-byte marker, and everything after keeps its offset.
        assert_eq!(tail.rewind(200), 300);
        let log_after = resent(&tail, 200, 64);
        assert_eq!(log_after.len(), 800);
        let marker = String::from_utf8(log_after[..300].to_vec()).unwrap();
        assert!(
            marker.starts_with("\n[drover: 300 bytes of output lost when a coordinator stopped] "),
            "{marker:?}"
        );
        let notice = "\n[drover: 300 bytes of output lost when a coordinator stopped]".len();
        assert!(marker[notice..299].bytes().all(|b| b == b' ') && marker.ends_with('\n'));
        assert_eq!(&log_after[300..], &log[500..]);
        // The marker is kept like output until it is durable, and the same
        // bytes are sent if the next coordinator loses it again.
        tail.confirm(250);
        assert_eq!(resent(&tail, 250, 1000), &log_after[50..]);
        assert_eq!(tail.rewind(250), 0);
        tail.confirm(1000);
        assert!(tail.is_durable() && tail.pieces.is_empty());
    }

    #[test]
    fn a_short_loss_takes_kept_bytes_so_the_marker_is_whole() {
        let log = output(400);
        let mut tail = RetainedTail::new(300);
        sent(&mut tail, &log);
        assert_eq!(tail.start, 100);
        // 10 bytes lost; the marker needs more, taken from kept output.
        let replaced = tail.rewind(90);
        let text = marker(replaced);
        assert_eq!(replaced, text.len() as u64, "exactly the notice");
        let log_after = resent(&tail, 90, 50);
        assert_eq!(&log_after[..text.len()], text.as_bytes());
        assert_eq!(&log_after[text.len()..], &log[90 + text.len()..]);
        assert_eq!(90 + log_after.len() as u64, tail.end(), "offsets unchanged");
    }

    #[test]
    fn the_tail_is_durable_only_as_far_as_the_last_coordinator_said() {
        let mut tail = RetainedTail::new(1 << 20);
        assert!(tail.is_durable(), "nothing sent");
        sent(&mut tail, b"hello world");
        tail.confirm(11);
        assert!(tail.is_durable());
        // A coordinator that holds 5 bytes (and so at most 5 durable).
        sent(&mut tail, b"!");
        assert_eq!(
            tail.rewind(5),
            7,
            "the marker takes what is kept, up to the end"
        );
        assert_eq!(resent(&tail, 5, 64), b"\n[drove");
        assert!(!tail.is_durable());
    }
}
