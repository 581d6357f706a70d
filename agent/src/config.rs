//! Agent configuration (DESIGN §10): a TOML file, then `DROVER_*` env and flags
//! on top (applied by `main.rs`). Every field has a default that works for
//! `drover dev` except `join_token`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use crate::platform::PlatformChoice;
pub use crate::runtime::RuntimeChoice;

/// Agent configuration: TOML file + DROVER_* env + flags; every field has a default
/// that works for `drover dev` except `join_token`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// gRPC URL of the coordinator: `http://` or `https://`.
    pub coordinator: String,
    /// PEM CA certificate(s) trusted besides the public web PKI roots, for a
    /// coordinator (and signed artifact URLs) with a privately issued
    /// certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// The pool's join token; required.
    pub join_token: String,
    pub pool: String,
    /// Stable across restarts on one host; defaults to the hostname.
    pub agent_id: String,
    /// Per-attempt work dirs, the session file and the fence deadline file.
    pub data_dir: PathBuf,
    /// Health HTTP address; port 0 picks a free port.
    pub health_addr: SocketAddr,
    /// Job slots; defaults to the number of CPUs.
    pub max_jobs: u32,
    /// Capacity override; default sysinfo CPUs × 1000 minus the reserve.
    pub cpu_millis: Option<u32>,
    /// Capacity override; default total memory minus the reserve.
    pub memory_mib: Option<u64>,
    pub reserve_cpu_millis: u32,
    pub reserve_memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    /// SIGTERM → SIGKILL when the job does not say otherwise.
    pub kill_grace_ms: u64,
    /// How long running jobs may keep running in a drain.
    pub drain_timeout_ms: u64,
    pub exit_when_idle: bool,
    pub idle_timeout_ms: u64,
    /// Bearer token for `POST /drain` from non-loopback peers.
    pub health_token: Option<String>,
    /// Long-poll length of `Claim`.
    pub claim_wait_ms: u64,
    /// `auto` (docker when the Engine answers, else process), `docker` or
    /// `process`.
    pub runtime: RuntimeChoice,
    /// Where the agent runs: `auto` (ECS metadata → fargate; an EC2 host whose
    /// IMDS answers → ec2; else local), `ec2`, `fargate` or `local`.
    pub platform: PlatformChoice,
    /// IMDS base URL (EC2).
    pub imds_endpoint: String,
    /// AWS API endpoint override (an emulator in tests); unset = AWS.
    pub aws_endpoint: Option<String>,
    /// On ec2 (in an ASG) and fargate: end the instance or task after
    /// `idle_timeout_ms` with nothing running. Off: idle agents keep running.
    pub idle_terminate: bool,
    /// EC2 in an ASG: protect the instance from scale-in while busy.
    pub scale_in_protection: bool,
    /// How long the agent stays idle before it drops scale-in protection.
    pub protection_debounce_ms: u64,
    /// How often IMDS is polled for spot notices, rebalance recommendations
    /// and the ASG target lifecycle state.
    pub platform_poll_ms: u64,
    /// How long before a hard deadline (spot reclaim, Fargate stop timeout)
    /// running jobs are stopped and completed as interrupted.
    pub interrupt_margin_ms: u64,
    /// Fargate: the task's stop timeout (SIGTERM → SIGKILL by ECS).
    pub stop_timeout_ms: u64,
    /// EC2: the ASG's terminating lifecycle hook the agent completes.
    pub lifecycle_hook: Option<String>,
    /// EC2: RecordLifecycleActionHeartbeat period while a lifecycle drain runs.
    pub lifecycle_heartbeat_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            coordinator: "http://127.0.0.1:7070".to_string(),
            tls_ca_file: None,
            join_token: String::new(),
            pool: drover_proto::model::DEFAULT_POOL.to_string(),
            agent_id: default_agent_id(),
            data_dir: PathBuf::from("./.drover/agent"),
            health_addr: SocketAddr::from(([127, 0, 0, 1], 7090)),
            max_jobs: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            cpu_millis: None,
            memory_mib: None,
            reserve_cpu_millis: 0,
            reserve_memory_mib: 256,
            labels: BTreeMap::new(),
            kill_grace_ms: 10_000,
            drain_timeout_ms: 3_600_000,
            exit_when_idle: false,
            idle_timeout_ms: 300_000,
            health_token: None,
            claim_wait_ms: 20_000,
            runtime: RuntimeChoice::Auto,
            platform: PlatformChoice::Auto,
            imds_endpoint: "http://169.254.169.254".to_string(),
            aws_endpoint: None,
            idle_terminate: true,
            scale_in_protection: true,
            protection_debounce_ms: 30_000,
            platform_poll_ms: 5_000,
            interrupt_margin_ms: 15_000,
            stop_timeout_ms: 30_000,
            lifecycle_hook: None,
            lifecycle_heartbeat_ms: 60_000,
        }
    }
}

