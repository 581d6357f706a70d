//! `drover-agent bootstrap`: turns a freshly booted EC2 instance into a
//! configured agent, run from user-data (`ami/user-data.sh`) before the
//! service starts. It reads the instance's identity and its group's tags from
//! IMDSv2, fetches the pool's join token from SSM Parameter Store or Secrets
//! Manager, and writes `agent.toml` (mode 0600, replaced atomically). A boot
//! that cannot finish marks the instance `Unhealthy` in its Auto Scaling
//! group, so the group replaces it instead of keeping an instance that never
//! works. The join token is never printed or logged.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{AgentConfig, ConfigError};
use crate::metrics::AwsCalls;
use crate::platform::asg::{call, from_sdk, sdk_config};
use crate::platform::imds::Imds;
use crate::platform::PlatformError;

/// The instance tags bootstrap reads; `infra/fleet.yaml` puts them on both
/// agent groups (propagated at launch) and `tests/tests/infra.rs` checks
/// that they agree.
pub mod tags {
    /// The coordinator's gRPC URL, e.g. `http://drover-nlb:7070`.
    pub const COORDINATOR: &str = "drover:coordinator";
    pub const POOL: &str = "drover:pool";
    /// An SSM parameter holding the pool's join token (a SecureString, or a
    /// Secrets Manager reference `/aws/reference/secretsmanager/<secret>`).
    pub const JOIN_TOKEN_PARAMETER: &str = "drover:join-token-parameter";
    /// A Secrets Manager secret (name or ARN) whose string is the join token.
    pub const JOIN_TOKEN_SECRET: &str = "drover:join-token-secret";
    /// The group's terminating lifecycle hook (optional).
    pub const LIFECYCLE_HOOK: &str = "drover:lifecycle-hook";

    /// Every tag a group must carry (one of the two token tags will do;
    /// `infra/fleet.yaml` uses the parameter).
    pub const REQUIRED: &[&str] = &[COORDINATOR, POOL, JOIN_TOKEN_PARAMETER, LIFECYCLE_HOOK];
}

pub const DEFAULT_OUTPUT: &str = "/etc/drover/agent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/drover";
const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Where the pool's join token is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `ssm:GetParameter` with decryption.
    Parameter(String),
    /// `secretsmanager:GetSecretValue`, its `SecretString`.
    Secret(String),
}

impl TokenSource {
    fn tag(&self) -> &'static str {
        match self {
            TokenSource::Parameter(_) => tags::JOIN_TOKEN_PARAMETER,
            TokenSource::Secret(_) => tags::JOIN_TOKEN_SECRET,
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            TokenSource::Parameter(_) => "--join-token-parameter",
            TokenSource::Secret(_) => "--join-token-secret",
        }
    }

    fn action(&self) -> &'static str {
        match self {
            TokenSource::Parameter(_) => "ssm:GetParameter (and secretsmanager:GetSecretValue on the secret of a /aws/reference/secretsmanager/ name)",
            TokenSource::Secret(_) => "secretsmanager:GetSecretValue",
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Parameter(name) => write!(f, "SSM parameter {name}"),
            TokenSource::Secret(id) => write!(f, "Secrets Manager secret {id}"),
        }
    }
}

/// Values from flags or `DROVER_*` env; each one set wins over its tag.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub coordinator: Option<String>,
    pub pool: Option<String>,
    pub token: Option<TokenSource>,
    pub lifecycle_hook: Option<String>,
}

/// Everything `bootstrap` needs to know before it asks anything.
#[derive(Debug, Clone)]
pub struct Options {
    pub imds_endpoint: String,
    /// AWS API endpoint override (an emulator); also written to agent.toml.
    pub aws_endpoint: Option<String>,
    pub output: PathBuf,
    pub data_dir: PathBuf,
    pub overrides: Overrides,
    /// On failure, `SetInstanceHealth(Unhealthy)` so the group replaces the
    /// instance.
    pub mark_unhealthy: bool,
    /// Do nothing but fail with this reason (a later user-data step failed).
    pub fail: Option<String>,
}

impl Options {
    pub fn new(imds_endpoint: &str) -> Options {
        Options {
            imds_endpoint: imds_endpoint.to_string(),
            aws_endpoint: None,
            output: PathBuf::from(DEFAULT_OUTPUT),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            overrides: Overrides::default(),
            mark_unhealthy: true,
            fail: None,
        }
    }
}

