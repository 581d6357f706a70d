//! The seam between the agent and whatever runs a job: child processes
//! ([`process`], for Fargate and hosts without Docker) or Docker containers
//! ([`docker`]). Every runtime passes the same behavioural suite (`suite.rs`).
//!
//! Timeouts, grace periods and stop escalation are not the runtime's business:
//! [`supervise`] implements them once on top of [`RunningJob`], so every
//! runtime stops jobs the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

mod dirs;
pub mod docker;
pub mod process;

pub use dirs::{DirPool, JobDirs};
#[cfg(test)]
pub(crate) mod suite;

/// Everything a runtime needs to start one attempt of a job.
#[derive(Clone)]
pub struct RunSpec {
    pub job_id: String,
    pub attempt: u64,
    pub name: String,
    /// Container image; the process runtime ignores it.
    pub image: String,
    /// The full argv; `argv[0]` is the program.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Keys of `env` whose values must never be logged.
    pub secret_env: BTreeSet<String>,
    /// Where the job runs; `None` means a fresh per-attempt directory that is
    /// removed by [`RunningJob::cleanup`].
    pub workdir: Option<PathBuf>,
    /// User to run as (name or uid); `None` runs as the agent's user.
    pub user: Option<String>,
    pub resources: drover_proto::v1::Resources,
    /// `resources.cpu_millis` is a cap (CFS quota), not a weight.
    pub cpu_hard_limit: bool,
    /// The whole GPUs assigned to this attempt (by the agent's GPU pool);
    /// the runtime exposes exactly these to the job.
    pub gpus: Vec<crate::gpu::GpuDevice>,
    /// The agent session holding the lease; labels the container.
    pub session: String,
    /// `None`: the default for the image reference (see
    /// [`docker::PullPolicy::default_for`]).
    pub pull_policy: Option<docker::PullPolicy>,
    /// The attempt's input, output and scratch directories, made by the
    /// agent (inputs already unpacked) and removed by it after the output is
    /// packed. `None`: the docker runtime makes its own, the process runtime
    /// has none.
    pub dirs: Option<JobDirs>,
}

impl std::fmt::Debug for RunSpec {
    /// Shows env keys only: values may be secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSpec")
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("name", &self.name)
            .field("image", &self.image)
            .field("argv", &self.argv)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("user", &self.user)
            .field("gpus", &self.gpus)
            .finish()
    }
}

impl RunSpec {
    /// A spec for tests and `drover dev`: run `argv` with no extra env.
    pub fn command<I: IntoIterator<Item = S>, S: Into<String>>(job_id: &str, argv: I) -> RunSpec {
        RunSpec {
            job_id: job_id.to_string(),
            attempt: 1,
            name: String::new(),
            image: String::new(),
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            secret_env: BTreeSet::new(),
            workdir: None,
            user: None,
            resources: Default::default(),
            cpu_hard_limit: false,
            gpus: Vec::new(),
            session: String::new(),
            pull_policy: None,
            dirs: None,
        }
    }
}

/// One attempt of one job: `(job_id, attempt)`.
pub type AttemptKey = (String, u64);

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of a job's output, in the order the job wrote it on that stream.
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub stream: Stream,
    pub data: Bytes,
}

/// Completion reason prefix of a job the kernel killed for exceeding its
/// memory limit.
pub const OOM_KILLED: &str = "oom_killed";

/// How a job's main process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the job (its memory limit
    /// was exceeded). A job whose main process still exits 0 succeeds.
    pub oom_killed: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exit code 3", "killed by signal 9" or "oom_killed: …": for
    /// completion reasons.
    pub fn describe(&self) -> String {
        if self.oom_killed && !self.success() {
            let how = ExitStatus {
                oom_killed: false,
                ..*self
            }
            .describe();
            return format!(
                "{OOM_KILLED}: the job ran out of memory and the kernel killed it ({how}); raise memory_mib"
            );
        }
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "exited with an unknown status".to_string(),
        }
    }
}

