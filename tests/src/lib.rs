//! A sandbox of real Drover processes on loopback: one coordinator and N
//! agents started from the workspace's built binaries, plus the CLI's HTTP
//! client to drive them. Tests wait on conditions, never on sleeps.

pub mod aws;
pub mod bench;
pub mod ecs_metadata;
pub mod imds;
pub mod timed_store;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use drover_cli::client::Client;
use drover_proto::model::{Agent, Job};
use tokio::process::{Child, Command};

pub const JOIN_TOKEN: &str = "e2e-join-token-0123456789";
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

/// Where the workspace's binaries are: next to this test's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir").to_path_buf();
    // Test executables live in `deps/`; binaries one level up.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; scripts/test.sh does it)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `https` for a sandbox with a CA, else `http`.
fn scheme(ca_file: &Option<PathBuf>) -> &'static str {
    if ca_file.is_some() {
        "https"
    } else {
        "http"
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Coordinator settings the scenarios tune (short TTLs make agent loss quick).
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub heartbeat_interval_ms: u64,
    pub session_ttl_ms: u64,
    pub clock_skew_ms: u64,
    pub reaper_interval_ms: u64,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            heartbeat_interval_ms: 300,
            session_ttl_ms: 2_000,
            clock_skew_ms: 200,
            reaper_interval_ms: 100,
        }
    }
}

pub struct CoordinatorProcess {
    child: Child,
    pub grpc_addr: String,
    pub http_addr: String,
}

impl CoordinatorProcess {
    /// Starts `drover-coordinator` on `data_dir`; `addrs` pins the ports (a restart).
    pub async fn start(
        data_dir: &Path,
        settings: &CoordinatorSettings,
        addrs: Option<(&str, &str)>,
    ) -> anyhow::Result<CoordinatorProcess> {
        Self::start_env(data_dir, settings, addrs, &[]).await
    }

    /// [`start`](Self::start) with extra `DROVER_*` environment (another
    /// store or blob store: `DROVER_STORE=dynamodb`, `DROVER_BLOBS=s3`…).
    pub async fn start_env(
        data_dir: &Path,
        settings: &CoordinatorSettings,
        addrs: Option<(&str, &str)>,
        env: &[(String, String)],
    ) -> anyhow::Result<CoordinatorProcess> {
        let (grpc, http) = addrs.unwrap_or(("127.0.0.1:0", "127.0.0.1:0"));
        let config = format!(
            "data_dir = {data_dir:?}\ngrpc_addr = {grpc:?}\nhttp_addr = {http:?}\n\
             heartbeat_interval_ms = {}\nsession_ttl_ms = {}\nclock_skew_ms = {}\nreaper_interval_ms = {}\n\
             kill_grace_ms = 2000\n\
             [[join_tokens]]\ntoken = {JOIN_TOKEN:?}\n[[api_tokens]]\ntoken = {ADMIN_TOKEN:?}\nscopes = [\"admin\"]\n",
            settings.heartbeat_interval_ms,
            settings.session_ttl_ms,
            settings.clock_skew_ms,
            settings.reaper_interval_ms,
        );
        std::fs::create_dir_all(data_dir)?;
        let config_path = data_dir.join("coordinator.toml");
        std::fs::write(&config_path, config)?;
        let ready = data_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(binary("drover-coordinator"))
            .arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting drover-coordinator")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let ready: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str(&text) {
                    break v;
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("drover-coordinator exited during start-up: {status}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("drover-coordinator did not become ready within 20s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(CoordinatorProcess {
            child,
            grpc_addr: ready["grpc_addr"].as_str().unwrap_or_default().to_string(),
            http_addr: ready["http_addr"].as_str().unwrap_or_default().to_string(),
        })
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }
}

pub struct AgentProcess {
    child: Child,
    pub agent_id: String,
}

impl AgentProcess {
    /// True once the process has exited; its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or_default()
    }

    /// SIGKILL: the agent gets no chance to leave or complete anything.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }
}