/// One boot's settings, from tags and overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub coordinator: String,
    pub pool: String,
    pub token: TokenSource,
    pub lifecycle_hook: Option<String>,
}

/// A setting neither the tags nor the flags gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub tag: &'static str,
    pub flag: &'static str,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (or {})", self.tag, self.flag)
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a boot failed; each message names the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read this instance's identity: {0}; run bootstrap on an EC2 instance with the metadata service on (MetadataOptions HttpEndpoint: enabled), or point --imds-endpoint at it")]
    Identity(PlatformError),
    #[error("cannot read the instance's tags: {0}")]
    Tags(PlatformError),
    #[error("instance metadata tags are off, so {} cannot be read: set MetadataOptions InstanceMetadataTags: enabled in the launch template (infra/fleet.yaml does), or pass the flags", list(.0))]
    TagsDisabled(Vec<Missing>),
    #[error("instance tags missing: {}; tag the Auto Scaling group with them (PropagateAtLaunch: true, as infra/fleet.yaml does), or pass the flags", list(.0))]
    MissingTags(Vec<Missing>),
    #[error(
        "both {} and {} are set: keep one",
        tags::JOIN_TOKEN_PARAMETER,
        tags::JOIN_TOKEN_SECRET
    )]
    TwoTokenSources,
    #[error("{what} {value:?} (from {from}) {problem}")]
    BadValue {
        what: &'static str,
        value: String,
        from: String,
        problem: String,
    },
    #[error("the join token's {location} does not exist in {region} ({message}): create it with the pool's join token (one of the coordinator's join_tokens), or fix instance tag {tag} / {flag}", tag = .location.tag(), flag = .location.flag())]
    TokenNotFound {
        location: TokenSource,
        region: String,
        message: String,
    },
    #[error("the instance role may not read the join token's {location} ({message}): allow {action} on it (see CpuAgentRole in infra/fleet.yaml)", action = .location.action())]
    TokenDenied {
        location: TokenSource,
        message: String,
    },
    #[error("cannot read the join token from {location} in {region}: {message}")]
    TokenUnreadable {
        location: TokenSource,
        region: String,
        message: String,
    },
    #[error("the join token in {location} is empty: store the pool's join token in it")]
    TokenEmpty { location: TokenSource },
    #[error("the configuration bootstrap would write is not valid: {0}")]
    Config(ConfigError),
    #[error(
        "cannot write {path}: {source}; bootstrap runs as root from user-data, or pass --output"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Reported(String),
}

/// What became of the instance after a failed boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// `SetInstanceHealth(Unhealthy)` succeeded: the group replaces it.
    MarkedUnhealthy { instance_id: String },
    /// It could not be marked (the reason).
    NotMarked(String),
    /// `--mark-unhealthy=false`.
    Left,
}

/// A boot that did not finish: the error and what was done about it.
#[derive(Debug)]
pub struct Failed {
    pub error: BootstrapError,
    pub health: Health,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        match &self.health {
            Health::MarkedUnhealthy { instance_id } => write!(
                f,
                "\ninstance {instance_id} is marked Unhealthy: its Auto Scaling group replaces it"
            ),
            Health::NotMarked(why) => {
                write!(f, "\nthe instance could not be marked Unhealthy: {why}")
            }
            Health::Left => write!(
                f,
                "\nthe instance is left as it is (--mark-unhealthy=false)"
            ),
        }
    }
}

/// A finished boot.
#[derive(Debug, Clone)]
pub struct Booted {
    pub instance_id: String,
    pub region: String,
    pub settings: Settings,
    pub path: PathBuf,
}

/// The join token; never shown.
struct JoinToken(String);

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(***)")
    }
}

/// `value`, or a note in `missing` that neither the tag nor the flag gave it.
fn need<T>(
    value: Option<T>,
    tag: &'static str,
    flag: &'static str,
    missing: &mut Vec<Missing>,
) -> Option<T> {
    if value.is_none() {
        missing.push(Missing { tag, flag });
    }
    value
}

