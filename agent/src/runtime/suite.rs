//! The behavioural suite every [`Runtime`] must pass. Each test is a generic
//! function taking a [`Ctx`]: a runtime built by a factory `FnOnce(&Path) ->
//! R` on a fresh data dir, and the image its jobs run in.
//! [`runtime_suite!`](crate::runtime_suite) expands them for one runtime and
//! checks afterwards that nothing was left behind:
//!
//! ```ignore
//! crate::runtime_suite!(process_suite, |dir: &std::path::Path| ProcessRuntime::new(dir));
//! ```
//!
//! No sleeps as assertions and no timing assertions: waits poll with generous
//! timeouts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{supervise, ExitStatus, RunSpec, RunningJob, Runtime, Started, StopOrder, Stream};

/// Upper bound for anything the suite waits for; only reached on failure.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `predicate` until it holds, panicking after `timeout`.
pub async fn wait_until(timeout: Duration, mut predicate: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !predicate() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads all output and waits for the exit; returns (status, stdout, stderr, job).
pub async fn collect(started: Started) -> (ExitStatus, String, String, Box<dyn RunningJob>) {
    let Started {
        mut job,
        mut output,
    } = started;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(chunk) = output.recv().await {
            match chunk.stream {
                Stream::Stdout => out.extend_from_slice(&chunk.data),
                Stream::Stderr => err.extend_from_slice(&chunk.data),
            }
        }
    };
    let (status, ()) = tokio::time::timeout(PATIENCE, async { tokio::join!(job.wait(), read) })
        .await
        .expect("the job did not end in time");
    (
        status.expect("wait failed"),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        job,
    )
}

/// What the suite needs to know about a runtime beyond [`Runtime`].
#[async_trait]
pub trait SuiteRuntime: Runtime + Sized {
    /// The image the suite's jobs run in, built once per test process; empty
    /// for runtimes that ignore images.
    async fn suite_image(&self) -> String {
        String::new()
    }
    /// Whether jobs see the host's filesystem, so that a given workdir is a
    /// host path.
    fn shares_host_fs(&self) -> bool {
        true
    }
    /// Panics if anything (a container, a work dir) outlived the cleanup of
    /// every job.
    async fn assert_nothing_left(&self) {}
}

/// One suite test's world: a runtime on a fresh data dir.
pub struct Ctx<R> {
    pub rt: R,
    pub dir: tempfile::TempDir,
    pub image: String,
}

impl<R: SuiteRuntime> Ctx<R> {
    pub async fn new(make: impl FnOnce(&Path) -> R) -> Ctx<R> {
        let dir = tempfile::tempdir().unwrap();
        let rt = make(dir.path());
        let image = rt.suite_image().await;
        Ctx { rt, dir, image }
    }

    /// `sh -c script` in the suite's image.
    pub fn sh(&self, script: &str) -> RunSpec {
        self.command(["sh", "-c", script])
    }

    pub fn command<I: IntoIterator<Item = S>, S: Into<String>>(&self, argv: I) -> RunSpec {
        let mut spec = RunSpec::command("suite-job", argv);
        spec.image = self.image.clone();
        spec
    }
}

async fn run<R: Runtime>(rt: &R, spec: RunSpec) -> (ExitStatus, String, String) {
    let started = rt.start(spec).await.expect("start failed");
    let (status, out, err, job) = collect(started).await;
    job.cleanup().await;
    (status, out, err)
}

pub async fn exit_code_zero_is_success<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let (status, out, _) = run(rt, cx.sh("echo hello")).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "hello\n");
}

/// A program found on PATH still sees the name it was called by (busybox
/// applets and multi-call tools depend on it).
pub async fn the_program_sees_the_name_it_was_called_by<R: SuiteRuntime>(cx: &Ctx<R>) {
    let (status, out, _) = run(&cx.rt, cx.sh("echo \"$0\"")).await;
    assert!(status.success());
    assert_eq!(out.trim(), "sh");
}

pub async fn nonzero_exit_code_is_reported<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let (status, _, _) = run(rt, cx.sh("exit 3")).await;
    assert_eq!(status.code, Some(3));
    assert_eq!(status.describe(), "exit code 3");
}

