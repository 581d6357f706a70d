//! The Docker runtime against the real Engine: the shared suite, plus what
//! only containers have (OOM kills, PID 1, images, limits, mounts).

use tokio::sync::watch;

use super::*;
use crate::runtime::suite::{collect, start_ready, Ctx, SuiteRuntime, PATIENCE};
use crate::runtime::{supervise, StopOrder, OOM_KILLED};

/// Each runtime gets its own agent id, so its leftovers are its own.
fn test_runtime(dir: &Path) -> DockerRuntime {
    DockerRuntime::new(dir, &format!("test-{:016x}", rand::random::<u64>()))
}

#[async_trait]
impl SuiteRuntime for DockerRuntime {
    async fn suite_image(&self) -> String {
        test_image::ensure(self.docker().await.unwrap()).await
    }

    fn shares_host_fs(&self) -> bool {
        false
    }

    async fn assert_nothing_left(&self) {
        let left = self.containers().await;
        assert!(left.is_empty(), "containers left behind: {left:?}");
        let dirs: Vec<_> = match std::fs::read_dir(&self.attempt_root) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        assert!(dirs.is_empty(), "attempt dirs left behind: {dirs:?}");
    }
}

impl DockerRuntime {
    /// Ids of every container (running or not) labelled with this agent.
    async fn containers(&self) -> Vec<String> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{LABEL_AGENT}={}", self.agent_id)],
            )])),
            ..Default::default()
        };
        let docker = self.docker().await.unwrap();
        docker
            .list_containers(Some(options))
            .await
            .unwrap()
            .into_iter()
            .filter_map(|c| c.id)
            .collect()
    }
}

crate::runtime_suite!(docker_suite, |dir: &std::path::Path| test_runtime(dir));

async fn ctx() -> Ctx<DockerRuntime> {
    Ctx::new(test_runtime).await
}

#[tokio::test]
async fn memory_limit_oom_is_reported_as_oom_killed() {
    let cx = ctx().await;
    let mut spec =
        cx.sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}; exit 3");
    spec.resources.memory_mib = 32;
    let started = cx.rt.start(spec).await.unwrap();
    let (status, out, _, job) = collect(started).await;
    job.cleanup().await;
    assert!(status.oom_killed, "{status:?} {out}");
    assert!(!status.success());
    assert!(
        status.describe().starts_with(OOM_KILLED),
        "{}",
        status.describe()
    );
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn sigterm_reaches_pid_1_of_the_container() {
    let cx = ctx().await;
    let (mut job, reader) = start_ready(
        &cx,
        "trap 'echo got-term-as-pid-$$; exit 143' TERM; echo ready; while true; do sleep 0.05; done",
    )
    .await;
    let (tx, orders) = watch::channel(None);
    tx.send_replace(Some(StopOrder::Cancel));
    let ended = tokio::time::timeout(PATIENCE, supervise(job.as_mut(), None, PATIENCE, orders))
        .await
        .expect("stop did not finish")
        .unwrap();
    assert_eq!(ended.status.code, Some(143), "{ended:?}");
    let out = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("got-term-as-pid-1\n"), "{out}");
    job.cleanup().await;
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn container_gets_limits_labels_and_only_the_managed_mounts() {
    let cx = ctx().await;
    let mut spec = cx.sh(
        "id -u; touch /output/o /scratch/s && echo rw-ok; touch /input/i 2>/dev/null || echo input-ro; echo ready; sleep 1000",
    );
    spec.job_id = "01JOBLIMITS".into();
    spec.attempt = 2;
    spec.session = "sess-1".into();
    spec.user = Some("1234".into());
    spec.resources.cpu_millis = 500;
    spec.resources.memory_mib = 64;
    let crate::runtime::Started { job, mut output } = cx.rt.start(spec).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(PATIENCE, async {
        while !out.contains("ready") {
            let chunk = output.recv().await.expect("output ended early");
            out.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    })
    .await
    .expect("job never got ready");
    assert_eq!(out, "1234\nrw-ok\ninput-ro\nready\n");

    let docker = cx.rt.docker().await.unwrap();
    let ids = cx.rt.containers().await;
    assert_eq!(ids.len(), 1);
    let inspected = docker.inspect_container(&ids[0], None).await.unwrap();
    let labels = inspected.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels[LABEL_JOB], "01JOBLIMITS");
    assert_eq!(labels[LABEL_ATTEMPT], "2");
    assert_eq!(labels[LABEL_SESSION], "sess-1");
    let hc = inspected.host_config.unwrap();
    // The CPU request is a weight unless the job asks for a cap.
    assert_eq!(hc.cpu_shares, Some(512));
    assert_eq!(hc.nano_cpus.unwrap_or(0), 0, "no CPU quota by default");
    assert_eq!(hc.memory, Some(64 << 20));
    assert_eq!(hc.memory_swap, Some(64 << 20), "swap is off");
    assert_eq!(hc.pids_limit, Some(PIDS_LIMIT));
    assert_eq!(hc.privileged, Some(false));
    assert!(hc.binds.unwrap_or_default().is_empty());
    let mut mounts: Vec<(String, bool, String)> = inspected
        .mounts
        .unwrap()
        .into_iter()
        .map(|m| (m.destination.unwrap(), m.rw.unwrap(), m.source.unwrap()))
        .collect();
    mounts.sort();
    let targets: Vec<(&str, bool)> = mounts.iter().map(|(t, rw, _)| (t.as_str(), *rw)).collect();
    assert_eq!(
        targets,
        [("/input", false), ("/output", true), ("/scratch", true)]
    );
    let output_dir = PathBuf::from(&mounts[1].2);
    assert!(output_dir.starts_with(cx.dir.path()), "{output_dir:?}");
    assert!(
        output_dir.join("o").exists(),
        "/output is the host's attempt dir"
    );

    job.cleanup().await;
    assert!(!output_dir.exists(), "the attempt's dirs are removed");
    cx.rt.assert_nothing_left().await;
}

