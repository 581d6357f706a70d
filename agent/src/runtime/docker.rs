//! The `docker` runtime (DESIGN §6): each attempt is a container on the
//! local Docker Engine, driven through bollard over the unix socket.
//!
//! Guarantees: the image is pulled per [`PullPolicy`] with classified errors;
//! the container gets a CPU weight (cpu shares, 1024 per core; a CFS quota
//! instead when the job asks for `cpu_hard_limit`), memory (swap off) and
//! pids limits, the labels
//! `drover.job`/`drover.attempt`/`drover.session`/`drover.agent`, is never
//! privileged and sees no host path except its per-attempt `/input` (read
//! only), `/output` and `/scratch`; its output is attached before it starts,
//! so none is lost; stopping signals its PID 1; an OOM kill is reported;
//! [`RunningJob::cleanup`] removes the container and the attempt's dirs and
//! keeps the image. Assigned GPUs become one `DeviceRequest` (driver
//! `nvidia`, their UUIDs, capability `gpu`), so the container sees those only.
//!
//! `disk_gib` becomes the `size` storage option, which only some storage
//! drivers enforce (overlay2 on xfs with `pquota`, btrfs, zfs, devicemapper).
//! Elsewhere (overlay2 on ext4, fuse-overlayfs, vfs) the Engine refuses it:
//! the runtime then logs once and runs without a disk limit, so the limit is
//! only the scheduler's accounting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::{mpsc, OnceCell};

use super::{
    AttemptKey, ExitStatus, JobDirs, OutputChunk, RunSpec, RunningJob, Runtime, RuntimeError,
    Started, Stream,
};

mod pull;
mod registry_auth;
#[cfg(any(test, feature = "test-image"))]
pub mod test_image;

pub use pull::{classify_pull_error, split_reference, Anonymous, PullPolicy, RegistryAuth};
pub use registry_auth::{
    ChainAuth, DockerConfigAuth, EcrAuth, EcrRegistry, Registry, DOCKER_HUB_KEY,
};

/// Label keys on every container the runtime creates.
pub const LABEL_JOB: &str = "drover.job";
pub const LABEL_ATTEMPT: &str = "drover.attempt";
pub const LABEL_SESSION: &str = "drover.session";
/// The agent that created the container: what `kill_leftovers` and the
/// host-side fence (`drover-agent fence-check`) look for.
pub const LABEL_AGENT: &str = "drover.agent";

/// Enough for any sane job, low enough that a fork bomb stays contained.
pub const PIDS_LIMIT: i64 = 4096;

/// Dangling images and stopped containers younger than this are kept (a
/// job may be about to use them).
const PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// How long `connect` and `check` wait for the Engine to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A container of one of this agent's jobs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobContainer {
    pub id: String,
    pub name: String,
    pub job: String,
    pub attempt: u64,
}

/// Runs jobs as containers on the local Docker Engine.
pub struct DockerRuntime {
    /// Negotiated on first use: the Engine may speak an older API (20.10
    /// speaks 1.41) or refuse old ones (29 needs 1.44).
    docker: OnceCell<Docker>,
    /// Per-attempt `/input`, `/output`, `/scratch` dirs live here.
    attempt_root: PathBuf,
    agent_id: String,
    auth: Arc<dyn RegistryAuth>,
    engine_version: OnceLock<String>,
    /// Cleared once the Engine refused a `size` storage option.
    disk_limit_supported: AtomicBool,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("attempt_root", &self.attempt_root)
            .field("agent_id", &self.agent_id)
            .field("engine_version", &self.engine_version.get())
            .finish()
    }
}

impl DockerRuntime {
    /// A runtime for the Engine at the local socket (`DOCKER_HOST` when it is
    /// a `unix://` URL, else `/var/run/docker.sock`), pulling with
    /// [`ChainAuth`] (ECR through AWS itself). Does not contact it.
    pub fn new(data_dir: impl AsRef<Path>, agent_id: &str) -> DockerRuntime {
        DockerRuntime {
            docker: OnceCell::new(),
            attempt_root: data_dir.as_ref().join("docker"),
            agent_id: agent_id.to_string(),
            auth: Arc::new(ChainAuth::default()),
            engine_version: OnceLock::new(),
            disk_limit_supported: AtomicBool::new(true),
        }
    }

