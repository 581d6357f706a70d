//! The `process` runtime: each job is a child process group in a work
//! directory — the job's `workdir`, else its attempt's scratch dir — (Fargate,
//! hosts without Docker, `drover dev`).
//!
//! Guarantees: the job gets a minimal base env (PATH, HOME, DROVER_JOB_ID,
//! DROVER_ATTEMPT) with its own env on top; it runs in its own process group,
//! so stopping it reaches everything it started; once its main process exits,
//! the rest of its group is killed so the output streams end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{
    AttemptKey, ExitStatus, OutputChunk, RunSpec, RunningJob, Runtime, RuntimeError, Started,
    Stream,
};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs jobs as child processes under `data_dir`.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    /// Fresh per-attempt work dirs live here (`<job>-<attempt>`).
    work_root: PathBuf,
    /// The process groups of running jobs, so that a restarted agent can
    /// kill what its predecessor left.
    pids: Arc<PidLog>,
    /// Where agents before the pid log kept one file per job's group.
    legacy_pid_root: PathBuf,
}

impl ProcessRuntime {
    pub fn new(data_dir: impl AsRef<Path>) -> ProcessRuntime {
        let data_dir = data_dir.as_ref();
        ProcessRuntime {
            work_root: data_dir.join("work"),
            pids: Arc::new(PidLog::new(data_dir.join("pids.log"))),
            legacy_pid_root: data_dir.join("pids"),
        }
    }
}

/// The process groups this runtime started and has not seen end, in one
/// append-only file: `+<name> <pgid>` when a job starts, `-<name>` when it
/// is cleaned up; rewritten with only the live entries once ended ones
/// dominate. One small write per start and per end, where a file per job
/// cost an inode to create and one to remove.
#[derive(Debug)]
struct PidLog {
    path: PathBuf,
    inner: Mutex<PidLogInner>,
}

#[derive(Debug, Default)]
struct PidLogInner {
    file: Option<std::fs::File>,
    /// This run's entries (name -> pgid) not yet ended.
    live: HashMap<String, i32>,
    /// Lines in the file.
    lines: usize,
}

/// Ended entries the log may hold before it is rewritten.
const PID_LOG_SLACK: usize = 1024;

impl PidLog {
    fn new(path: PathBuf) -> PidLog {
        PidLog {
            path,
            inner: Mutex::new(PidLogInner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, PidLogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn started(&self, name: &str, pgid: i32) {
        let mut inner = self.inner();
        inner.live.insert(name.to_string(), pgid);
        self.append(&mut inner, &format!("+{name} {pgid}\n"));
    }

    fn ended(&self, name: &str) {
        let mut inner = self.inner();
        if inner.live.remove(name).is_none() {
            return;
        }
        if inner.lines > PID_LOG_SLACK + 2 * inner.live.len() {
            self.rewrite(&mut inner, &[]);
        } else {
            self.append(&mut inner, &format!("-{name}\n"));
        }
    }

    /// A failed write only costs a restarted agent the chance to kill this
    /// job's group: worth a warning, not the job.
    fn append(&self, inner: &mut PidLogInner, line: &str) {
        if inner.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)
            {
                Ok(file) => inner.file = Some(file),
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), "cannot record a job's process group: {e}");
                    return;
                }
            }
        }
        if let Some(file) = inner.file.as_mut() {
            match file.write_all(line.as_bytes()) {
                Ok(()) => inner.lines += 1,
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), "cannot record a job's process group: {e}")
                }
            }
        }
    }

    /// Replaces the file with this run's live entries (and `keep`, entries
    /// of an earlier run still to be settled), atomically.
    fn rewrite(&self, inner: &mut PidLogInner, keep: &[(String, i32)]) {
        let text: String = inner
            .live
            .iter()
            .map(|(n, p)| (n.as_str(), *p))
            .chain(keep.iter().map(|(n, p)| (n.as_str(), *p)))
            .map(|(name, pgid)| format!("+{name} {pgid}\n"))
            .collect();
        let tmp = self.path.with_extension("log.new");
        let written = (|| -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, &self.path)
        })();
        match written {
            Ok(()) => {
                inner.file = None;
                inner.lines = inner.live.len() + keep.len();
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "cannot rewrite the process group log: {e}")
            }
        }
    }

    /// Entries the file holds that are not this run's: groups an earlier
    /// run started and never saw end.
    fn earlier(&self) -> Vec<(String, i32)> {
        let inner = self.inner();
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut open: HashMap<&str, i32> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('+') {
                if let Some((name, pgid)) = rest.rsplit_once(' ') {
                    if let Ok(pgid) = pgid.parse() {
                        open.insert(name, pgid);
                    }
                }
            } else if let Some(name) = line.strip_prefix('-') {
                open.remove(name);
            }
        }
        open.into_iter()
            .filter(|(name, _)| !inner.live.contains_key(*name))
            .map(|(name, pgid)| (name.to_string(), pgid))
            .collect()
    }

    /// Forgets the earlier run's entries (killed).
    fn settled(&self) {
        let mut inner = self.inner();
        self.rewrite(&mut inner, &[]);
    }
}