/// What the job sees of its CPU cgroup: `quota period` (cgroup v2's
/// `cpu.max`, or v1's `cfs_quota_us cfs_period_us`) and the weight (v2's
/// `cpu.weight`, or v1's `cpu.shares`).
const CPU_CGROUP: &str = "cd /sys/fs/cgroup; \
    if [ -f cpu.max ]; then echo quota $(cat cpu.max); echo weight $(cat cpu.weight); \
    else echo quota $(cat cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us); echo weight $(cat cpu/cpu.shares); fi";

#[tokio::test]
async fn the_cpu_request_is_a_weight_unless_the_job_asks_for_a_cap() {
    let cx = ctx().await;
    let mut soft = cx.sh(CPU_CGROUP);
    soft.resources.cpu_millis = 2_000;
    let (status, out, _, job) = collect(cx.rt.start(soft).await.unwrap()).await;
    job.cleanup().await;
    assert!(status.success(), "{status:?} {out}");
    // No quota (v1: -1, v2: max); twice the default weight of 1024 shares
    // (v2 maps 2048 shares to weight 79 with runc's formula, 1024 to 39).
    assert!(
        out.starts_with("quota -1 ") || out.starts_with("quota max "),
        "{out}"
    );
    assert!(
        out.contains("weight 2048\n") || out.contains("weight 79\n"),
        "{out}"
    );

    let mut hard = cx.sh(CPU_CGROUP);
    hard.resources.cpu_millis = 250;
    hard.cpu_hard_limit = true;
    let (status, out, _, job) = collect(cx.rt.start(hard).await.unwrap()).await;
    job.cleanup().await;
    assert!(status.success(), "{status:?} {out}");
    // A quarter of each period.
    let quota: Vec<i64> = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("quota "))
        .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
        .unwrap_or_default();
    assert!(quota.len() == 2 && quota[0] * 4 == quota[1], "{out}");
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn leftovers_of_an_earlier_agent_are_killed_and_removed() {
    let cx = ctx().await;
    let (job, _reader) = start_ready(&cx, "echo ready; sleep 1000").await;
    assert_eq!(cx.rt.containers().await.len(), 1);
    // A restarted agent has only the labels to go by.
    let restarted = DockerRuntime::new(cx.dir.path(), &cx.rt.agent_id);
    assert_eq!(restarted.kill_leftovers(&[]).await.unwrap(), 1);
    cx.rt.assert_nothing_left().await;
    job.cleanup().await;
}