pub async fn env_is_passed_with_drover_variables<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let mut spec = cx.sh(
        "echo \"$GREETING|$DROVER_JOB_ID|$DROVER_ATTEMPT|$HOME\"; echo \"${AGENT_ONLY:-unset}\"",
    );
    spec.attempt = 7;
    spec.env.insert("GREETING".into(), "hi there".into());
    std::env::set_var("AGENT_ONLY", "leaked");
    let (status, out, _) = run(rt, spec).await;
    assert!(status.success());
    let mut lines = out.lines();
    let fields: Vec<&str> = lines.next().unwrap().split('|').collect();
    assert_eq!(fields[..3], ["hi there", "suite-job", "7"]);
    assert!(!fields[3].is_empty(), "HOME is set");
    assert_eq!(
        lines.next(),
        Some("unset"),
        "the agent's env does not leak into jobs"
    );
}

pub async fn secret_env_reaches_the_job<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let mut spec = cx.sh("echo \"$API_KEY\"");
    spec.env.insert("API_KEY".into(), "s3cr3t".into());
    spec.secret_env.insert("API_KEY".into());
    assert!(
        !format!("{spec:?}").contains("s3cr3t"),
        "Debug never shows values"
    );
    let (status, out, _) = run(rt, spec).await;
    assert!(status.success());
    assert_eq!(out.trim(), "s3cr3t");
}

pub async fn job_runs_in_the_given_workdir<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let workdir = if rt.shares_host_fs() {
        cx.dir.path().join("given")
    } else {
        PathBuf::from("/drover-suite/given")
    };
    let mut spec = cx.sh("pwd; echo data > file.txt; cat file.txt");
    spec.workdir = Some(workdir.clone());
    let (status, out, _) = run(rt, spec).await;
    assert!(status.success(), "{status:?}");
    let mut lines = out.lines();
    let pwd = Path::new(lines.next().unwrap());
    assert_eq!(lines.next(), Some("data"), "{out}");
    if rt.shares_host_fs() {
        assert_eq!(pwd.canonicalize().unwrap(), workdir.canonicalize().unwrap());
        assert!(workdir.join("file.txt").exists(), "a given workdir is kept");
    } else {
        assert_eq!(pwd, workdir);
    }
}

pub async fn stdout_and_stderr_are_both_captured_in_order<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let script = "i=1; while [ $i -le 300 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done";
    let (status, out, err) = run(rt, cx.sh(script)).await;
    assert!(status.success());
    let expect = |prefix: &str| {
        (1..=300)
            .map(|i| format!("{prefix}-{i}\n"))
            .collect::<String>()
    };
    assert_eq!(out, expect("out"));
    assert_eq!(err, expect("err"));
}

pub async fn timeout_stops_the_job<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let Started { mut job, output } = rt.start(cx.sh("sleep 1000")).await.unwrap();
    let (_tx, orders) = watch::channel(None);
    let ended = tokio::time::timeout(
        PATIENCE,
        supervise(
            job.as_mut(),
            Some(Duration::from_millis(100)),
            Duration::from_secs(5),
            orders,
        ),
    )
    .await
    .expect("timeout was not enforced")
    .unwrap();
    drop(output);
    assert!(ended.timed_out);
    assert!(!ended.status.success());
    job.cleanup().await;
}

/// Starts a job that prints `ready` once its TERM trap is set up.
pub async fn start_ready<R: SuiteRuntime>(
    cx: &Ctx<R>,
    script: &str,
) -> (Box<dyn RunningJob>, tokio::task::JoinHandle<String>) {
    let Started { job, mut output } = cx.rt.start(cx.sh(script)).await.unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut out = String::new();
        let mut ready_tx = Some(ready_tx);
        while let Some(chunk) = output.recv().await {
            if chunk.stream == Stream::Stdout {
                out.push_str(&String::from_utf8_lossy(&chunk.data));
            }
            if out.contains("ready") {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
        out
    });
    tokio::time::timeout(PATIENCE, ready_rx)
        .await
        .expect("job never got ready")
        .unwrap();
    (job, reader)
}