/// The assigned GPUs for CUDA and the NVIDIA tools; nothing without GPUs.
/// They override the job's own env: the agent decides which GPUs a job uses.
/// (A process job could still open other GPUs' device files; only the
/// Docker runtime isolates GPUs.)
fn gpu_env(gpus: &[crate::gpu::GpuDevice]) -> Vec<(&'static str, String)> {
    if gpus.is_empty() {
        return Vec::new();
    }
    let visible = crate::gpu::visible_devices(gpus);
    vec![
        ("NVIDIA_VISIBLE_DEVICES", visible.clone()),
        ("CUDA_VISIBLE_DEVICES", visible),
    ]
}

/// Job ids are ULIDs, but never trust a name that becomes a path.
fn file_name(job_id: &str, attempt: u64) -> String {
    let safe: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-{attempt}")
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, spec: RunSpec) -> Result<Started, RuntimeError> {
        let program = match spec.argv.first() {
            Some(p) if !p.trim().is_empty() => p.clone(),
            _ => return Err(RuntimeError::Job("command is empty: nothing to run".into())),
        };
        let name = file_name(&spec.job_id, spec.attempt);
        // The job's own workdir, else its scratch dir (removed with the
        // attempt's dirs), else one of ours.
        let (workdir, owned_workdir) = match (&spec.workdir, &spec.dirs) {
            (Some(dir), _) => (dir.clone(), false),
            (None, Some(dirs)) => (dirs.scratch.clone(), false),
            (None, None) => (self.work_root.join(&name), true),
        };
        if owned_workdir {
            // A leftover from a crashed run of the same attempt must not leak in.
            let _ = tokio::fs::remove_dir_all(&workdir).await;
        }
        let made_by_agent = spec.workdir.is_none() && spec.dirs.is_some();
        if !made_by_agent {
            tokio::fs::create_dir_all(&workdir).await.map_err(|e| {
                let msg = format!("cannot create workdir {}: {e}", workdir.display());
                if owned_workdir {
                    RuntimeError::Infra(msg)
                } else {
                    RuntimeError::Job(msg)
                }
            })?;
        }

        let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
        let mut cmd = Command::new(resolve_program(&program, &path));
        cmd.arg0(&program)
            .args(&spec.argv[1..])
            .env_clear()
            .env("PATH", &path)
            .env("HOME", &workdir)
            .env("DROVER_JOB_ID", &spec.job_id)
            .env("DROVER_ATTEMPT", spec.attempt.to_string())
            .envs(spec.dirs.iter().flat_map(|d| d.env()))
            .envs(&spec.env)
            .envs(gpu_env(&spec.gpus))
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(user) = spec.user.as_deref().filter(|u| !u.is_empty()) {
            let (uid, gid) = lookup_user(user)?;
            cmd.uid(uid).gid(gid);
        }

        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                if owned_workdir {
                    let _ = tokio::fs::remove_dir_all(&workdir).await;
                }
                return Err(spawn_error(&program, e));
            }
        };
        let pgid = child.id().map(|id| id as i32);
        if let Some(pgid) = pgid {
            self.pids.started(&name, pgid);
        }

        let (tx, output) = mpsc::channel(64);
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pump(stdout, Stream::Stdout, tx.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pump(stderr, Stream::Stderr, tx));
        }
        tracing::debug!(job = %spec.job_id, attempt = spec.attempt, ?pgid, argv = ?spec.argv, env_keys = spec.env.len(), "process started");
        Ok(Started {
            job: Box::new(ProcessJob {
                child,
                pgid,
                status: None,
                workdir: owned_workdir.then_some(workdir),
                pids: self.pids.clone(),
                name,
            }),
            output,
        })
    }

    async fn check(&self) -> Result<(), RuntimeError> {
        tokio::fs::create_dir_all(&self.work_root)
            .await
            .map_err(|e| {
                RuntimeError::Infra(format!(
                    "cannot create {}: {e} — is the data dir writable? (DROVER_DATA_DIR)",
                    self.work_root.display()
                ))
            })
    }

    /// A child process cannot be adopted (its pipes died with the agent):
    /// `keep` is ignored and everything is killed.
    async fn kill_leftovers(&self, _keep: &[AttemptKey]) -> Result<usize, RuntimeError> {
        let mut groups = self.recorded_groups();
        // Left by an agent from before the pid log: a file per group.
        if let Ok(mut entries) = tokio::fs::read_dir(&self.legacy_pid_root).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Ok(text) = tokio::fs::read_to_string(entry.path()).await {
                    if let Ok(pgid) = text.trim().parse::<i32>() {
                        groups.push(JobGroup { name, pgid });
                    }
                }
            }
        }
        let killed = kill_job_groups(groups).len();
        self.pids.settled();
        let _ = tokio::fs::remove_dir_all(&self.legacy_pid_root).await;
        // Work dirs of earlier runs belong to no one now.
        let _ = tokio::fs::remove_dir_all(&self.work_root).await;
        Ok(killed)
    }
}

