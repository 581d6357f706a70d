//! Where the agent runs (DESIGN §6): EC2 (IMDSv2 and the instance's own Auto
//! Scaling group), ECS Fargate (the task metadata endpoint) or a plain host.
//!
//! A [`Platform`] gives the agent its identity labels, tells it about
//! interruptions (spot notices, rebalance recommendations, the ASG's
//! terminating lifecycle hook), protects the instance from scale-in while
//! jobs run, and ends the instance or task once the agent has left for being
//! idle. The agent loop decides *when*; the platform knows *how*.

pub(crate) mod asg;
mod ec2;
mod fargate;
pub(crate) mod imds;
mod local;
pub mod protection;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::config::AgentConfig;
use crate::metrics::AwsCalls;

pub(crate) use asg::sdk_config;
pub use asg::{classify, AwsErrorKind};

/// `platform` in agent.toml, `DROVER_PLATFORM`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PlatformChoice {
    /// ECS task metadata → fargate; an EC2 host whose IMDS answers → ec2;
    /// else local.
    #[default]
    Auto,
    Ec2,
    Fargate,
    Local,
}

/// The detected platform: the `platform` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformKind {
    Ec2,
    Fargate,
    Local,
}

impl PlatformKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformKind::Ec2 => "ec2",
            PlatformKind::Fargate => "fargate",
            PlatformKind::Local => "local",
        }
    }
}

/// Something the platform announced, as seen by one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// EC2 rebalance recommendation: the spot instance is at elevated risk.
    Rebalance,
    /// Spot interruption notice: the instance is reclaimed at `deadline`.
    SpotInterruption { deadline: SystemTime },
    /// The ASG's target lifecycle state is `Terminated`: the instance waits
    /// in `Terminating:Wait` for the agent to complete the lifecycle action.
    LifecycleTerminating,
}

/// What the agent does after it left for being idle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdleExit {
    /// The instance or task is ending: the process exits.
    Exit,
    /// The platform refused or failed to end the host: register again and
    /// keep serving (the reason is logged).
    KeepServing(String),
}

/// A platform failure, naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("instance metadata (IMDS) at {endpoint}: {message} (DROVER_IMDS_ENDPOINT)")]
    Imds { endpoint: String, message: String },
    /// `platform = ec2` was asked for but IMDS did not answer.
    #[error(
        "platform = \"ec2\" (agent.toml `platform`, --platform, DROVER_PLATFORM) but the instance \
         metadata service (IMDSv2) at {endpoint} did not answer: {message}. Fix: on a host that is \
         not an EC2 instance set platform = \"local\" (or \"auto\"); on EC2 enable IMDSv2 \
         (HttpEndpoint=enabled, HttpTokens=required) and, for an agent in a container, a hop \
         limit of 2 (HttpPutResponseHopLimit); or point imds_endpoint (DROVER_IMDS_ENDPOINT) at \
         the right address"
    )]
    Ec2WithoutImds { endpoint: String, message: String },
    #[error("ECS task metadata at {url}: {message} (ECS_CONTAINER_METADATA_URI_V4)")]
    TaskMetadata { url: String, message: String },
    #[error("{op} failed ({kind:?}): {message}")]
    Aws {
        op: &'static str,
        kind: AwsErrorKind,
        message: String,
    },
}

impl PlatformError {
    /// The AWS error kind, for AWS call failures.
    pub fn aws_kind(&self) -> Option<AwsErrorKind> {
        match self {
            PlatformError::Aws { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// The agent's view of where it runs. Implementations are cheap to call and
/// safe to call concurrently; AWS calls are retried (throttling, 5xx,
/// network) with a bounded backoff inside each method and counted in
/// `drover_agent_aws_calls_total`.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    fn kind(&self) -> PlatformKind;

    /// Identity labels detected at start: `platform`, `arch` and the
    /// platform's own (see the README's label contract).
    fn labels(&self) -> BTreeMap<String, String>;

    /// CPU millis and memory MiB the platform grants the agent (Fargate task
    /// limits), used when the configuration does not say.
    fn capacity_limits(&self) -> Option<(u32, u64)> {
        None
    }

    /// Whether [`terminate_idle`](Self::terminate_idle) can end the host: an
    /// EC2 instance in an ASG, a Fargate task.
    fn can_terminate_self(&self) -> bool {
        false
    }

    /// Whether [`set_scale_in_protection`](Self::set_scale_in_protection)
    /// means anything here (an EC2 instance in an ASG).
    fn has_scale_in_protection(&self) -> bool {
        false
    }

    /// Notices in force right now. Level-triggered: the same notice comes
    /// back on every poll while it holds; the caller acts on the first.
    async fn poll(&self) -> Result<Vec<Notice>, PlatformError> {
        Ok(Vec::new())
    }

    /// Protects (or unprotects) this instance from the ASG's scale-in.
    async fn set_scale_in_protection(&self, _protected: bool) -> Result<(), PlatformError> {
        Ok(())
    }

    /// Ends the host after the agent drained and left for being idle. Never
    /// leaves an instance that neither works nor terminates: any failure is
    /// [`IdleExit::KeepServing`].
    async fn terminate_idle(&self) -> IdleExit {
        IdleExit::Exit
    }

    /// Extends the terminating lifecycle action while jobs finish.
    async fn lifecycle_heartbeat(&self) -> Result<(), PlatformError> {
        Ok(())
    }

    /// Completes the terminating lifecycle action with CONTINUE.
    async fn complete_lifecycle(&self) -> Result<(), PlatformError> {
        Ok(())
    }
}

/// The labels every platform reports.
fn base_labels(kind: PlatformKind) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("platform".to_string(), kind.as_str().to_string()),
        ("arch".to_string(), std::env::consts::ARCH.to_string()),
    ])
}