/// A coordinator and its agents, as processes.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub settings: CoordinatorSettings,
    pub coordinator: CoordinatorProcess,
    pub agents: Vec<AgentProcess>,
    pub client: Client,
    /// Extra environment of the coordinator process.
    pub coordinator_env: Vec<(String, String)>,
    /// Agents are named `<prefix>-<index>`. Docker tests that run at the
    /// same time on one Engine need distinct prefixes: an agent cleans up
    /// the containers labelled with its id.
    pub agent_prefix: String,
    /// The CA of a TLS coordinator: the client and agents trust it and use
    /// https URLs. `None`: plaintext.
    pub ca_file: Option<PathBuf>,
}

/// The files of a TLS coordinator (DROVER_TLS_CERT_FILE / _KEY_FILE) and
/// of the CA its clients trust.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

impl Sandbox {
    pub async fn start(agents: usize, settings: CoordinatorSettings) -> Sandbox {
        Self::start_env(agents, settings, Vec::new()).await
    }

    /// [`start`](Self::start) with extra environment for the coordinator
    /// (kept for [`restart_coordinator`](Self::restart_coordinator)).
    pub async fn start_env(
        agents: usize,
        settings: CoordinatorSettings,
        coordinator_env: Vec<(String, String)>,
    ) -> Sandbox {
        Self::start_with(agents, settings, coordinator_env, None).await
    }

    /// A coordinator serving TLS with `tls`'s certificate; the client and
    /// agents trust `tls.ca_file`.
    pub async fn start_tls(
        agents: usize,
        settings: CoordinatorSettings,
        tls: &TlsFiles,
    ) -> Sandbox {
        let env = vec![
            (
                "DROVER_TLS_CERT_FILE".to_string(),
                path_text(&tls.cert_file),
            ),
            ("DROVER_TLS_KEY_FILE".to_string(), path_text(&tls.key_file)),
        ];
        Self::start_with(agents, settings, env, Some(tls.ca_file.clone())).await
    }

    async fn start_with(
        agents: usize,
        settings: CoordinatorSettings,
        coordinator_env: Vec<(String, String)>,
        ca_file: Option<PathBuf>,
    ) -> Sandbox {
        let dir = tempfile::tempdir().expect("tempdir");
        let coordinator = CoordinatorProcess::start_env(
            &dir.path().join("coordinator"),
            &settings,
            None,
            &coordinator_env,
        )
        .await
        .expect("coordinator");
        let scheme = scheme(&ca_file);
        let client = Client::with_ca_file(
            &format!("{scheme}://{}", coordinator.http_addr),
            Some(ADMIN_TOKEN.into()),
            ca_file.as_deref(),
        )
        .expect("client");
        let mut sandbox = Sandbox {
            dir,
            settings,
            coordinator,
            agents: Vec::new(),
            client,
            coordinator_env,
            agent_prefix: "agent".to_string(),
            ca_file,
        };
        for _ in 0..agents {
            sandbox.add_agent(&[]).await;
        }
        sandbox
    }

    /// Starts one more agent with extra `KEY=VALUE` environment, and waits
    /// until it has registered.
    pub async fn add_agent(&mut self, extra_env: &[(&str, &str)]) -> usize {
        let env: Vec<(String, String)> = extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.add_agent_env(&env).await
    }

    /// [`add_agent`](Self::add_agent) with owned environment. Agents are
    /// `local` unless `DROVER_PLATFORM` says otherwise.
    pub async fn add_agent_env(&mut self, extra_env: &[(String, String)]) -> usize {
        let index = self.agents.len();
        let agent = self.spawn_agent(&format!("{}-{index}", self.agent_prefix), extra_env);
        let agent_id = agent.agent_id.clone();
        self.agents.push(agent);
        self.wait_agent_live(&agent_id).await;
        index
    }