impl Settings {
    /// Settings from the instance's tags (`None`: instance metadata tags are
    /// off) with `overrides` on top. Every missing setting is named at once.
    pub fn resolve(
        tags: Option<&BTreeMap<String, String>>,
        overrides: &Overrides,
    ) -> Result<Settings, BootstrapError> {
        let tag = |name: &str| {
            tags.and_then(|t| t.get(name))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let given = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let mut missing = Vec::new();
        let coordinator = need(
            given(&overrides.coordinator).or_else(|| tag(tags::COORDINATOR)),
            tags::COORDINATOR,
            "--coordinator",
            &mut missing,
        );
        let pool = need(
            given(&overrides.pool).or_else(|| tag(tags::POOL)),
            tags::POOL,
            "--pool",
            &mut missing,
        );
        let token = match &overrides.token {
            Some(TokenSource::Parameter(p)) if !p.trim().is_empty() => {
                Some(TokenSource::Parameter(p.trim().to_string()))
            }
            Some(TokenSource::Secret(s)) if !s.trim().is_empty() => {
                Some(TokenSource::Secret(s.trim().to_string()))
            }
            _ => match (
                tag(tags::JOIN_TOKEN_PARAMETER),
                tag(tags::JOIN_TOKEN_SECRET),
            ) {
                (Some(_), Some(_)) => return Err(BootstrapError::TwoTokenSources),
                (Some(p), None) => Some(TokenSource::Parameter(p)),
                (None, Some(s)) => Some(TokenSource::Secret(s)),
                (None, None) => None,
            },
        };
        let token = need(
            token,
            tags::JOIN_TOKEN_PARAMETER,
            "--join-token-parameter or --join-token-secret",
            &mut missing,
        );
        let lifecycle_hook = given(&overrides.lifecycle_hook).or_else(|| tag(tags::LIFECYCLE_HOOK));

        let (Some(coordinator), Some(pool), Some(token)) = (coordinator, pool, token) else {
            return Err(if tags.is_none() {
                BootstrapError::TagsDisabled(missing)
            } else {
                BootstrapError::MissingTags(missing)
            });
        };
        let from = |flag: &Option<String>, tag_name: &str, flag_name: &str| {
            if given(flag).is_some() {
                flag_name.to_string()
            } else {
                format!("instance tag {tag_name}")
            }
        };
        if !(coordinator.starts_with("http://") || coordinator.starts_with("https://"))
            || coordinator.parse::<tonic::transport::Uri>().is_err()
        {
            return Err(BootstrapError::BadValue {
                what: "coordinator",
                value: coordinator,
                from: from(&overrides.coordinator, tags::COORDINATOR, "--coordinator"),
                problem: "is not an http:// or https:// URL, e.g. http://drover.internal:7070"
                    .into(),
            });
        }
        if let Err(e) = drover_proto::model::validate_name("pool", &pool) {
            return Err(BootstrapError::BadValue {
                what: "pool",
                value: pool,
                from: from(&overrides.pool, tags::POOL, "--pool"),
                problem: format!("is not a pool name: {e}"),
            });
        }
        Ok(Settings {
            coordinator,
            pool,
            token,
            lifecycle_hook,
        })
    }
}

/// What bootstrap writes: the agent's TOML, with the token.
#[derive(Serialize)]
struct Written<'a> {
    coordinator: &'a str,
    join_token: &'a str,
    pool: &'a str,
    agent_id: &'a str,
    data_dir: &'a Path,
    platform: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifecycle_hook: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    imds_endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aws_endpoint: Option<&'a str>,
}

/// The agent's configuration text for this instance, checked by the same
/// parser and validation the agent runs at start.
fn render(
    options: &Options,
    settings: &Settings,
    instance_id: &str,
    token: &JoinToken,
) -> Result<String, BootstrapError> {
    let imds = options.imds_endpoint.trim_end_matches('/');
    let written = Written {
        coordinator: &settings.coordinator,
        join_token: &token.0,
        pool: &settings.pool,
        agent_id: instance_id,
        data_dir: &options.data_dir,
        platform: "ec2",
        lifecycle_hook: settings.lifecycle_hook.as_deref(),
        imds_endpoint: (imds != DEFAULT_IMDS_ENDPOINT).then_some(imds),
        aws_endpoint: options.aws_endpoint.as_deref(),
    };
    let body = toml::to_string(&written)
        .map_err(|e| BootstrapError::Reported(format!("cannot render agent.toml: {e} (a bug)")))?;
    let text = format!(
        "# Written by `drover-agent bootstrap` for instance {instance_id} from its tags;\n\
         # rewritten at every boot.\n{body}"
    );
    let parsed: AgentConfig = toml::from_str(&text).map_err(|e| {
        BootstrapError::Reported(format!("agent.toml does not parse back: {e} (a bug)"))
    })?;
    parsed.validate().map_err(BootstrapError::Config)?;
    Ok(text)
}