/// The ECS agent sets this in every task's containers.
const ECS_METADATA_ENV: &str = "ECS_CONTAINER_METADATA_URI_V4";
const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Detects (or, when configured, insists on) the platform. `auto` never
/// fails: anything that does not answer means local.
pub async fn detect(
    config: &AgentConfig,
    calls: Arc<AwsCalls>,
) -> Result<Arc<dyn Platform>, PlatformError> {
    let ecs = std::env::var(ECS_METADATA_ENV)
        .ok()
        .filter(|v| !v.is_empty());
    match config.platform {
        PlatformChoice::Local => Ok(Arc::new(local::LocalPlatform)),
        PlatformChoice::Fargate => {
            let Some(url) = ecs else {
                return Err(PlatformError::TaskMetadata {
                    url: "(unset)".into(),
                    message: "platform = fargate but the variable is not set; is this an ECS task? (DROVER_PLATFORM)".into(),
                });
            };
            Ok(Arc::new(fargate::FargatePlatform::detect(&url).await?))
        }
        // Never silently local: an agent told it is on EC2 that cannot read
        // IMDS stops at once, saying so (the IMDS client's short timeouts
        // bound how long that takes).
        PlatformChoice::Ec2 => match ec2::Ec2Platform::detect(config, calls).await {
            Ok(p) => Ok(Arc::new(p)),
            Err(PlatformError::Imds { endpoint, message }) => {
                Err(PlatformError::Ec2WithoutImds { endpoint, message })
            }
            Err(e) => Err(e),
        },
        PlatformChoice::Auto => {
            if let Some(url) = ecs {
                match fargate::FargatePlatform::detect(&url).await {
                    Ok(p) => return Ok(Arc::new(p)),
                    Err(e) => tracing::warn!("not running as fargate: {e}"),
                }
            } else if config.imds_endpoint.trim_end_matches('/') != DEFAULT_IMDS_ENDPOINT
                || looks_like_ec2()
            {
                match ec2::Ec2Platform::detect(config, calls).await {
                    Ok(p) => return Ok(Arc::new(p)),
                    Err(e) => tracing::info!("not running as ec2: {e}"),
                }
            }
            Ok(Arc::new(local::LocalPlatform))
        }
    }
}

/// Whether the host says it is an EC2 instance (Nitro and Xen), so that a
/// laptop never sends a packet to the link-local IMDS address.
fn looks_like_ec2() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    read("/sys/class/dmi/id/sys_vendor").contains("Amazon EC2")
        || read("/sys/class/dmi/id/board_asset_tag").starts_with("i-")
        || read("/sys/hypervisor/uuid")
            .to_ascii_lowercase()
            .starts_with("ec2")
        || read("/sys/class/dmi/id/product_uuid")
            .to_ascii_lowercase()
            .starts_with("ec2")
}

/// How long from `now` until running jobs must be stopped, for a hard
/// `deadline` (a spot reclaim time) and a `margin` kept for stopping them,
/// completing them and leaving. Zero when that moment has passed.
pub fn until_interrupt(deadline: SystemTime, now: SystemTime, margin: Duration) -> Duration {
    deadline
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .saturating_sub(margin)
}

/// An HTTPS client on rustls with ring (no aws-lc build); also serves
/// plain-HTTP endpoints (IMDS, an emulator).
pub fn http_client() -> aws_sdk_autoscaling::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_comes_a_margin_before_the_deadline() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let margin = Duration::from_secs(15);
        assert_eq!(
            until_interrupt(now + Duration::from_secs(120), now, margin),
            Duration::from_secs(105)
        );
        // A notice read late, or a margin longer than the notice: at once.
        assert_eq!(
            until_interrupt(now + Duration::from_secs(10), now, margin),
            Duration::ZERO
        );
        assert_eq!(
            until_interrupt(now - Duration::from_secs(10), now, margin),
            Duration::ZERO
        );
    }

    #[test]
    fn base_labels_name_the_platform_and_arch() {
        let labels = base_labels(PlatformKind::Fargate);
        assert_eq!(labels["platform"], "fargate");
        assert_eq!(labels["arch"], std::env::consts::ARCH);
    }
}