    /// Pull credentials for the registries jobs use (ECR, Docker config).
    pub fn with_registry_auth(mut self, auth: Arc<dyn RegistryAuth>) -> DockerRuntime {
        self.auth = auth;
        self
    }

    /// [`new`](Self::new), then checks that the Engine answers and records
    /// its version for [`Runtime::description`].
    pub async fn connect(
        data_dir: impl AsRef<Path>,
        agent_id: &str,
    ) -> Result<DockerRuntime, RuntimeError> {
        let rt = DockerRuntime::new(data_dir, agent_id);
        rt.engine_version().await?;
        Ok(rt)
    }

    /// The Engine's version (`20.10.24`), asked once.
    pub async fn engine_version(&self) -> Result<String, RuntimeError> {
        if let Some(v) = self.engine_version.get() {
            return Ok(v.clone());
        }
        let docker = self.docker().await?;
        let version = tokio::time::timeout(PING_TIMEOUT, docker.version())
            .await
            .map_err(|_| unreachable_engine("no answer within 5 s"))?
            .map_err(|e| unreachable_engine(&e.to_string()))?;
        let v = version.version.unwrap_or_else(|| "unknown".into());
        Ok(self.engine_version.get_or_init(|| v).clone())
    }

    async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.docker
            .get_or_try_init(|| async {
                let docker = Docker::connect_with_local_defaults()
                    .map_err(|e| unreachable_engine(&e.to_string()))?;
                tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version())
                    .await
                    .map_err(|_| unreachable_engine("no answer within 5 s"))?
                    .map_err(|e| unreachable_engine(&e.to_string()))
            })
            .await
    }

    /// Removes dangling images (layers no tag names any more: an image
    /// replaced by a newer pull of its tag) created over `older_than` ago,
    /// and stopped containers of this agent. Tagged images stay — the cache
    /// is what makes the next job start fast — and the Engine never removes
    /// an image a container uses. `labels` narrow it further (tests).
    /// Returns the bytes reclaimed.
    pub async fn prune(
        &self,
        older_than: Duration,
        labels: &[String],
    ) -> Result<u64, RuntimeError> {
        let docker = self.docker().await?;
        let mut image_filters = HashMap::from([("dangling".to_string(), vec!["true".to_string()])]);
        let mut container_labels = vec![format!("{LABEL_AGENT}={}", self.agent_id)];
        if !labels.is_empty() {
            image_filters.insert("label".to_string(), labels.to_vec());
            container_labels.extend_from_slice(labels);
        }
        let mut container_filters = HashMap::from([("label".to_string(), container_labels)]);
        // The Engine compares whole seconds: "0s" would spare what was made
        // this second, so no age means no `until` filter at all.
        if !older_than.is_zero() {
            let until = vec![format!("{}s", older_than.as_secs())];
            image_filters.insert("until".to_string(), until.clone());
            container_filters.insert("until".to_string(), until);
        }
        let images = docker
            .prune_images(Some(bollard::query_parameters::PruneImagesOptions {
                filters: Some(image_filters),
            }))
            .await
            .map_err(|e| RuntimeError::Infra(format!("cannot prune dangling images: {e}")))?;
        let containers = docker
            .prune_containers(Some(bollard::query_parameters::PruneContainersOptions {
                filters: Some(container_filters),
            }))
            .await
            .map_err(|e| RuntimeError::Infra(format!("cannot prune stopped containers: {e}")))?;
        let reclaimed = images.space_reclaimed.unwrap_or(0).max(0) as u64
            + containers.space_reclaimed.unwrap_or(0).max(0) as u64;
        Ok(reclaimed)
    }

    /// The running containers of this agent's jobs, found by its label:
    /// what the host-side fence kills (`drover-agent fence-check`).
    pub async fn running_jobs(&self) -> Result<Vec<JobContainer>, RuntimeError> {
        let docker = self.docker().await?;
        let containers = self
            .own_containers(docker, &[LABEL_JOB.to_string()])
            .await?;
        Ok(containers
            .iter()
            .filter(|c| is_running(c))
            .filter_map(|c| {
                let (job, attempt) = attempt_key(c);
                Some(JobContainer {
                    id: c.id.clone()?,
                    name: c
                        .names
                        .iter()
                        .flatten()
                        .next()
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    job,
                    attempt,
                })
            })
            .collect())
    }

    /// SIGKILLs a container, as a job's kill does; leaves removing it to the
    /// agent (a restart's leftover cleanup, housekeeping).
    pub async fn kill_container(&self, id: &str) -> Result<(), RuntimeError> {
        signal_container(self.docker().await?, id, "SIGKILL").await
    }

    /// Containers of this agent (by its label), with extra label filters.
    async fn own_containers(
        &self,
        docker: &Docker,
        extra: &[String],
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let mut labels = vec![format!("{LABEL_AGENT}={}", self.agent_id)];
        labels.extend_from_slice(extra);
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), labels)])),
            ..Default::default()
        };
        docker
            .list_containers(Some(options))
            .await
            .map_err(|e| RuntimeError::Infra(format!("cannot list containers: {e}")))
    }

    fn labels(&self, spec: &RunSpec) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_JOB.to_string(), spec.job_id.clone()),
            (LABEL_ATTEMPT.to_string(), spec.attempt.to_string()),
            (LABEL_AGENT.to_string(), self.agent_id.clone()),
        ]);
        if !spec.session.is_empty() {
            labels.insert(LABEL_SESSION.to_string(), spec.session.clone());
        }
        labels
    }

    fn container_body(
        &self,
        spec: &RunSpec,
        dirs: &JobDirs,
        disk_limit: bool,
    ) -> ContainerCreateBody {
        let mut env = vec![
            format!("DROVER_JOB_ID={}", spec.job_id),
            format!("DROVER_ATTEMPT={}", spec.attempt),
            "DROVER_INPUT_DIR=/input".to_string(),
            "DROVER_OUTPUT_DIR=/output".to_string(),
            "DROVER_SCRATCH_DIR=/scratch".to_string(),
        ];
        env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let res = &spec.resources;
        let memory_bytes = (res.memory_mib > 0).then_some((res.memory_mib as i64) << 20);
        let bind = |source: &Path, target: &str, read_only: bool| Mount {
            target: Some(target.to_string()),
            source: Some(source.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        let host_config = HostConfig {
            nano_cpus: (spec.cpu_hard_limit && res.cpu_millis > 0)
                .then_some(res.cpu_millis as i64 * 1_000_000),
            cpu_shares: (!spec.cpu_hard_limit && res.cpu_millis > 0)
                .then(|| cpu_shares(res.cpu_millis)),
            memory: memory_bytes,
            // Equal to the memory limit: no swap.
            memory_swap: memory_bytes,
            pids_limit: Some(PIDS_LIMIT),
            privileged: Some(false),
            mounts: Some(vec![
                bind(&dirs.input, "/input", true),
                bind(&dirs.output, "/output", false),
                bind(&dirs.scratch, "/scratch", false),
            ]),
            storage_opt: (disk_limit && res.disk_gib > 0)
                .then(|| HashMap::from([("size".to_string(), format!("{}G", res.disk_gib))])),
            device_requests: gpu_device_request(&spec.gpus).map(|r| vec![r]),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            // argv is the full command: it replaces the image's entrypoint.
            entrypoint: Some(spec.argv[..1].to_vec()),
            cmd: Some(spec.argv[1..].to_vec()),
            env: Some(env),
            working_dir: spec
                .workdir
                .as_ref()
                .map(|w| w.to_string_lossy().into_owned()),
            user: spec.user.clone().filter(|u| !u.is_empty()),
            labels: Some(self.labels(spec)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(false),
            open_stdin: Some(false),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Creates the container; drops the disk limit (once, for good) when the
    /// storage driver cannot enforce it.
    async fn create(
        &self,
        docker: &Docker,
        name: &str,
        spec: &RunSpec,
        dirs: &JobDirs,
    ) -> Result<String, RuntimeError> {
        let options = || CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let disk_limit =
            spec.resources.disk_gib > 0 && self.disk_limit_supported.load(Ordering::Relaxed);
        let first = docker
            .create_container(Some(options()), self.container_body(spec, dirs, disk_limit))
            .await;
        let result = match first {
            Err(DockerError::DockerResponseServerError { message, .. })
                if disk_limit && message.to_ascii_lowercase().contains("storage") =>
            {
                tracing::warn!(
                    "the storage driver cannot limit container disk size ({message}); jobs run without a disk limit"
                );
                self.disk_limit_supported.store(false, Ordering::Relaxed);
                docker
                    .create_container(Some(options()), self.container_body(spec, dirs, false))
                    .await
            }
            other => other,
        };
        match result {
            Ok(created) => Ok(created.id),
            Err(DockerError::DockerResponseServerError {
                status_code: 400,
                message,
            }) => Err(RuntimeError::Job(format!(
                "cannot create the container: {message}"
            ))),
            Err(DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            }) => Err(RuntimeError::Infra(format!(
                "image {:?} vanished before its container was created: {message}",
                spec.image
            ))),
            Err(e) => Err(RuntimeError::Infra(format!(
                "cannot create the container: {e}"
            ))),
        }
    }
}

/// The assigned GPUs, by UUID, for the NVIDIA container runtime; `None`
/// without GPUs (a request for zero devices would still need the runtime).
/// Docker's CPU weight for a request in millicores: 1024 per core, as ECS
/// and Nomad map CPU units; Docker's floor is 2.
fn cpu_shares(cpu_millis: u32) -> i64 {
    (i64::from(cpu_millis) * 1024 / 1000).max(2)
}

fn gpu_device_request(gpus: &[crate::gpu::GpuDevice]) -> Option<DeviceRequest> {
    (!gpus.is_empty()).then(|| DeviceRequest {
        driver: Some("nvidia".to_string()),
        device_ids: Some(gpus.iter().map(|g| g.uuid.clone()).collect()),
        capabilities: Some(vec![vec!["gpu".to_string()]]),
        ..Default::default()
    })
}

fn unreachable_engine(why: &str) -> RuntimeError {
    RuntimeError::Infra(format!(
        "Docker Engine not reachable: {why} — is dockerd running and may the agent use its socket (DOCKER_HOST, /var/run/docker.sock)?"
    ))
}

/// Job ids are ULIDs, but never trust a name that becomes a path or a
/// container name.
fn safe_name(job_id: &str) -> String {
    job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The attempt's managed mounts: the agent's (with the inputs unpacked,
/// packed and removed by the agent afterwards), or made here for a spec that
/// brings none and removed with the container.
struct AttemptDirs {
    dirs: JobDirs,
    owned: bool,
}

impl AttemptDirs {
    async fn for_spec(spec: &RunSpec, root: PathBuf) -> Result<AttemptDirs, RuntimeError> {
        Ok(match &spec.dirs {
            Some(dirs) => AttemptDirs {
                dirs: dirs.clone(),
                owned: false,
            },
            None => AttemptDirs {
                dirs: JobDirs::create(root, None).await?,
                owned: true,
            },
        })
    }

    async fn remove(&self) {
        if self.owned {
            self.dirs.remove().await;
        }
    }
}

/// Sorts a failed container start: a command, user or workdir the image
/// does not have is the job's fault; the rest is the host's.
fn start_error(spec: &RunSpec, e: DockerError) -> RuntimeError {
    let program = &spec.argv[0];
    let (status, message) = match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => (Some(status_code), message),
        e => (None, e.to_string()),
    };
    let m = message.to_ascii_lowercase();
    if m.contains("executable file not found")
        || (m.contains("no such file or directory") && m.contains(&program.to_ascii_lowercase()))
    {
        RuntimeError::Job(format!(
            "command not found: {program} (in image {:?})",
            spec.image
        ))
    } else if m.contains("permission denied") && m.contains("exec") {
        RuntimeError::Job(format!(
            "permission denied: cannot execute {program} (in image {:?})",
            spec.image
        ))
    } else if m.contains("unable to find user") || m.contains("no matching entries in passwd") {
        RuntimeError::Job(format!(
            "user {:?} does not exist in image {:?}",
            spec.user.as_deref().unwrap_or_default(),
            spec.image
        ))
    } else if status == Some(400) {
        RuntimeError::Job(format!("cannot start the container: {message}"))
    } else {
        RuntimeError::Infra(format!("cannot start the container: {message}"))
    }
}

/// Sends `signal` to a container's PID 1; one that already stopped or is
/// gone is fine.
async fn signal_container(docker: &Docker, id: &str, signal: &str) -> Result<(), RuntimeError> {
    let options = KillContainerOptions {
        signal: signal.to_string(),
    };
    match docker.kill_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        // 409: not running any more; 404: gone. Either way it has stopped.
        Err(DockerError::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => Ok(()),
        Err(e) => Err(RuntimeError::Infra(format!(
            "cannot send {signal} to container {id}: {e}"
        ))),
    }
}

/// The attempt a container runs, from its labels (empty when unlabelled).
fn attempt_key(c: &bollard::models::ContainerSummary) -> AttemptKey {
    let labels = c.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key));
    (
        label(LABEL_JOB).cloned().unwrap_or_default(),
        label(LABEL_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or_default(),
    )
}

fn is_running(c: &bollard::models::ContainerSummary) -> bool {
    c.state.as_ref().is_some_and(|s| s.to_string() == "running")
}

/// Force-removes a container (killing it if it runs) with its anonymous
/// volumes; a container already gone is fine.
async fn remove_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        // 409: removal already in progress.
        Err(DockerError::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn description(&self) -> String {
        match self.engine_version.get() {
            Some(v) => format!("docker {v}"),
            None => "docker".to_string(),
        }
    }

    async fn start(&self, spec: RunSpec) -> Result<Started, RuntimeError> {
        if spec.argv.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(RuntimeError::Job("command is empty: nothing to run".into()));
        }
        if spec.image.trim().is_empty() {
            return Err(RuntimeError::Job(
                "no image given: the docker runtime runs every job in a container image".into(),
            ));
        }
        let docker = self.docker().await?;
        let policy = spec
            .pull_policy
            .unwrap_or_else(|| PullPolicy::default_for(&spec.image));
        pull::ensure_image(docker, &spec.image, policy, self.auth.as_ref()).await?;

        // Unique even when an attempt is retried on the same agent.
        let name = format!(
            "drover-{}-{}-{:08x}",
            safe_name(&spec.job_id),
            spec.attempt,
            rand::random::<u32>()
        );
        let dirs = AttemptDirs::for_spec(&spec, self.attempt_root.join(&name)).await?;
        let id = match self.create(docker, &name, &spec, &dirs.dirs).await {
            Ok(id) => id,
            Err(e) => {
                dirs.remove().await;
                return Err(e);
            }
        };
        let abandon = |e: RuntimeError| async {
            if let Err(re) = remove_container(docker, &id).await {
                tracing::warn!(container = %id, "cannot remove a container that did not start: {re}");
            }
            dirs.remove().await;
            e
        };
        // Attached before the start, so not a byte of output is missed.
        let attach = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = match docker.attach_container(&id, Some(attach)).await {
            Ok(attached) => attached,
            Err(e) => {
                let e = RuntimeError::Infra(format!("cannot attach to the container: {e}"));
                return Err(abandon(e).await);
            }
        };
        if let Err(e) = docker.start_container(&id, None).await {
            let e = start_error(&spec, e);
            return Err(abandon(e).await);
        }

        let (tx, output) = mpsc::channel(64);
        tokio::spawn(pump(attached, tx));
        tracing::debug!(job = %spec.job_id, attempt = spec.attempt, container = %id, image = %spec.image, argv = ?spec.argv, env_keys = spec.env.len(), "container started");
        Ok(Started {
            job: Box::new(DockerJob {
                docker: docker.clone(),
                id,
                status: None,
                killed: false,
                dirs: Some(dirs),
            }),
            output,
        })
    }

    async fn check(&self) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        tokio::time::timeout(PING_TIMEOUT, docker.ping())
            .await
            .map_err(|_| unreachable_engine("no answer within 5 s"))?
            .map_err(|e| unreachable_engine(&e.to_string()))?;
        tokio::fs::create_dir_all(&self.attempt_root)
            .await
            .map_err(|e| {
                RuntimeError::Infra(format!(
                    "cannot create {}: {e} — is the data dir writable? (DROVER_DATA_DIR)",
                    self.attempt_root.display()
                ))
            })
    }

    /// Kills and removes every container labelled with this agent's id, and
    /// the attempt dirs of earlier runs. Adopting containers whose lease is
    /// still held is a follow-up; until then they are requeued.
    async fn kill_leftovers(&self, keep: &[AttemptKey]) -> Result<usize, RuntimeError> {
        let docker = self.docker().await?;
        let containers = self.own_containers(docker, &[]).await?;
        let mut killed = 0;
        for c in containers {
            let Some(id) = c.id.as_deref() else { continue };
            if keep.contains(&attempt_key(&c)) {
                continue;
            }
            let running = is_running(&c);
            match remove_container(docker, id).await {
                Ok(()) if running => killed += 1,
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(container = %id, "cannot remove a leftover container: {e}")
                }
            }
        }
        if keep.is_empty() {
            // Dirs this runtime made for specs without agent-made ones.
            if let Err(e) = tokio::fs::remove_dir_all(&self.attempt_root).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.attempt_root.display(), "cannot remove leftover attempt dirs: {e}");
                }
            }
        }
        Ok(killed)
    }

    fn adopts(&self) -> bool {
        true
    }

    fn confines_jobs(&self) -> bool {
        true
    }

    async fn adopt(&self, spec: &RunSpec) -> Result<Option<Started>, RuntimeError> {
        let docker = self.docker().await?;
        let filters = [
            format!("{LABEL_JOB}={}", spec.job_id),
            format!("{LABEL_ATTEMPT}={}", spec.attempt),
        ];
        let Some(id) = self
            .own_containers(docker, &filters)
            .await?
            .into_iter()
            .find_map(|c| c.id)
        else {
            return Ok(None);
        };
        // The whole output again, from the start: the coordinator stores by
        // offset and skips the bytes it already has.
        let options = bollard::query_parameters::LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        let logs = docker.logs(&id, Some(options));
        let (tx, output) = mpsc::channel(64);
        tokio::spawn(pump_logs(logs, tx));
        tracing::info!(job = %spec.job_id, attempt = spec.attempt, container = %id, "adopted a running container");
        Ok(Some(Started {
            job: Box::new(DockerJob {
                docker: docker.clone(),
                id,
                status: None,
                killed: false,
                dirs: Some(AttemptDirs {
                    dirs: spec.dirs.clone().unwrap_or_else(|| JobDirs {
                        root: PathBuf::new(),
                        input: PathBuf::new(),
                        output: PathBuf::new(),
                        scratch: PathBuf::new(),
                    }),
                    owned: false,
                }),
            }),
            output,
        }))
    }

    async fn housekeeping(&self) -> Result<(), RuntimeError> {
        let reclaimed = self.prune(PRUNE_AFTER, &[]).await?;
        if reclaimed > 0 {
            tracing::info!(
                bytes = reclaimed,
                "pruned dangling images and stopped containers"
            );
        }
        Ok(())
    }
}