impl ProcessRuntime {
    /// The process groups the pid log holds as started and not seen to end,
    /// except this runtime's own: what the host-side fence kills
    /// (`drover-agent fence-check`). Reads the log only, never rewrites it:
    /// a live agent may be appending to it.
    pub fn recorded_groups(&self) -> Vec<JobGroup> {
        self.pids
            .earlier()
            .into_iter()
            .map(|(name, pgid)| JobGroup { name, pgid })
            .collect()
    }
}

/// A job's process group, as the pid log records it (`<job>-<attempt>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobGroup {
    pub name: String,
    pub pgid: i32,
}

/// SIGKILLs each group whose leader still carries its job's id (the pid may
/// have been reused since it was recorded); returns the groups killed.
pub fn kill_job_groups(groups: impl IntoIterator<Item = JobGroup>) -> Vec<JobGroup> {
    groups
        .into_iter()
        .filter(|group| {
            let job_id = group.name.rsplit_once('-').map_or("", |(job, _)| job);
            let environ =
                std::fs::read(format!("/proc/{}/environ", group.pgid)).unwrap_or_default();
            let marker = format!("DROVER_JOB_ID={job_id}");
            group.pgid > 1
                && environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
                && killpg(Pid::from_raw(group.pgid), Signal::SIGKILL).is_ok()
        })
        .collect()
}

/// `program` as an absolute path when it is a bare name found on `path`
/// (the PATH the job gets), else unchanged. Looking it up here rather than in
/// the child lets the standard library start the job with `posix_spawn`
/// (vfork semantics) instead of `fork`, which copies the agent's page tables:
/// the biggest CPU cost of starting a short job. A name not found is left for
/// the spawn to report as "command not found".
fn resolve_program(program: &str, path: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return PathBuf::from(program);
    }
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(program))
}

fn spawn_error(program: &str, e: std::io::Error) -> RuntimeError {
    match e.kind() {
        std::io::ErrorKind::NotFound => RuntimeError::Job(format!("command not found: {program}")),
        std::io::ErrorKind::PermissionDenied => {
            RuntimeError::Job(format!("permission denied: cannot execute {program}"))
        }
        _ if e.raw_os_error() == Some(libc::ENOEXEC) || e.raw_os_error() == Some(libc::ENOTDIR) => {
            RuntimeError::Job(format!("cannot execute {program}: {e}"))
        }
        _ => RuntimeError::Infra(format!("cannot start {program}: {e}")),
    }
}