/// A runtime error, classified: a job's own fault counts against its attempts
/// (outcome FAILED); an infrastructure fault is requeued on the infra budget
/// (outcome INTERRUPTED).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The job cannot run as specified: bad command, bad image, bad user.
    #[error("{0}")]
    Job(String),
    /// The host or runtime failed (disk full, daemon down, pull throttled).
    #[error("{0}")]
    Infra(String),
}

impl RuntimeError {
    /// True when the job itself is at fault and the attempt counts.
    pub fn is_job_failure(&self) -> bool {
        matches!(self, RuntimeError::Job(_))
    }
}

/// A started job. The output arrives separately ([`Started::output`]) so that
/// it keeps flowing while the job is being waited on or stopped.
pub struct Started {
    pub job: Box<dyn RunningJob>,
    /// Output of both streams; closes once the job and everything it started
    /// have exited (or been killed) and both streams are drained.
    pub output: mpsc::Receiver<OutputChunk>,
}

/// Something that runs jobs.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The name advertised at Register (`process`, `docker`).
    fn name(&self) -> &'static str;

    /// The name with what it runs on, for `AgentInfo.runtime` and `/health`
    /// (`docker 20.10.24`).
    fn description(&self) -> String {
        self.name().to_string()
    }

    /// Starts one attempt. Returns once the job is running, so that
    /// `ReportStarted` is true when sent. Errors are classified (see
    /// [`RuntimeError`]); a program that does not exist is a job failure.
    async fn start(&self, spec: RunSpec) -> Result<Started, RuntimeError>;

    /// Whether the runtime can start jobs now (Docker daemon reachable, data
    /// dir writable). Shown as `runtime_ok` in `/health`.
    async fn check(&self) -> Result<(), RuntimeError>;

    /// Called once at agent start, after the agent knows which of its
    /// earlier run's jobs it adopts: kills and removes everything that run
    /// left behind (processes, containers, work dirs) except the attempts in
    /// `keep`. Returns how many running jobs it killed.
    async fn kill_leftovers(&self, keep: &[AttemptKey]) -> Result<usize, RuntimeError>;

    /// Takes over an attempt an earlier run of the agent started (an agent
    /// restart within the session's TTL): its output from the beginning
    /// (offsets make the coordinator skip what it already has) and control
    /// of its end. `None` when the runtime cannot adopt or finds no such
    /// job (it is then completed as interrupted).
    async fn adopt(&self, _spec: &RunSpec) -> Result<Option<Started>, RuntimeError> {
        Ok(None)
    }

    /// Whether [`Runtime::adopt`] can ever take a job over: only then does
    /// the agent keep each attempt's lease on disk for a restart to find.
    fn adopts(&self) -> bool {
        false
    }

    /// Whether nothing a job started can outlive [`RunningJob::cleanup`]
    /// (docker: the container goes, with every process in it). Only then,
    /// or when the job ran as the agent's own user, is the attempt's
    /// directory tree reused ([`DirPool`]): a process that left the job's
    /// process group (`setsid`) could still reach it.
    fn confines_jobs(&self) -> bool {
        false
    }

    /// Periodic cleanup of what jobs leave on the host beyond their own
    /// attempt (docker: dangling image layers). Never touches what a job
    /// uses.
    async fn housekeeping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Control over one running job. All methods are cancel-safe.
#[async_trait]
pub trait RunningJob: Send + Sync {
    /// Resolves when the job's main process has exited. After the main
    /// process exits, anything it left running is killed, so that the output
    /// stream ends. May be called again after it resolved.
    async fn wait(&mut self) -> Result<ExitStatus, RuntimeError>;
    /// Asks the job to stop (SIGTERM to the whole job). No-op once exited.
    async fn terminate(&mut self) -> Result<(), RuntimeError>;
    /// Stops the job now (SIGKILL to the whole job). No-op once exited.
    async fn kill(&mut self) -> Result<(), RuntimeError>;
    /// Releases what the attempt used (work dir, container). Kills the job
    /// first if it is still running.
    async fn cleanup(self: Box<Self>);
}

/// Which runtime the agent uses (`runtime` in agent.toml, `DROVER_RUNTIME`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// `docker` when the Docker Engine answers a ping, else `process`.
    #[default]
    Auto,
    Docker,
    Process,
}