/// Writes `contents` to `path` with mode 0600 through a temporary file in
/// the same directory: readers see the old file or the new one, never half.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("agent.toml");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The instance's tags from IMDS; `None` when instance metadata tags are off
/// (the listing answers 404).
async fn read_tags(imds: &Imds) -> Result<Option<BTreeMap<String, String>>, PlatformError> {
    let Some(listing) = imds.meta("tags/instance").await? else {
        return Ok(None);
    };
    let mut found = BTreeMap::new();
    for key in listing
        .lines()
        .map(str::trim)
        .filter(|k| k.starts_with("drover:"))
    {
        if let Some(value) = imds.meta(&format!("tags/instance/{key}")).await? {
            found.insert(key.to_string(), value);
        }
    }
    Ok(Some(found))
}

/// The AWS error code `from_sdk` puts first in its message.
fn aws_code(e: &PlatformError) -> &str {
    match e {
        PlatformError::Aws { message, .. } => message.split(':').next().unwrap_or(""),
        _ => "",
    }
}

async fn fetch_token(
    config: &aws_config::SdkConfig,
    calls: &AwsCalls,
    source: &TokenSource,
    region: &str,
) -> Result<JoinToken, BootstrapError> {
    let fetched = match source {
        TokenSource::Parameter(name) => {
            const OP: &str = "GetParameter";
            let client = aws_sdk_ssm::Client::new(config);
            call(calls, OP, || async {
                client
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| from_sdk(OP, e))
            })
            .await
            .map(|out| out.parameter().and_then(|p| p.value()).map(str::to_string))
        }
        TokenSource::Secret(id) => {
            const OP: &str = "GetSecretValue";
            let client = aws_sdk_secretsmanager::Client::new(config);
            call(calls, OP, || async {
                client
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| from_sdk(OP, e))
            })
            .await
            .map(|out| out.secret_string().map(str::to_string))
        }
    };
    let message = |e: &PlatformError| match e {
        PlatformError::Aws { message, .. } => message.clone(),
        other => other.to_string(),
    };
    match fetched {
        Ok(Some(token)) if !token.trim().is_empty() => Ok(JoinToken(token.trim().to_string())),
        Ok(_) => Err(BootstrapError::TokenEmpty {
            location: source.clone(),
        }),
        Err(e) => Err(match aws_code(&e) {
            "ParameterNotFound" | "ResourceNotFoundException" => BootstrapError::TokenNotFound {
                location: source.clone(),
                region: region.to_string(),
                message: message(&e),
            },
            "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation" => {
                BootstrapError::TokenDenied {
                    location: source.clone(),
                    message: message(&e),
                }
            }
            _ => BootstrapError::TokenUnreadable {
                location: source.clone(),
                region: region.to_string(),
                message: message(&e),
            },
        }),
    }
}

/// `SetInstanceHealth(Unhealthy)` without waiting for the grace period.
async fn mark_unhealthy(
    config: &aws_config::SdkConfig,
    calls: &AwsCalls,
    instance_id: &str,
) -> Result<(), PlatformError> {
    const OP: &str = "SetInstanceHealth";
    let client = aws_sdk_autoscaling::Client::new(config);
    call(calls, OP, || async {
        client
            .set_instance_health()
            .instance_id(instance_id)
            .health_status("Unhealthy")
            .should_respect_grace_period(false)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| from_sdk(OP, e))
    })
    .await
}