/// The host name, or "drover-agent" when the OS does not tell.
pub fn hostname() -> String {
    sysinfo::System::host_name()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "drover-agent".to_string())
}

fn default_agent_id() -> String {
    hostname()
}

/// A configuration value that cannot work; the message names the field, the
/// env variable and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("join_token is empty: set DROVER_JOIN_TOKEN (or join_token in agent.toml) to the pool's join token")]
    MissingJoinToken,
    #[error("coordinator {url:?} is not an http:// or https:// URL (DROVER_COORDINATOR), e.g. http://127.0.0.1:7070")]
    BadCoordinatorUrl { url: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

impl AgentConfig {
    /// Parses a TOML file; missing fields keep their defaults, unknown fields
    /// are an error so a typo is not silently ignored.
    pub fn from_toml_file(path: &std::path::Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Checks everything that can be checked before contacting anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.join_token.trim().is_empty() {
            return Err(ConfigError::MissingJoinToken);
        }
        let url = self.coordinator.trim();
        let ok_scheme = url.starts_with("http://") || url.starts_with("https://");
        if !ok_scheme || url.parse::<tonic::transport::Uri>().is_err() {
            return Err(ConfigError::BadCoordinatorUrl {
                url: self.coordinator.clone(),
            });
        }
        drover_proto::model::validate_name("pool", &self.pool).map_err(|e| {
            ConfigError::Invalid {
                field: "pool",
                message: format!("{e} (DROVER_POOL)"),
            }
        })?;
        if self.agent_id.trim().is_empty() {
            return invalid("agent_id", "must not be empty (DROVER_AGENT_ID)");
        }
        if self.max_jobs == 0 {
            return invalid("max_jobs", "must be at least 1 (DROVER_MAX_JOBS)");
        }
        if self.claim_wait_ms == 0 || self.claim_wait_ms > 300_000 {
            return invalid(
                "claim_wait_ms",
                "must be between 1 and 300000 (DROVER_CLAIM_WAIT_MS)",
            );
        }
        if self.exit_when_idle && self.idle_timeout_ms == 0 {
            return invalid(
                "idle_timeout_ms",
                "must be above 0 with exit_when_idle (DROVER_IDLE_TIMEOUT_MS)",
            );
        }
        for key in self.labels.keys() {
            drover_proto::model::validate_name("labels", key).map_err(|e| {
                ConfigError::Invalid {
                    field: "labels",
                    message: e.to_string(),
                }
            })?;
        }
        let url_ok = |u: &str| {
            (u.starts_with("http://") || u.starts_with("https://"))
                && u.parse::<tonic::transport::Uri>().is_ok()
        };
        if !url_ok(self.imds_endpoint.trim()) {
            return invalid(
                "imds_endpoint",
                "must be an http:// URL, e.g. http://169.254.169.254 (DROVER_IMDS_ENDPOINT)",
            );
        }
        if matches!(&self.aws_endpoint, Some(u) if !url_ok(u.trim())) {
            return invalid(
                "aws_endpoint",
                "must be an http:// or https:// URL, or unset for AWS itself (DROVER_AWS_ENDPOINT)",
            );
        }
        if self.platform_poll_ms < 100 {
            return invalid(
                "platform_poll_ms",
                "must be at least 100 (DROVER_PLATFORM_POLL_MS); AWS gives two minutes of spot notice, 5000 is plenty",
            );
        }
        if self.lifecycle_heartbeat_ms < 100 {
            return invalid(
                "lifecycle_heartbeat_ms",
                "must be at least 100 (DROVER_LIFECYCLE_HEARTBEAT_MS); keep it well under the hook's heartbeat timeout",
            );
        }
        if self.idle_terminate && self.idle_timeout_ms == 0 {
            return invalid(
                "idle_timeout_ms",
                "must be above 0 with idle_terminate (DROVER_IDLE_TIMEOUT_MS); set idle_terminate = false to keep idle agents",
            );
        }
        if matches!(&self.lifecycle_hook, Some(h) if h.trim().is_empty()) {
            return invalid(
                "lifecycle_hook",
                "must not be empty when set (DROVER_LIFECYCLE_HOOK); leave it unset when the ASG has no terminating hook",
            );
        }
        if matches!(&self.health_token, Some(t) if t.trim().is_empty()) {
            return invalid(
                "health_token",
                "must not be empty when set (DROVER_HEALTH_TOKEN); leave it unset to allow loopback only",
            );
        }
        Ok(())
    }
}

fn invalid(field: &'static str, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        field,
        message: message.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            join_token: "secret".into(),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_once_a_join_token_is_set() {
        valid().validate().unwrap();
        assert!(matches!(
            AgentConfig::default().validate(),
            Err(ConfigError::MissingJoinToken)
        ));
    }

    #[test]
    fn bad_values_are_rejected_with_their_env_name() {
        let err = AgentConfig {
            coordinator: "127.0.0.1:7070".into(),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("DROVER_COORDINATOR"), "{err}");
        let err = AgentConfig {
            max_jobs: 0,
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("DROVER_MAX_JOBS"), "{err}");
        let err = AgentConfig {
            pool: "no spaces".into(),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("pool"), "{err}");
    }

    #[test]
    fn toml_keeps_defaults_and_rejects_unknown_fields() {
        let cfg: AgentConfig = toml::from_str("join_token = \"t\"\nmax_jobs = 3\n").unwrap();
        assert_eq!(cfg.max_jobs, 3);
        assert_eq!(cfg.kill_grace_ms, 10_000);
        assert!(toml::from_str::<AgentConfig>("max_job = 3").is_err());
        assert_eq!(cfg.runtime, RuntimeChoice::Auto);
        let cfg: AgentConfig = toml::from_str("runtime = \"process\"").unwrap();
        assert_eq!(cfg.runtime, RuntimeChoice::Process);
        assert!(toml::from_str::<AgentConfig>("runtime = \"podman\"").is_err());
        let cfg: AgentConfig =
            toml::from_str("platform = \"ec2\"\nlifecycle_hook = \"drain\"").unwrap();
        assert_eq!(cfg.platform, PlatformChoice::Ec2);
        assert_eq!(cfg.lifecycle_hook.as_deref(), Some("drain"));
        assert!(toml::from_str::<AgentConfig>("platform = \"gce\"").is_err());
    }

    #[test]
    fn platform_settings_are_checked_with_their_env_name() {
        let err = AgentConfig {
            imds_endpoint: "169.254.169.254".into(),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("DROVER_IMDS_ENDPOINT"), "{err}");
        let err = AgentConfig {
            aws_endpoint: Some("moto:5000".into()),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("DROVER_AWS_ENDPOINT"), "{err}");
        let err = AgentConfig {
            lifecycle_hook: Some(" ".into()),
            ..valid()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("DROVER_LIFECYCLE_HOOK"), "{err}");
    }
}