/// Builds the configured runtime. `Auto` falls back to `process` (with one
/// info line) when no Docker Engine answers; a forced `docker` that cannot
/// reach the Engine is an error. Docker pulls use [`docker::ChainAuth`], its
/// ECR calls going to `aws_endpoint` when set.
pub async fn select(
    choice: RuntimeChoice,
    data_dir: &Path,
    agent_id: &str,
    aws_endpoint: Option<&str>,
) -> Result<Arc<dyn Runtime>, RuntimeError> {
    let process = || Arc::new(process::ProcessRuntime::new(data_dir)) as Arc<dyn Runtime>;
    let docker = || async {
        let auth = Arc::new(docker::ChainAuth::new(aws_endpoint));
        docker::DockerRuntime::connect(data_dir, agent_id)
            .await
            .map(|rt| rt.with_registry_auth(auth))
    };
    match choice {
        RuntimeChoice::Process => Ok(process()),
        RuntimeChoice::Docker => Ok(Arc::new(docker().await?)),
        RuntimeChoice::Auto => match docker().await {
            Ok(rt) => Ok(Arc::new(rt)),
            Err(e) => {
                tracing::info!("using the process runtime: {e}");
                Ok(process())
            }
        },
    }
}

/// Why the agent stops a job before it ends on its own. Ordered by severity: a
/// later, more severe order escalates a stop under way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopOrder {
    /// An operator cancelled it: SIGTERM, grace, SIGKILL; completes CANCELLED.
    Cancel,
    /// A drain deadline passed: SIGTERM, grace, SIGKILL; completes INTERRUPTED.
    Interrupt,
    /// The lease is gone (lost, fenced, killed by the reaper): SIGKILL at once,
    /// never completed.
    Kill,
}

/// How a supervised job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub status: ExitStatus,
    /// Set when the agent stopped the job; `timed_out` when its timeout did.
    pub stopped_by: Option<StopOrder>,
    pub timed_out: bool,
}

/// Runs a started job to its end: enforces `timeout` (SIGTERM, `grace`,
/// SIGKILL) and obeys stop orders arriving on `orders` (the latest value
/// counts; `None` means keep running). A more severe order arriving during a
/// graceful stop escalates it.
pub async fn supervise(
    job: &mut dyn RunningJob,
    timeout: Option<Duration>,
    grace: Duration,
    mut orders: watch::Receiver<Option<StopOrder>>,
) -> Result<Ended, RuntimeError> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut stopped_by: Option<StopOrder> = None;
    let mut timed_out = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut orders_open = true;
    loop {
        // A new or more severe order, or the timeout, starts (or escalates) a stop.
        let current = orders.borrow_and_update().clone();
        if let Some(order) = current {
            if stopped_by.as_ref().is_none_or(|s| order > *s) {
                stopped_by = Some(order.clone());
                if order == StopOrder::Kill {
                    job.kill().await?;
                    kill_at = None;
                } else if kill_at.is_none() {
                    job.terminate().await?;
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
            }
        }
        tokio::select! {
            status = job.wait() => {
                return Ok(Ended { status: status?, stopped_by, timed_out });
            }
            changed = orders.changed(), if orders_open => {
                if changed.is_err() {
                    orders_open = false;
                }
            }
            _ = sleep_until_opt(deadline), if !timed_out && stopped_by.is_none() => {
                timed_out = true;
                job.terminate().await?;
                kill_at = Some(tokio::time::Instant::now() + grace);
            }
            _ = sleep_until_opt(kill_at), if kill_at.is_some() => {
                job.kill().await?;
                kill_at = None;
            }
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_kill_is_described_as_oom_killed_unless_the_job_succeeded() {
        let oom = ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: true,
        };
        assert!(!oom.success());
        let reason = oom.describe();
        assert!(reason.starts_with("oom_killed: "), "{reason}");
        assert!(reason.contains("killed by signal 9"), "{reason}");
        let survived = ExitStatus {
            code: Some(0),
            oom_killed: true,
            ..ExitStatus::default()
        };
        assert!(survived.success());
        assert_eq!(survived.describe(), "exit code 0");
    }
}