fn lookup_user(user: &str) -> Result<(u32, u32), RuntimeError> {
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(RuntimeError::Job(format!(
            "user {user:?} does not exist on this agent"
        ))),
        Err(e) => Err(RuntimeError::Infra(format!(
            "cannot look up user {user:?}: {e}"
        ))),
    }
}

/// Copies one pipe into the output channel, in order, until EOF.
async fn pump(mut pipe: impl AsyncRead + Unpin, stream: Stream, tx: mpsc::Sender<OutputChunk>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = OutputChunk {
                    stream,
                    data: Bytes::copy_from_slice(&buf[..n]),
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

struct ProcessJob {
    child: Child,
    pgid: Option<i32>,
    status: Option<ExitStatus>,
    workdir: Option<PathBuf>,
    pids: Arc<PidLog>,
    /// The job's entry in `pids`.
    name: String,
}

impl ProcessJob {
    fn signal_group(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH: the group is already gone, which is what we want.
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
}

#[async_trait]
impl RunningJob for ProcessJob {
    async fn wait(&mut self) -> Result<ExitStatus, RuntimeError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status =
            self.child.wait().await.map_err(|e| {
                RuntimeError::Infra(format!("cannot wait for the job's process: {e}"))
            })?;
        use std::os::unix::process::ExitStatusExt;
        let status = ExitStatus {
            code: status.code(),
            signal: status.signal(),
            oom_killed: false,
        };
        self.status = Some(status);
        // Whatever the job left running in its group would keep the output
        // pipes open and outlive the attempt.
        self.signal_group(Signal::SIGKILL);
        Ok(status)
    }

    async fn terminate(&mut self) -> Result<(), RuntimeError> {
        if self.status.is_none() {
            self.signal_group(Signal::SIGTERM);
        }
        Ok(())
    }

    async fn kill(&mut self) -> Result<(), RuntimeError> {
        if self.status.is_none() {
            self.signal_group(Signal::SIGKILL);
        }
        Ok(())
    }

    async fn cleanup(mut self: Box<Self>) {
        if self.status.is_none() {
            self.signal_group(Signal::SIGKILL);
            let _ = self.wait().await;
        }
        self.pids.ended(&self.name);
        if let Some(dir) = self.workdir.take() {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(dir = %dir.display(), "cannot remove work dir: {e}");
            }
        }
    }
}

impl Drop for ProcessJob {
    /// A job whose task died (panic, abort) must not keep running unsupervised.
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal_group(Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::suite::{collect, wait_until, SuiteRuntime};
    use std::time::Duration;

    #[test]
    fn bare_program_names_resolve_on_the_jobs_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        // Not executable in the first directory: skipped.
        std::fs::write(first.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::write(second.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(second.join("tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let path = format!("relative:{}:{}", first.display(), second.display());
        assert_eq!(resolve_program("tool", &path), second.join("tool"));
        // Paths are kept as given; unknown names are left to the spawn.
        assert_eq!(resolve_program("./tool", &path), PathBuf::from("./tool"));
        assert_eq!(
            resolve_program("/bin/tool", &path),
            PathBuf::from("/bin/tool")
        );
        assert_eq!(resolve_program("nope", &path), PathBuf::from("nope"));
    }

    #[async_trait]
    impl SuiteRuntime for ProcessRuntime {
        async fn assert_nothing_left(&self) {
            let left: Vec<_> = match std::fs::read_dir(&self.work_root) {
                Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
                Err(_) => Vec::new(),
            };
            assert!(left.is_empty(), "work dirs left behind: {left:?}");
        }
    }

    crate::runtime_suite!(process_suite, |dir: &std::path::Path| ProcessRuntime::new(
        dir
    ));

    #[tokio::test]
    async fn assigned_gpus_are_visible_by_uuid_and_none_means_unset() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path());
        let echo =
            "echo \"nvidia=${NVIDIA_VISIBLE_DEVICES-unset} cuda=${CUDA_VISIBLE_DEVICES-unset}\"";
        let mut spec = RunSpec::command("gpu-job", ["sh", "-c", echo]);
        spec.gpus = crate::gpu::FakeGpus::new(4, "A10G").0[1..3].to_vec();
        // The agent's assignment wins over the job's own env.
        spec.env
            .insert("CUDA_VISIBLE_DEVICES".into(), "GPU-fake-0".into());
        let (status, out, _err, job) = collect(rt.start(spec).await.unwrap()).await;
        job.cleanup().await;
        assert!(status.success(), "{status:?}");
        assert_eq!(
            out,
            "nvidia=GPU-fake-1,GPU-fake-2 cuda=GPU-fake-1,GPU-fake-2\n"
        );

        let spec = RunSpec::command("cpu-job", ["sh", "-c", echo]);
        let (status, out, _err, job) = collect(rt.start(spec).await.unwrap()).await;
        job.cleanup().await;
        assert!(status.success(), "{status:?}");
        assert_eq!(out, "nvidia=unset cuda=unset\n");
    }

    #[tokio::test]
    async fn fresh_workdir_is_removed_after_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path());
        let started = rt
            .start(RunSpec::command("j1", ["sh", "-c", "pwd; touch made-here"]))
            .await
            .unwrap();
        let (status, out, _err, job) = collect(started).await;
        assert!(status.success());
        let workdir = PathBuf::from(out.trim());
        assert!(workdir.starts_with(dir.path().join("work")), "{out}");
        assert!(workdir.join("made-here").exists());
        job.cleanup().await;
        assert!(!workdir.exists());
    }

    #[tokio::test]
    async fn child_processes_are_killed_with_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path());
        let mut started = rt
            .start(RunSpec::command(
                "j2",
                ["sh", "-c", "sleep 1000 & echo $!; wait"],
            ))
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(30), started.output.recv())
            .await
            .unwrap()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&first.data).trim().parse().unwrap();
        assert!(alive(pid), "the grandchild should run before the stop");
        started.job.kill().await.unwrap();
        started.job.wait().await.unwrap();
        wait_until(Duration::from_secs(30), || !alive(pid)).await;
    }

    #[tokio::test]
    async fn leftovers_of_an_earlier_agent_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(dir.path());
        let mut started = rt
            .start(RunSpec::command("j3", ["sh", "-c", "echo $$; sleep 1000"]))
            .await
            .unwrap();
        let first = started.output.recv().await.unwrap();
        let pid: i32 = String::from_utf8_lossy(&first.data).trim().parse().unwrap();
        // A restarted agent only has the pid files to go by.
        assert_eq!(
            ProcessRuntime::new(dir.path())
                .kill_leftovers(&[])
                .await
                .unwrap(),
            1
        );
        let status = started.job.wait().await.unwrap();
        assert_eq!(status.signal, Some(9));
        wait_until(Duration::from_secs(30), || !alive(pid)).await;
    }

    #[test]
    fn the_pid_log_lists_only_groups_not_seen_to_end_and_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pids.log");
        let log = PidLog::new(path.clone());
        for i in 0..5_000 {
            log.started(&format!("job{i}-1"), 10_000 + i);
            if i != 7 && i != 4_321 {
                log.ended(&format!("job{i}-1"));
            }
        }
        // This run's own entries are not leftovers...
        assert!(log.earlier().is_empty());
        // ...but they are to the next run.
        let mut left = PidLog::new(path.clone()).earlier();
        left.sort();
        assert_eq!(
            left,
            vec![
                ("job4321-1".to_string(), 14_321),
                ("job7-1".to_string(), 10_007)
            ]
        );
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= PID_LOG_SLACK + 8, "{lines} lines");

        // Once settled, the next run finds nothing.
        let next = PidLog::new(path.clone());
        next.settled();
        assert!(PidLog::new(path).earlier().is_empty());
    }

    #[tokio::test]
    async fn pid_files_of_an_agent_from_before_the_pid_log_are_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 1000"])
            .env("DROVER_JOB_ID", "old")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id().unwrap();
        std::fs::create_dir_all(dir.path().join("pids")).unwrap();
        std::fs::write(dir.path().join("pids/old-1"), pgid.to_string()).unwrap();
        let rt = ProcessRuntime::new(dir.path());
        assert_eq!(rt.kill_leftovers(&[]).await.unwrap(), 1);
        let status = child.wait().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        assert!(!dir.path().join("pids").exists());
    }

    /// Alive and not a zombie (a container's pid 1 may not reap orphans).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }
}
