//! The `process` runtime: each job is a child process group in a work
//! directory — the job's `workdir`, else its attempt's scratch dir — (Fargate,
//! hosts without Docker, `drover dev`).
//!
//! Guarantees: the job gets a minimal base env (PATH, HOME, DROVER_JOB_ID,
//! DROVER_ATTEMPT) with its own env on top; it runs in its own process group,
//! so stopping it reaches everything it started; once its main process exits,
//! the rest of its group is killed so the output streams end.

use std::path::{Path, PathBuf};
use std::process::Stdio;

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
    /// One file per running job holding its process group id, so that a
    /// restarted agent can kill what its predecessor left.
    pid_root: PathBuf,
}

impl ProcessRuntime {
    pub fn new(data_dir: impl AsRef<Path>) -> ProcessRuntime {
        let data_dir = data_dir.as_ref();
        ProcessRuntime {
            work_root: data_dir.join("work"),
            pid_root: data_dir.join("pids"),
        }
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
            let _ = tokio::fs::create_dir_all(&self.pid_root).await;
            let _ = tokio::fs::write(self.pid_root.join(&name), pgid.to_string()).await;
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
                pid_file: self.pid_root.join(&name),
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
        let mut killed = 0;
        let mut entries = match tokio::fs::read_dir(&self.pid_root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(RuntimeError::Infra(format!(
                    "cannot read {}: {e}",
                    self.pid_root.display()
                )))
            }
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            let job_id = entry
                .file_name()
                .to_string_lossy()
                .rsplit_once('-')
                .map(|(job, _)| job.to_string())
                .unwrap_or_default();
            if let Ok(text) = tokio::fs::read_to_string(&path).await {
                if let Ok(pgid) = text.trim().parse::<i32>() {
                    // Only kill a group whose leader still carries this job's
                    // id: the pid may have been reused since.
                    let environ = tokio::fs::read(format!("/proc/{pgid}/environ"))
                        .await
                        .unwrap_or_default();
                    let marker = format!("DROVER_JOB_ID={job_id}");
                    if pgid > 1
                        && environ
                            .split(|b| *b == 0)
                            .any(|var| var == marker.as_bytes())
                    {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                        killed += 1;
                    }
                }
            }
            let _ = tokio::fs::remove_file(&path).await;
        }
        // Work dirs of earlier runs belong to no one now.
        let _ = tokio::fs::remove_dir_all(&self.work_root).await;
        Ok(killed)
    }
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
    pid_file: PathBuf,
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
        let _ = tokio::fs::remove_file(&self.pid_file).await;
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