pub async fn stop_sends_sigterm_first<R: SuiteRuntime>(cx: &Ctx<R>) {
    let (mut job, reader) = start_ready(
        cx,
        "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.05; done",
    )
    .await;
    let (tx, orders) = watch::channel(None);
    tx.send_replace(Some(StopOrder::Cancel));
    let ended = tokio::time::timeout(PATIENCE, supervise(job.as_mut(), None, PATIENCE, orders))
        .await
        .expect("stop did not finish")
        .unwrap();
    assert_eq!(ended.stopped_by, Some(StopOrder::Cancel));
    assert_eq!(ended.status.code, Some(143), "{ended:?}");
    let out = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("got-term"), "{out}");
    job.cleanup().await;
}

pub async fn sigkill_follows_when_sigterm_is_ignored<R: SuiteRuntime>(cx: &Ctx<R>) {
    let (mut job, reader) = start_ready(cx, "trap '' TERM; echo ready; sleep 1000").await;
    let (tx, orders) = watch::channel(None);
    tx.send_replace(Some(StopOrder::Interrupt));
    let ended = tokio::time::timeout(
        PATIENCE,
        supervise(job.as_mut(), None, Duration::from_millis(200), orders),
    )
    .await
    .expect("SIGKILL did not follow the grace period")
    .unwrap();
    assert_eq!(ended.status.signal, Some(9), "{ended:?}");
    tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("output never closed")
        .unwrap();
    job.cleanup().await;
}

pub async fn kill_order_skips_the_grace_period<R: SuiteRuntime>(cx: &Ctx<R>) {
    let (mut job, _reader) = start_ready(cx, "trap '' TERM; echo ready; sleep 1000").await;
    let (tx, orders) = watch::channel(None);
    tx.send_replace(Some(StopOrder::Cancel));
    // The cancel's grace is an hour: only the escalation can end it in time.
    let escalate = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(Some(StopOrder::Kill));
        std::future::pending::<()>().await
    };
    let ended = tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            e = supervise(job.as_mut(), None, Duration::from_secs(3600), orders) => e,
            () = escalate => unreachable!(),
        }
    })
    .await
    .expect("a kill order did not escalate the stop")
    .unwrap();
    assert_eq!(ended.stopped_by, Some(StopOrder::Kill));
    assert_eq!(ended.status.signal, Some(9));
    job.cleanup().await;
}

pub async fn background_children_do_not_hold_the_output_open<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let (status, out, _) = run(rt, cx.sh("sleep 1000 & echo started")).await;
    assert!(status.success());
    assert_eq!(out, "started\n");
}

pub async fn missing_program_is_a_job_failure<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    let err = match rt.start(cx.command(["drover-no-such-program"])).await {
        Ok(_) => panic!("a missing program started"),
        Err(e) => e,
    };
    assert!(err.is_job_failure(), "{err}");
    assert!(
        err.to_string()
            .contains("command not found: drover-no-such-program"),
        "{err}"
    );
    let err = match rt.start(cx.command(Vec::<String>::new())).await {
        Ok(_) => panic!("an empty command started"),
        Err(e) => e,
    };
    assert!(err.is_job_failure(), "{err}");
}

pub async fn runtime_reports_ok<R: SuiteRuntime>(cx: &Ctx<R>) {
    let rt = &cx.rt;
    rt.check().await.unwrap();
}

/// Expands the behavioural suite for one runtime:
/// `runtime_suite!(module_name, |data_dir: &Path| MyRuntime::new(data_dir))`;
/// the runtime implements [`SuiteRuntime`].
#[macro_export]
#[doc(hidden)]
macro_rules! runtime_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::runtime_suite!(@tests $make;
                exit_code_zero_is_success,
                the_program_sees_the_name_it_was_called_by,
                nonzero_exit_code_is_reported,
                env_is_passed_with_drover_variables,
                secret_env_reaches_the_job,
                job_runs_in_the_given_workdir,
                stdout_and_stderr_are_both_captured_in_order,
                timeout_stops_the_job,
                stop_sends_sigterm_first,
                sigkill_follows_when_sigterm_is_ignored,
                kill_order_skips_the_grace_period,
                background_children_do_not_hold_the_output_open,
                missing_program_is_a_job_failure,
                runtime_reports_ok,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let cx = $crate::runtime::suite::Ctx::new($make).await;
                $crate::runtime::suite::$test(&cx).await;
                $crate::runtime::suite::SuiteRuntime::assert_nothing_left(&cx.rt).await;
            }
        )*
    };
}