/// Runs one boot: identity, tags, token, agent.toml. On failure (or with
/// `fail` set) the instance is marked Unhealthy unless `mark_unhealthy` is off.
pub async fn run(options: &Options) -> Result<Booted, Failed> {
    let calls = AwsCalls::default();
    let identity = async {
        let imds = Imds::new(&options.imds_endpoint)?;
        let instance_id = imds.required("instance-id").await?;
        let region = match imds.meta("placement/region").await? {
            Some(region) => region,
            // us-east-1a → us-east-1
            None => imds
                .required("placement/availability-zone")
                .await?
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .to_string(),
        };
        Ok::<_, PlatformError>((imds, instance_id, region))
    };
    let (imds, instance_id, region) = match identity.await {
        Ok(found) => found,
        Err(e) => {
            return Err(Failed {
                error: BootstrapError::Identity(e),
                health: if options.mark_unhealthy {
                    Health::NotMarked("without an instance id there is nothing to mark".into())
                } else {
                    Health::Left
                },
            })
        }
    };
    tracing::info!(instance = %instance_id, %region, "bootstrapping");
    let aws = sdk_config(&region, options.aws_endpoint.as_deref()).await;

    let outcome = match &options.fail {
        Some(reason) => Err(BootstrapError::Reported(reason.clone())),
        None => boot(options, &imds, &aws, &calls, &instance_id, &region).await,
    };
    match outcome {
        Ok(settings) => Ok(Booted {
            instance_id,
            region,
            settings,
            path: options.output.clone(),
        }),
        Err(error) => {
            let health = if !options.mark_unhealthy {
                Health::Left
            } else {
                match mark_unhealthy(&aws, &calls, &instance_id).await {
                    Ok(()) => Health::MarkedUnhealthy { instance_id },
                    Err(e) => Health::NotMarked(format!(
                        "{e}; the instance role needs autoscaling:SetInstanceHealth on its group"
                    )),
                }
            };
            Err(Failed { error, health })
        }
    }
}