/// A registry on loopback (the Engine trusts 127.0.0.0/8 over plain HTTP)
/// answering every manifest request with `status`.
async fn fake_registry(status: u16) -> String {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "{}" }))
        .fallback(move || async move {
            let body = serde_json::json!({"errors": [{
                "code": "MANIFEST_UNKNOWN",
                "message": "manifest unknown",
                "detail": {},
            }]});
            (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response()
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

#[tokio::test]
async fn missing_image_is_a_job_failure_with_a_clear_reason() {
    let cx = ctx().await;
    let registry = fake_registry(404).await;
    let image = format!("{registry}/drover-does-not-exist:1");
    let mut spec = cx.command(["true"]);
    spec.image = image.clone();
    let err = match cx.rt.start(spec).await {
        Ok(_) => panic!("a missing image started"),
        Err(e) => e,
    };
    assert!(err.is_job_failure(), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("image {image:?} not found")),
        "{err}"
    );
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn registry_outages_are_infra_errors() {
    let cx = ctx().await;
    let failing = fake_registry(503).await;
    // Bound and dropped: nothing listens there any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    for image in [format!("{failing}/app:1"), format!("{closed}/app:1")] {
        let mut spec = cx.command(["true"]);
        spec.image = image.clone();
        let err = match cx.rt.start(spec).await {
            Ok(_) => panic!("{image} started"),
            Err(e) => e,
        };
        assert!(!err.is_job_failure(), "{image}: {err}");
        assert!(err.to_string().contains(&image), "{err}");
    }
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn a_job_without_an_image_fails_clearly() {
    let cx = ctx().await;
    let err = match cx.rt.start(RunSpec::command("j", ["true"])).await {
        Ok(_) => panic!("a job without an image started"),
        Err(e) => e,
    };
    assert!(err.is_job_failure());
    assert!(err.to_string().contains("no image given"), "{err}");
}

#[tokio::test]
async fn an_unknown_user_is_a_job_failure() {
    let cx = ctx().await;
    let mut spec = cx.command(["true"]);
    spec.user = Some("nobody-here".into());
    let err = match cx.rt.start(spec).await {
        Ok(_) => panic!("an unknown user started"),
        Err(e) => e,
    };
    assert!(err.is_job_failure(), "{err}");
    assert!(err.to_string().contains("nobody-here"), "{err}");
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn description_names_the_engine_version() {
    let dir = tempfile::tempdir().unwrap();
    let rt = DockerRuntime::connect(dir.path(), "test-describe")
        .await
        .unwrap();
    let description = rt.description();
    assert!(description.starts_with("docker "), "{description}");
    assert!(description.len() > "docker ".len(), "{description}");
}

#[test]
fn exit_code_137_is_a_signal_only_when_someone_sent_one() {
    assert_eq!(exit_status(137, false, false).code, Some(137));
    assert_eq!(exit_status(137, false, true).signal, Some(9));
    let oom = exit_status(137, true, false);
    assert_eq!((oom.signal, oom.oom_killed), (Some(9), true));
    assert_eq!(exit_status(143, false, false).code, Some(143));
}

#[tokio::test]
async fn a_disk_limit_the_storage_driver_cannot_enforce_does_not_fail_the_job() {
    let cx = ctx().await;
    for _ in 0..2 {
        let mut spec = cx.sh("echo ran");
        spec.resources.disk_gib = 1;
        let started = cx.rt.start(spec).await.unwrap();
        let (status, out, _, job) = collect(started).await;
        job.cleanup().await;
        assert!(status.success(), "{status:?}");
        assert_eq!(out, "ran\n");
    }
    cx.rt.assert_nothing_left().await;
}

fn attempt_dirs() -> crate::runtime::JobDirs {
    crate::runtime::JobDirs {
        root: "/attempt".into(),
        input: "/attempt/input".into(),
        output: "/attempt/output".into(),
        scratch: "/attempt/scratch".into(),
    }
}

/// The body only: no NVIDIA container runtime exists here, so such a
/// container is never created in tests.
#[test]
fn assigned_gpus_become_one_nvidia_device_request_by_uuid() {
    let rt = DockerRuntime::new("/data", "agent-1");
    let mut spec = RunSpec::command("01GPUJOB", ["nvidia-smi"]);
    spec.image = "cuda:12".into();
    spec.gpus = crate::gpu::FakeGpus::new(4, "A10G").0[2..].to_vec();
    let body = rt.container_body(&spec, &attempt_dirs(), false);
    let requests = body.host_config.unwrap().device_requests.unwrap();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.driver.as_deref(), Some("nvidia"));
    assert_eq!(
        request.device_ids.as_deref(),
        Some(&["GPU-fake-2".to_string(), "GPU-fake-3".to_string()][..])
    );
    assert_eq!(request.capabilities, Some(vec![vec!["gpu".to_string()]]));
    assert_eq!(request.count, None, "devices are named, never counted");
    let json = serde_json::to_value(request).unwrap();
    assert_eq!(json["DeviceIDs"][0], "GPU-fake-2", "{json}");

    spec.gpus.clear();
    let body = rt.container_body(&spec, &attempt_dirs(), false);
    assert_eq!(body.host_config.unwrap().device_requests, None);
}

/// Builds `tag` from scratch with one file of `content`, labelled `label`;
/// returns the image id.
async fn build_labelled(docker: &Docker, tag: &str, label: &str, content: &str) -> String {
    use bollard::query_parameters::{BuildImageOptions, BuilderVersion};
    let mut context = Vec::new();
    let dockerfile = format!("FROM scratch\nLABEL {label}\nCOPY data /data\n");
    test_image::tar_file(&mut context, "Dockerfile", 0o644, dockerfile.as_bytes());
    test_image::tar_file(&mut context, "data", 0o644, content.as_bytes());
    context.extend_from_slice(&[0u8; 1024]);
    let options = BuildImageOptions {
        t: Some(tag.to_string()),
        dockerfile: "Dockerfile".to_string(),
        rm: true,
        forcerm: true,
        version: BuilderVersion::BuilderV1,
        ..Default::default()
    };
    let mut progress = docker.build_image(
        options,
        None,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    while let Some(item) = progress.next().await {
        let info = item.expect("building a test image");
        assert!(info.error_detail.is_none(), "{info:?}");
    }
    docker.inspect_image(tag).await.unwrap().id.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_dangling_images_and_keeps_tagged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let rt = test_runtime(dir.path());
    let docker = rt.docker().await.unwrap().clone();
    let image = test_image::ensure(&docker).await;
    let label = format!("drover.test=prune-{:016x}", rand::random::<u64>());
    let tag = format!("drover-prune-test:{:016x}", rand::random::<u64>());
    // Building the tag again leaves the first image dangling.
    let old = build_labelled(&docker, &tag, &label, "old").await;
    let new = build_labelled(&docker, &tag, &label, "new").await;
    assert_ne!(old, new);

    rt.prune(Duration::ZERO, std::slice::from_ref(&label))
        .await
        .unwrap();
    assert!(
        docker.inspect_image(&old).await.is_err(),
        "the dangling image was pruned"
    );
    assert_eq!(
        docker.inspect_image(&tag).await.unwrap().id.unwrap(),
        new,
        "the tagged image stays"
    );
    assert!(
        docker.inspect_image(&image).await.is_ok(),
        "other images stay"
    );
    let _ = docker
        .remove_image(
            &tag,
            Some(bollard::query_parameters::RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}