/// Copies the attached, demultiplexed streams into the output channel until
/// the container's stdio closes (when its PID 1 exits, the kernel kills the
/// rest of its PID namespace).
/// Copies a followed log stream (an adopted container) into the output
/// channel until the container ends.
async fn pump_logs(
    logs: impl futures::Stream<Item = Result<LogOutput, DockerError>>,
    tx: mpsc::Sender<OutputChunk>,
) {
    futures::pin_mut!(logs);
    while let Some(item) = logs.next().await {
        let (stream, data) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                (Stream::Stdout, message)
            }
            Ok(LogOutput::StdErr { message }) => (Stream::Stderr, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                tracing::debug!("container logs ended: {e}");
                break;
            }
        };
        if tx.send(OutputChunk { stream, data }).await.is_err() {
            break;
        }
    }
}

async fn pump(attached: bollard::container::AttachContainerResults, tx: mpsc::Sender<OutputChunk>) {
    // Holding the write half keeps the attach connection whole.
    let bollard::container::AttachContainerResults { mut output, input } = attached;
    while let Some(item) = output.next().await {
        let (stream, data) = match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                (Stream::Stdout, message)
            }
            Ok(LogOutput::StdErr { message }) => (Stream::Stderr, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                tracing::debug!("container output ended: {e}");
                break;
            }
        };
        if tx.send(OutputChunk { stream, data }).await.is_err() {
            break;
        }
    }
    drop(input);
}