async fn boot(
    options: &Options,
    imds: &Imds,
    aws: &aws_config::SdkConfig,
    calls: &AwsCalls,
    instance_id: &str,
    region: &str,
) -> Result<Settings, BootstrapError> {
    let o = &options.overrides;
    let all_given = o.coordinator.is_some() && o.pool.is_some() && o.token.is_some();
    let tags = if all_given {
        Some(BTreeMap::new())
    } else {
        read_tags(imds).await.map_err(BootstrapError::Tags)?
    };
    let settings = Settings::resolve(tags.as_ref(), o)?;
    tracing::info!(
        coordinator = %settings.coordinator,
        pool = %settings.pool,
        token = %settings.token,
        "settings"
    );
    let token = fetch_token(aws, calls, &settings.token, region).await?;
    let text = render(options, &settings, instance_id, &token)?;
    write_private(&options.output, &text).map_err(|source| BootstrapError::Write {
        path: options.output.clone(),
        source,
    })?;
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_tags() -> BTreeMap<String, String> {
        [
            (tags::COORDINATOR, "http://nlb.internal:7070"),
            (tags::POOL, "cpu"),
            (
                tags::JOIN_TOKEN_PARAMETER,
                "/aws/reference/secretsmanager/drover/join-token/cpu",
            ),
            (tags::LIFECYCLE_HOOK, "drover-drain"),
            ("aws:autoscaling:groupName", "drover-cpu"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn the_fleets_tags_give_every_setting() {
        let settings = Settings::resolve(Some(&fleet_tags()), &Overrides::default()).unwrap();
        assert_eq!(
            settings,
            Settings {
                coordinator: "http://nlb.internal:7070".into(),
                pool: "cpu".into(),
                token: TokenSource::Parameter(
                    "/aws/reference/secretsmanager/drover/join-token/cpu".into()
                ),
                lifecycle_hook: Some("drover-drain".into()),
            }
        );
    }

    #[test]
    fn flags_win_over_tags_and_the_hook_is_optional() {
        let mut t = fleet_tags();
        t.remove(tags::LIFECYCLE_HOOK);
        let overrides = Overrides {
            pool: Some("gpu".into()),
            token: Some(TokenSource::Secret("drover/join-token/gpu".into())),
            ..Overrides::default()
        };
        let settings = Settings::resolve(Some(&t), &overrides).unwrap();
        assert_eq!(settings.pool, "gpu");
        assert_eq!(
            settings.token,
            TokenSource::Secret("drover/join-token/gpu".into())
        );
        assert_eq!(settings.coordinator, "http://nlb.internal:7070");
        assert_eq!(settings.lifecycle_hook, None);
    }

    #[test]
    fn a_secret_tag_is_a_token_source_but_not_both() {
        let mut t = fleet_tags();
        t.remove(tags::JOIN_TOKEN_PARAMETER);
        t.insert(
            tags::JOIN_TOKEN_SECRET.into(),
            " drover/join-token/cpu ".into(),
        );
        let settings = Settings::resolve(Some(&t), &Overrides::default()).unwrap();
        assert_eq!(
            settings.token,
            TokenSource::Secret("drover/join-token/cpu".into())
        );
        t.insert(tags::JOIN_TOKEN_PARAMETER.into(), "/p".into());
        assert!(matches!(
            Settings::resolve(Some(&t), &Overrides::default()),
            Err(BootstrapError::TwoTokenSources)
        ));
    }

    #[test]
    fn every_missing_tag_is_named_with_its_flag() {
        let mut t = fleet_tags();
        t.remove(tags::POOL);
        t.remove(tags::JOIN_TOKEN_PARAMETER);
        t.insert(tags::COORDINATOR.into(), "  ".into());
        let err = Settings::resolve(Some(&t), &Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, BootstrapError::MissingTags(m) if m.len() == 3),
            "{text}"
        );
        for needle in [
            "drover:coordinator (or --coordinator)",
            "drover:pool (or --pool)",
            "drover:join-token-parameter (or --join-token-parameter or --join-token-secret)",
            "PropagateAtLaunch",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
    }

    #[test]
    fn tags_off_says_how_to_turn_them_on() {
        let err = Settings::resolve(None, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("InstanceMetadataTags: enabled"),
            "{err}"
        );
        let all = Overrides {
            coordinator: Some("http://c:7070".into()),
            pool: Some("cpu".into()),
            token: Some(TokenSource::Parameter("/p".into())),
            lifecycle_hook: None,
        };
        assert_eq!(Settings::resolve(None, &all).unwrap().pool, "cpu");
    }

    #[test]
    fn bad_values_name_where_they_came_from() {
        let mut t = fleet_tags();
        t.insert(tags::COORDINATOR.into(), "nlb.internal:7070".into());
        let err = Settings::resolve(Some(&t), &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("instance tag drover:coordinator"),
            "{err}"
        );
        let overrides = Overrides {
            pool: Some("no spaces".into()),
            ..Overrides::default()
        };
        let err = Settings::resolve(Some(&fleet_tags()), &overrides).unwrap_err();
        assert!(err.to_string().contains("--pool"), "{err}");
    }

    #[test]
    fn rendered_config_parses_back_and_hides_nothing_it_should_keep() {
        let settings = Settings::resolve(Some(&fleet_tags()), &Overrides::default()).unwrap();
        let options = Options::new("http://169.254.169.254/");
        let token = JoinToken("tok\"en\\with\nquotes".into());
        let text = render(&options, &settings, "i-0abc", &token).unwrap();
        let config: AgentConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.join_token, token.0);
        assert_eq!(config.agent_id, "i-0abc");
        assert_eq!(config.pool, "cpu");
        assert_eq!(config.lifecycle_hook.as_deref(), Some("drover-drain"));
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.platform, crate::platform::PlatformChoice::Ec2);
        assert!(
            !text.contains("imds_endpoint"),
            "default IMDS is not written"
        );
        assert_eq!(format!("{token:?}"), "JoinToken(***)");
    }

    #[test]
    fn an_https_coordinator_tag_is_written_as_is() {
        let mut t = fleet_tags();
        t.insert(
            tags::COORDINATOR.into(),
            "https://drover.example.com:7070".into(),
        );
        let settings = Settings::resolve(Some(&t), &Overrides::default()).unwrap();
        let options = Options::new("http://169.254.169.254/");
        let text = render(&options, &settings, "i-0abc", &JoinToken("t".into())).unwrap();
        let config: AgentConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.coordinator, "https://drover.example.com:7070");
    }

    #[test]
    fn config_is_written_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/drover/agent.toml");
        write_private(&path, "a = 1\n").unwrap();
        write_private(&path, "b = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b = 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn failures_say_what_became_of_the_instance() {
        let failed = Failed {
            error: BootstrapError::TokenEmpty {
                location: TokenSource::Parameter("/p".into()),
            },
            health: Health::MarkedUnhealthy {
                instance_id: "i-1".into(),
            },
        };
        let text = failed.to_string();
        assert!(text.contains("SSM parameter /p is empty"), "{text}");
        assert!(text.contains("i-1 is marked Unhealthy"), "{text}");
    }
}
