//! The host-side twin of the self-fence (DESIGN §3.6), run as
//! `drover-agent fence-check` by a systemd timer: containers (and process
//! groups) outlive a dead or wedged agent, so once the deadline the agent
//! rewrites on every answered heartbeat has passed, this SIGKILLs what the
//! agent left running before the coordinator can requeue it elsewhere.
//!
//! Guarantees: a deadline still ahead (the agent renews it on every
//! heartbeat answer and at every registration) means nothing is touched, not
//! even the Docker Engine. Past it, only this agent's jobs are killed: its
//! `drover.agent` label, the groups of its pid log. Targets are listed
//! first and killed only if the deadline file still says the same, so an
//! agent that registered again meanwhile keeps its new jobs. The file is
//! removed once everything is killed, so the next run does nothing; an agent
//! that starts finds no deadline ahead and adopts nothing.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::AgentConfig;
use crate::runtime::docker::{DockerRuntime, JobContainer};
use crate::runtime::process::{kill_job_groups, JobGroup, ProcessRuntime};
use crate::runtime::RuntimeChoice;
use crate::session;

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No deadline file: no session (never registered, left, or fenced).
    NoDeadline,
    /// The deadline is ahead: the agent is renewing its session.
    Healthy,
    /// The deadline was rewritten while the jobs were listed: the agent
    /// renewed its session or registered again; nothing was killed.
    Renewed,
    /// The deadline had passed: the agent's jobs were killed.
    Fenced,
}

/// The result of [`check`], printed by `drover-agent fence-check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub outcome: Outcome,
    pub deadline_file: PathBuf,
    pub deadline_unix_ms: Option<u64>,
    pub checked_at_unix_ms: u64,
    /// Containers sent SIGKILL.
    pub containers: Vec<JobContainer>,
    /// Process groups sent SIGKILL.
    pub process_groups: Vec<JobGroup>,
    /// What could not be done; the deadline file is kept so the next run
    /// tries again.
    pub errors: Vec<String>,
}

/// The deadline file cannot be read: whether to fence cannot be decided.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the fence deadline: {0} — the agent rewrites it on its next heartbeat; remove it if no agent runs on this host (DROVER_DATA_DIR)")]
pub struct FenceError(std::io::Error);

impl From<std::io::Error> for FenceError {
    fn from(e: std::io::Error) -> Self {
        FenceError(e)
    }
}

/// Checks the fence deadline in `config.data_dir` and, once it has passed,
/// kills the jobs of agent `config.agent_id`: its Docker containers (unless
/// `runtime` is `process`; with `auto`, only when an Engine answers) and the
/// process groups of its pid log.
pub async fn check(config: &AgentConfig) -> Result<Report, FenceError> {
    let data_dir = &config.data_dir;
    let now = session::unix_ms(SystemTime::now());
    let deadline = session::read_fence_deadline(data_dir)?;
    let mut report = Report {
        outcome: Outcome::NoDeadline,
        deadline_file: session::fence_path(data_dir),
        deadline_unix_ms: deadline,
        checked_at_unix_ms: now,
        containers: Vec::new(),
        process_groups: Vec::new(),
        errors: Vec::new(),
    };
    let Some(deadline) = deadline else {
        tracing::info!(file = %report.deadline_file.display(), "no fence deadline: no agent session to fence");
        return Ok(report);
    };
    if deadline > now {
        report.outcome = Outcome::Healthy;
        tracing::debug!(
            in_ms = deadline - now,
            "fence deadline ahead: the agent renews its session"
        );
        return Ok(report);
    }

    let groups = ProcessRuntime::new(data_dir).recorded_groups();
    let docker = (config.runtime != RuntimeChoice::Process)
        .then(|| DockerRuntime::new(data_dir, &config.agent_id));
    let mut containers = Vec::new();
    if let Some(rt) = &docker {
        match rt.engine_version().await {
            Err(e) if config.runtime == RuntimeChoice::Auto => {
                tracing::info!("no Docker Engine (runtime auto), only process groups: {e}");
            }
            Err(e) => report.errors.push(e.to_string()),
            Ok(_) => match rt.running_jobs().await {
                Ok(found) => containers = found,
                Err(e) => report.errors.push(e.to_string()),
            },
        }
    }
    // An agent that renewed or registered again since the first read keeps
    // everything: its new jobs were started after that renewal.
    if session::read_fence_deadline(data_dir)? != Some(deadline) {
        report.outcome = Outcome::Renewed;
        tracing::info!("the agent renewed its fence deadline during the check; nothing killed");
        return Ok(report);
    }
    report.outcome = Outcome::Fenced;
    if let Some(rt) = &docker {
        for c in containers {
            match rt.kill_container(&c.id).await {
                Ok(()) => {
                    tracing::warn!(container = %c.name, job = %c.job, attempt = c.attempt, "fence deadline passed: killed the job's container");
                    report.containers.push(c);
                }
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    report.process_groups = kill_job_groups(groups);
    for g in &report.process_groups {
        tracing::warn!(group = g.pgid, job = %g.name, "fence deadline passed: killed the job's process group");
    }
    if report.errors.is_empty() {
        remove_if_unchanged(data_dir, deadline, &mut report)?;
    }
    Ok(report)
}

/// Removes the deadline file unless the agent rewrote it since: a new
/// deadline is a live session's.
fn remove_if_unchanged(
    data_dir: &std::path::Path,
    deadline: u64,
    report: &mut Report,
) -> Result<(), FenceError> {
    if session::read_fence_deadline(data_dir)? == Some(deadline) {
        if let Err(e) = session::clear_fence_deadline(data_dir) {
            report.errors.push(format!(
                "cannot remove {}: {e} — the next check repeats the kills; is the data dir writable?",
                report.deadline_file.display()
            ));
        }
    }
    Ok(())
}

impl Report {
    /// What a person reads: one line for the outcome, one per kill or error.
    pub fn human(&self) -> String {
        let file = self.deadline_file.display();
        let now = self.checked_at_unix_ms;
        let mut out = match (self.outcome, self.deadline_unix_ms) {
            (Outcome::NoDeadline, _) | (_, None) => {
                format!("no fence deadline at {file}: no agent session to fence\n")
            }
            (Outcome::Healthy, Some(d)) => format!(
                "fence deadline in {:.1} s: the agent renews its session; nothing to do\n",
                (d - now) as f64 / 1000.0
            ),
            (Outcome::Renewed, Some(_)) => {
                "the agent renewed its fence deadline during the check; nothing killed\n"
                    .to_string()
            }
            (Outcome::Fenced, Some(d)) => format!(
                "fence deadline passed {:.1} s ago: killed {} container(s) and {} process group(s)\n",
                now.saturating_sub(d) as f64 / 1000.0,
                self.containers.len(),
                self.process_groups.len()
            ),
        };
        for c in &self.containers {
            out += &format!(
                "  container {} ({}) job {} attempt {}\n",
                c.name,
                &c.id[..c.id.len().min(12)],
                c.job,
                c.attempt
            );
        }
        for g in &self.process_groups {
            out += &format!("  process group {} ({})\n", g.pgid, g.name);
        }
        for e in &self.errors {
            out += &format!("  error: {e}\n");
        }
        out
    }
}