struct DockerJob {
    docker: Docker,
    id: String,
    status: Option<ExitStatus>,
    /// The agent sent SIGKILL: exit code 137 then means that signal.
    killed: bool,
    /// `None` once cleaned up.
    dirs: Option<AttemptDirs>,
}

impl DockerJob {
    async fn signal(&mut self, signal: &str) -> Result<(), RuntimeError> {
        if self.status.is_some() {
            return Ok(());
        }
        signal_container(&self.docker, &self.id, signal).await
    }

    /// The exit code and OOM flag from the container's state. The Engine
    /// may record the OOM event just after the exit: a 137 that the agent
    /// did not cause is looked at again for a moment.
    async fn final_state(&self, waited_code: i64) -> Result<(i64, bool), RuntimeError> {
        let mut attempts = 0;
        loop {
            let inspected = self
                .docker
                .inspect_container(&self.id, None)
                .await
                .map_err(|e| {
                    RuntimeError::Infra(format!("cannot inspect container {}: {e}", self.id))
                })?;
            let state = inspected.state.unwrap_or_default();
            let code = state.exit_code.unwrap_or(waited_code);
            let oom = state.oom_killed.unwrap_or(false);
            attempts += 1;
            if oom || code != 137 || self.killed || attempts >= 10 {
                return Ok((code, oom));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Docker reports a signal death as 128 + signal; believe it only for a
/// SIGKILL the agent or the OOM killer sent, since `exit 137` looks the same.
fn exit_status(code: i64, oom_killed: bool, killed_by_agent: bool) -> ExitStatus {
    if code == 137 && (oom_killed || killed_by_agent) {
        ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed,
        }
    } else {
        ExitStatus {
            code: Some(code as i32),
            signal: None,
            oom_killed,
        }
    }
}

#[async_trait]
impl RunningJob for DockerJob {
    async fn wait(&mut self) -> Result<ExitStatus, RuntimeError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let options = WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let mut waiting = self.docker.wait_container(&self.id, Some(options));
        let code = match waiting.next().await {
            Some(Ok(response)) => response.status_code,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                return Err(RuntimeError::Infra(format!(
                    "cannot wait for container {}: {e}",
                    self.id
                )))
            }
            None => {
                return Err(RuntimeError::Infra(format!(
                    "waiting for container {} ended without a status",
                    self.id
                )))
            }
        };
        let (code, oom) = self.final_state(code).await?;
        let status = exit_status(code, oom, self.killed);
        self.status = Some(status);
        Ok(status)
    }

    async fn terminate(&mut self) -> Result<(), RuntimeError> {
        self.signal("SIGTERM").await
    }

    async fn kill(&mut self) -> Result<(), RuntimeError> {
        if self.status.is_none() {
            self.killed = true;
        }
        self.signal("SIGKILL").await
    }

    async fn cleanup(mut self: Box<Self>) {
        // Removing with force kills it first if it still runs.
        if let Err(e) = remove_container(&self.docker, &self.id).await {
            tracing::warn!(container = %self.id, "cannot remove the container: {e}");
        }
        if let Some(dirs) = self.dirs.take() {
            dirs.remove().await;
        }
    }
}

impl Drop for DockerJob {
    /// A job whose task died (panic, abort) must not keep running
    /// unsupervised: remove its container in the background.
    fn drop(&mut self) {
        let Some(dirs) = self.dirs.take() else { return };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let docker = self.docker.clone();
        let id = std::mem::take(&mut self.id);
        handle.spawn(async move {
            let _ = remove_container(&docker, &id).await;
            dirs.remove().await;
        });
    }
}

#[cfg(test)]
mod tests;