    /// Starts agent `index` again (after [`AgentProcess::kill`]) with its id
    /// and data dir, so it finds its saved session; waits until it is live.
    pub async fn restart_agent(&mut self, index: usize, extra_env: &[(String, String)]) {
        let agent_id = self.agents[index].agent_id.clone();
        self.agents[index] = self.spawn_agent(&agent_id, extra_env);
        self.wait_agent_live(&agent_id).await;
    }

    fn spawn_agent(&self, agent_id: &str, extra_env: &[(String, String)]) -> AgentProcess {
        let child = self
            .agent_command(agent_id, extra_env)
            .spawn()
            .expect("starting drover-agent");
        AgentProcess {
            child,
            agent_id: agent_id.to_string(),
        }
    }

    /// The `drover-agent` command of [`add_agent_env`](Self::add_agent_env)
    /// (this coordinator, a local platform unless `extra_env` says otherwise,
    /// stderr inherited), for a test that runs the process itself.
    pub fn agent_command(&self, agent_id: &str, extra_env: &[(String, String)]) -> Command {
        let data_dir = self.dir.path().join(agent_id);
        let mut command = Command::new(binary("drover-agent"));
        if let Some(ca_file) = &self.ca_file {
            command.env("DROVER_TLS_CA_FILE", ca_file);
        }
        command
            .env(
                "DROVER_COORDINATOR",
                format!("{}://{}", scheme(&self.ca_file), self.coordinator.grpc_addr),
            )
            .env("DROVER_JOIN_TOKEN", JOIN_TOKEN)
            .env("DROVER_AGENT_ID", agent_id)
            .env("DROVER_DATA_DIR", &data_dir)
            .env("DROVER_HEALTH_ADDR", "127.0.0.1:0")
            .env("DROVER_MAX_JOBS", "4")
            .env("DROVER_CPU_MILLIS", "4000")
            .env("DROVER_MEMORY_MIB", "4096")
            .env("DROVER_KILL_GRACE_MS", "2000")
            .env("DROVER_CLAIM_WAIT_MS", "5000")
            // Scenarios run shell commands on the host, not container images.
            .env("DROVER_RUNTIME", "process")
            // Never probe a link-local IMDS from a test host.
            .env("DROVER_PLATFORM", "local")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            command.env(k, v);
        }
        command
    }

    /// The agent's `/health` URL, from the address it advertised.
    pub async fn health_url(&self, agent_id: &str) -> String {
        let agent = self.wait_agent_live(agent_id).await;
        format!("http://{}/health", agent.health_addr)
    }

    /// Waits until the agent has a live session.
    pub async fn wait_agent_live(&self, agent_id: &str) -> Agent {
        let client = &self.client;
        wait_until(
            &format!("agent {agent_id} to register"),
            Duration::from_secs(20),
            || async move {
                client
                    .list_agents()
                    .await
                    .ok()?
                    .agents
                    .into_iter()
                    .find(|a| {
                        a.agent_id == agent_id && a.state != drover_proto::model::AgentState::Gone
                    })
            },
        )
        .await
    }

    /// Restarts the coordinator on the same data dir and ports.
    pub async fn restart_coordinator(&mut self) {
        self.coordinator.kill().await;
        let (grpc, http) = (
            self.coordinator.grpc_addr.clone(),
            self.coordinator.http_addr.clone(),
        );
        self.coordinator = CoordinatorProcess::start_env(
            &self.dir.path().join("coordinator"),
            &self.settings,
            Some((&grpc, &http)),
            &self.coordinator_env,
        )
        .await
        .expect("coordinator restart");
    }

    pub async fn job(&self, id: &str) -> Job {
        self.client.get_job(id).await.expect("get job")
    }

    /// Waits until `check` holds for the job, and returns it.
    pub async fn wait_job(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Job) -> bool,
    ) -> Job {
        let client = &self.client;
        let check = &check;
        wait_until(&format!("job {id}: {what}"), timeout, || async move {
            client.get_job(id).await.ok().filter(|j| check(j))
        })
        .await
    }
}
