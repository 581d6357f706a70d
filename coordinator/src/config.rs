//! Coordinator configuration: a TOML file, `DROVER_*` environment overrides
//! and flags (applied by `main.rs`), then [`Config::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Holds `drover.db` (SQLite) and `blobs/` (logs).
    pub data_dir: PathBuf,
    /// Where state lives: `sqlite` (one file in `data_dir`) or `dynamodb`.
    pub store: StoreKind,
    /// The DynamoDB table, when `store = "dynamodb"`.
    pub dynamodb: DynamoDbConfig,
    /// Where logs and artifacts live: `local` (`data_dir/blobs`) or `s3`.
    pub blobs: BlobKind,
    /// The bucket, when `blobs = "s3"`.
    pub s3: S3Config,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Agents present one of these to `Register`.
    pub join_tokens: Vec<JoinTokenConfig>,
    /// People and tools present one of these to the HTTP API.
    pub api_tokens: Vec<ApiTokenConfig>,
    pub heartbeat_interval_ms: u64,
    /// Default session TTL; pools may override it.
    pub session_ttl_ms: u64,
    /// Declared pools. Empty: any pool name is accepted.
    pub pools: Vec<PoolConfig>,
    /// Where the scaler's AWS calls go (`[aws]`).
    pub aws: AwsConfig,
    /// How often the scaler looks at pools bound to an ASG or to Fargate.
    pub scaler_interval_ms: u64,
    /// The scaler runs on one coordinator at a time, under a leader lease
    /// this long (renewed every interval).
    pub scaler_leader_ttl_ms: u64,
    /// Allowance for clock skew before an expired session is reaped.
    pub clock_skew_ms: u64,
    /// How long a LEASED job may take to start (image pulls) before requeue.
    pub start_deadline_ms: u64,
    /// Extra time past a job's timeout before the coordinator times it out
    /// itself (the agent enforces the timeout first).
    pub timeout_grace_ms: u64,
    pub reaper_interval_ms: u64,
    /// Queue head examined per claim.
    pub claim_scan_limit: usize,
    /// Longest `Claim` long-poll the coordinator will hold.
    pub max_claim_wait_ms: u64,
    /// Time between SIGTERM and SIGKILL given to agents.
    pub kill_grace_ms: u64,
    /// The HTTP base URL agents and the CLI reach this coordinator at; signed
    /// artifact URLs of the local blob store start with it. Default: the
    /// bound HTTP address (the host name when bound to all interfaces).
    pub public_url: Option<String>,
    /// PEM certificate chain (server certificate first). With
    /// `tls_key_file`, both listeners serve TLS only.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the certificate in `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Largest artifact (tar + zstd of a job's output directory) accepted.
    pub max_artifact_bytes: u64,
    /// How long a signed artifact URL stays valid.
    pub artifact_url_ttl_ms: u64,
    /// Prices behind cost estimates (`[prices]`, see `cost.rs`).
    pub prices: crate::cost::PriceTable,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Dynamodb,
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqlite" => Ok(StoreKind::Sqlite),
            "dynamodb" => Ok(StoreKind::Dynamodb),
            other => Err(format!("unknown store {other:?}; use sqlite or dynamodb")),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    #[default]
    Local,
    S3,
}

impl std::str::FromStr for BlobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(BlobKind::Local),
            "s3" => Ok(BlobKind::S3),
            other => Err(format!("unknown blob store {other:?}; use local or s3")),
        }
    }
}

/// `[s3]`: logs and artifacts in one bucket under `prefix`. Credentials and
/// region come from the standard AWS chain; only the coordinator holds them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of every object (`drover/` → `drover/logs/…`); empty: none.
    pub prefix: String,
    /// Another endpoint than AWS's (a local emulator).
    pub endpoint: Option<String>,
    /// Overrides the region of the AWS chain.
    pub region: Option<String>,
    /// `endpoint/bucket/key` URLs instead of `bucket.endpoint/key`
    /// (emulators and S3-compatible stores).
    pub force_path_style: bool,
    /// A log segment is written once this many bytes are buffered…
    pub log_segment_bytes: usize,
    /// …or once its oldest byte waited this long: how far behind a follower
    /// on another coordinator may be.
    pub log_flush_ms: u64,
    /// Tries per S3 call, the first included, with backoff between them
    /// (`DROVER_S3_MAX_ATTEMPTS`). Unset: `AWS_MAX_ATTEMPTS` /
    /// `AWS_RETRY_MODE` of the AWS chain when given, else 8
    /// ([`crate::aws::retry_config`]).
    pub max_attempts: Option<u32>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: "drover/".into(),
            endpoint: None,
            region: None,
            force_path_style: false,
            log_segment_bytes: 1 << 20,
            log_flush_ms: 2_000,
            max_attempts: None,
        }
    }
}

impl S3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.bucket;
        let valid_bucket = (3..=63).contains(&b.len())
            && b.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
            && b.starts_with(|c: char| c.is_ascii_alphanumeric())
            && b.ends_with(|c: char| c.is_ascii_alphanumeric());
        if b.is_empty() {
            return Err(config_error(
                "s3.bucket",
                "blobs = \"s3\" needs a bucket: set [s3] bucket = \"…\" or DROVER_S3_BUCKET",
            ));
        }
        if !valid_bucket {
            return Err(config_error(
                "s3.bucket",
                format!("{b:?} is not an S3 bucket name (3-63 of a-z 0-9 - ., starting and ending with a letter or digit)"),
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") || self.prefix.len() > 512 {
            return Err(config_error(
                "s3.prefix",
                format!("{:?} is not a key prefix: no leading slash, no empty segment, e.g. prefix = \"drover/\" (DROVER_S3_PREFIX)", self.prefix),
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(config_error(
                    "s3.endpoint",
                    format!("{endpoint:?} is not a URL: give e.g. http://127.0.0.1:5000 (DROVER_S3_ENDPOINT)"),
                ));
            }
        }
        if !(4096..=(64 << 20)).contains(&self.log_segment_bytes) {
            return Err(config_error(
                "s3.log_segment_bytes",
                "must be 4096 to 67108864: one object is written per segment, so small segments cost many PUTs",
            ));
        }
        if !(100..=60_000).contains(&self.log_flush_ms) {
            return Err(config_error(
                "s3.log_flush_ms",
                "must be 100 to 60000: followers on other coordinators see output this late",
            ));
        }
        validate_max_attempts("s3.max_attempts", self.max_attempts)
    }
}

/// `[dynamodb]`: credentials and region come from the standard AWS chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoDbConfig {
    pub table: String,
    /// Another endpoint than AWS's (a local emulator).
    pub endpoint: Option<String>,
    /// Overrides the region of the AWS chain.
    pub region: Option<String>,
    /// How long finished jobs are kept (DynamoDB TTL).
    pub retention_days: u32,
    /// Create the table at start when missing (dev and test setups; in
    /// production `drover-coordinator init-table` or infra/ creates it).
    pub create_table: bool,
    /// Queue partitions per pool; raise for a very hot pool.
    pub queue_shards: u32,
    /// Tries per DynamoDB call, the first included, with backoff between
    /// them: throttling and transient errors are retried
    /// (`DROVER_DYNAMODB_MAX_ATTEMPTS`). Unset: `AWS_MAX_ATTEMPTS` /
    /// `AWS_RETRY_MODE` of the AWS chain when given, else 8
    /// ([`crate::aws::retry_config`]).
    pub max_attempts: Option<u32>,
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        DynamoDbConfig {
            table: "drover".into(),
            endpoint: None,
            region: None,
            retention_days: 7,
            create_table: false,
            queue_shards: 1,
            max_attempts: None,
        }
    }
}

impl DynamoDbConfig {
    /// Checked at start and by `init-table`, before any AWS call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let table = &self.table;
        if table.len() < 3
            || table.len() > 255
            || !table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(config_error(
                "dynamodb.table",
                format!("{table:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"),
            ));
        }
        if self.retention_days == 0 {
            return Err(config_error(
                "dynamodb.retention_days",
                "must be at least 1",
            ));
        }
        if !(1..=64).contains(&self.queue_shards) {
            return Err(config_error("dynamodb.queue_shards", "must be 1 to 64"));
        }
        validate_max_attempts("dynamodb.max_attempts", self.max_attempts)
    }
}

/// 1 (no retries) to 20: more only stretches a call a throttled table
/// keeps refusing (the backoff is capped at a few seconds per try).
fn validate_max_attempts(field: &str, max_attempts: Option<u32>) -> Result<(), ConfigError> {
    match max_attempts {
        Some(n) if !(1..=20).contains(&n) => Err(config_error(
            field,
            format!("{n} is not 1 to 20 (tries per call, the first included; unset: 8)"),
        )),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenConfig {
    /// The token itself, or its SHA-256 as `sha256:<hex>`.
    pub token: String,
    /// Only agents of this pool may use it; none = any pool.
    #[serde(default)]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// The token itself, or its SHA-256 as `sha256:<hex>`.
    pub token: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Submit,
    Admin,
}

impl Scope {
    /// `admin` implies everything; `submit` implies `read`.
    pub fn allows(self, needed: Scope) -> bool {
        matches!(
            (self, needed),
            (Scope::Admin, _)
                | (Scope::Submit, Scope::Submit | Scope::Read)
                | (Scope::Read, Scope::Read)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub session_ttl_ms: Option<u64>,
    /// Grow the pool from demand: `[pools.scaling]` with `kind = "asg"` or
    /// `kind = "fargate"`.
    #[serde(default)]
    pub scaling: Option<ScalingConfig>,
}

/// `[aws]`: the scaler's AWS endpoint and region. Credentials come from the
/// standard AWS chain (environment, profile, instance or task role).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    /// Overrides the region of the AWS chain (`DROVER_AWS_REGION`).
    pub region: Option<String>,
    /// Another endpoint than AWS's for Auto Scaling and ECS calls: a local
    /// emulator (`DROVER_AWS_ENDPOINT`).
    pub endpoint: Option<String>,
}

/// How a pool grows. Scale-out only: idle agents leave (and terminate their
/// instance or task) by themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ScalingConfig {
    /// Raise an Auto Scaling group's desired capacity.
    Asg(AsgScaling),
    /// Launch ECS tasks on Fargate.
    Fargate(FargateScaling),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsgScaling {
    pub asg_name: String,
    /// Jobs one instance runs at a time (the agents' `max_jobs`).
    #[serde(default = "one")]
    pub slots_per_instance: u32,
    /// Default: the group's own minimum size.
    #[serde(default)]
    pub min: Option<u64>,
    /// Default: the group's own maximum size (never above it).
    #[serde(default)]
    pub max: Option<u64>,
    /// Least time between two scale-outs.
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// What one instance offers; jobs that do not fit are not demand.
    /// Unset: every queued job counts.
    #[serde(default)]
    pub capacity: Option<WorkerCapacity>,
    /// Labels the group's agents will have, matched against job
    /// constraints (`platform = "ec2"` and `asg` are implied).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Opt-in zombie reaping: an instance of this group whose agent session
    /// expired and that is still in service this long afterwards (with no
    /// new session from it) is terminated.
    #[serde(default)]
    pub zombie_grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FargateScaling {
    pub cluster: String,
    /// Family, `family:revision` or ARN of the agent's task definition.
    pub task_definition: String,
    /// awsvpc subnets (`subnet-…`) the tasks run in.
    pub subnets: Vec<String>,
    /// Security groups (`sg-…`) of the tasks' network interfaces.
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub assign_public_ip: bool,
    /// Jobs one task runs at a time (the agents' `max_jobs`).
    #[serde(default = "one")]
    pub slots_per_task: u32,
    #[serde(default)]
    pub min_tasks: u64,
    pub max_tasks: u64,
    /// What one task offers; jobs that do not fit are not demand.
    #[serde(default)]
    pub capacity: Option<WorkerCapacity>,
    /// Labels the tasks' agents will have (`platform = "fargate"` is implied).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The resources of one worker (instance or task), for deciding which
/// queued jobs it could run. Unset dimensions do not limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerCapacity {
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub disk_gib: Option<u32>,
    /// GPUs per worker; a declared capacity without GPUs runs no GPU job.
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub gpu_model: Option<String>,
}

impl WorkerCapacity {
    /// True when one worker could run a job asking for `wants`.
    pub fn fits(&self, wants: &drover_proto::model::Resources) -> bool {
        self.cpu_millis.is_none_or(|c| wants.cpu_millis <= c)
            && self.memory_mib.is_none_or(|m| wants.memory_mib <= m)
            && self.disk_gib.is_none_or(|d| wants.disk_gib <= d)
            && wants.gpus <= self.gpus
            && match &wants.gpu_model {
                Some(model) => self.gpu_model.as_ref() == Some(model),
                None => true,
            }
    }
}

fn one() -> u32 {
    1
}

fn default_cooldown_ms() -> u64 {
    60_000
}

/// Below this, an agent that restarts (systemd) could lose its instance.
pub const MIN_ZOMBIE_GRACE_MS: u64 = 30_000;

impl ScalingConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ScalingConfig::Asg(_) => "asg",
            ScalingConfig::Fargate(_) => "fargate",
        }
    }

    /// Jobs one worker runs at a time.
    pub fn slots_per_worker(&self) -> u32 {
        match self {
            ScalingConfig::Asg(a) => a.slots_per_instance,
            ScalingConfig::Fargate(f) => f.slots_per_task,
        }
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{at}.{name}");
        match self {
            ScalingConfig::Asg(a) => {
                if a.asg_name.is_empty() || a.asg_name.len() > 255 {
                    return Err(config_error(
                        &field("asg_name"),
                        "name the Auto Scaling group whose desired capacity the scaler raises (1 to 255 characters), e.g. asg_name = \"drover-gpu\"",
                    ));
                }
                if a.slots_per_instance == 0 {
                    return Err(config_error(
                        &field("slots_per_instance"),
                        "must be at least 1: the jobs one instance runs at once (its agent's max_jobs)",
                    ));
                }
                if let (Some(min), Some(max)) = (a.min, a.max) {
                    if min > max {
                        return Err(config_error(
                            &field("min"),
                            format!("{min} is above max ({max}); lower min or raise max"),
                        ));
                    }
                }
                if let Some(grace) = a.zombie_grace_ms {
                    if grace < MIN_ZOMBIE_GRACE_MS {
                        return Err(config_error(
                            &field("zombie_grace_ms"),
                            format!("{grace} ms is too short: an agent restarting on a healthy instance would lose it; use at least {MIN_ZOMBIE_GRACE_MS}"),
                        ));
                    }
                }
                validate_capacity(&field("capacity"), a.capacity.as_ref())
            }
            ScalingConfig::Fargate(f) => {
                if f.cluster.is_empty() {
                    return Err(config_error(
                        &field("cluster"),
                        "name the ECS cluster the agent tasks run in",
                    ));
                }
                if f.task_definition.is_empty() {
                    return Err(config_error(
                        &field("task_definition"),
                        "name the agent's task definition (family, family:revision or ARN)",
                    ));
                }
                if f.subnets.is_empty() || f.subnets.iter().any(|s| !s.starts_with("subnet-")) {
                    return Err(config_error(
                        &field("subnets"),
                        "list at least one subnet id (subnets = [\"subnet-…\"]): Fargate tasks run in awsvpc mode",
                    ));
                }
                if f.security_groups.is_empty()
                    || f.security_groups.iter().any(|s| !s.starts_with("sg-"))
                {
                    return Err(config_error(
                        &field("security_groups"),
                        "list at least one security group id (security_groups = [\"sg-…\"]) for the tasks' network interfaces",
                    ));
                }
                if f.slots_per_task == 0 {
                    return Err(config_error(
                        &field("slots_per_task"),
                        "must be at least 1: the jobs one task runs at once (its agent's max_jobs)",
                    ));
                }
                if f.max_tasks == 0 {
                    return Err(config_error(
                        &field("max_tasks"),
                        "must be at least 1: the most agent tasks the scaler keeps running",
                    ));
                }
                if f.min_tasks > f.max_tasks {
                    return Err(config_error(
                        &field("min_tasks"),
                        format!(
                            "{} is above max_tasks ({}); lower min_tasks or raise max_tasks",
                            f.min_tasks, f.max_tasks
                        ),
                    ));
                }
                validate_capacity(&field("capacity"), f.capacity.as_ref())
            }
        }
    }
}

fn validate_capacity(field: &str, capacity: Option<&WorkerCapacity>) -> Result<(), ConfigError> {
    if let Some(c) = capacity {
        if c.gpu_model.is_some() && c.gpus == 0 {
            return Err(config_error(
                &format!("{field}.gpus"),
                "gpu_model is set but gpus is 0: say how many GPUs one worker has",
            ));
        }
    }
    Ok(())
}

impl Config {
    fn validate_scaling(&self) -> Result<(), ConfigError> {
        let mut groups = BTreeMap::new();
        for (i, p) in self.pools.iter().enumerate() {
            let Some(scaling) = &p.scaling else { continue };
            scaling.validate(&format!("pools[{i}].scaling"))?;
            if let ScalingConfig::Asg(a) = scaling {
                if let Some(other) = groups.insert(a.asg_name.as_str(), p.name.as_str()) {
                    return Err(config_error(
                        &format!("pools[{i}].scaling.asg_name"),
                        format!(
                            "the group {:?} already scales pool {other:?}: bind each group to one pool",
                            a.asg_name
                        ),
                    ));
                }
            }
        }
        if let Some(endpoint) = &self.aws.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(config_error(
                    "aws.endpoint",
                    format!("{endpoint:?} is not a URL: give e.g. http://127.0.0.1:5000 (DROVER_AWS_ENDPOINT)"),
                ));
            }
        }
        if self.scaler_interval_ms < 100 {
            return Err(config_error("scaler_interval_ms", "must be at least 100"));
        }
        if self.scaler_leader_ttl_ms < 2 * self.scaler_interval_ms {
            return Err(config_error(
                "scaler_leader_ttl_ms",
                format!(
                    "{} ms is less than 2 scaler intervals ({} ms): the leader would lose its lease between ticks",
                    self.scaler_leader_ttl_ms,
                    2 * self.scaler_interval_ms
                ),
            ));
        }
        Ok(())
    }

    /// The certificate and key files when TLS is configured; one without the
    /// other is an error (serving plaintext by accident is worse than not
    /// starting).
    pub fn tls_files(&self) -> Result<Option<(&Path, &Path)>, ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(config_error(
                "tls_key_file",
                "tls_cert_file is set but tls_key_file is not: set tls_key_file (DROVER_TLS_KEY_FILE) to the certificate's PEM private key, or unset tls_cert_file to serve plaintext",
            )),
            (None, Some(_)) => Err(config_error(
                "tls_cert_file",
                "tls_key_file is set but tls_cert_file is not: set tls_cert_file (DROVER_TLS_CERT_FILE) to the PEM certificate chain, or unset tls_key_file to serve plaintext",
            )),
        }
    }

    /// Pools bound to an Auto Scaling group or to Fargate.
    pub fn scaling_pools(&self) -> impl Iterator<Item = (&str, &ScalingConfig)> {
        self.pools
            .iter()
            .filter_map(|p| p.scaling.as_ref().map(|s| (p.name.as_str(), s)))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn config_error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(".drover/coordinator"),
            store: StoreKind::Sqlite,
            dynamodb: DynamoDbConfig::default(),
            blobs: BlobKind::Local,
            s3: S3Config::default(),
            grpc_addr: "127.0.0.1:7070".parse().expect("valid literal"),
            http_addr: "127.0.0.1:7080".parse().expect("valid literal"),
            join_tokens: Vec::new(),
            api_tokens: Vec::new(),
            heartbeat_interval_ms: 10_000,
            session_ttl_ms: 60_000,
            pools: Vec::new(),
            aws: AwsConfig::default(),
            scaler_interval_ms: 10_000,
            scaler_leader_ttl_ms: 30_000,
            clock_skew_ms: 5_000,
            start_deadline_ms: 15 * 60_000,
            timeout_grace_ms: 30_000,
            reaper_interval_ms: 1_000,
            claim_scan_limit: 64,
            max_claim_wait_ms: 30_000,
            kill_grace_ms: 10_000,
            public_url: None,
            tls_cert_file: None,
            tls_key_file: None,
            max_artifact_bytes: 10 << 30,
            artifact_url_ttl_ms: 3_600_000,
            prices: crate::cost::PriceTable::default(),
        }
    }
}

impl Config {
    /// A loopback-only setup with fresh random tokens: one join token for any
    /// pool and one admin API token.
    pub fn dev(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            grpc_addr: "127.0.0.1:0".parse().expect("valid literal"),
            http_addr: "127.0.0.1:0".parse().expect("valid literal"),
            join_tokens: vec![JoinTokenConfig {
                token: crate::auth::random_token("dj"),
                pool: None,
            }],
            api_tokens: vec![ApiTokenConfig {
                token: crate::auth::random_token("da"),
                scopes: vec![Scope::Admin],
            }],
            ..Config::default()
        }
    }

    /// The TTL of sessions in `pool`.
    pub fn session_ttl_ms(&self, pool: &str) -> u64 {
        self.pools
            .iter()
            .find(|p| p.name == pool)
            .and_then(|p| p.session_ttl_ms)
            .unwrap_or(self.session_ttl_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.join_tokens.is_empty() {
            return Err(config_error(
                "join_tokens",
                "no join token configured: agents could never register. Add [[join_tokens]] token = \"...\" or set DROVER_JOIN_TOKEN",
            ));
        }
        if self.api_tokens.is_empty() {
            return Err(config_error(
                "api_tokens",
                "no API token configured: nobody could use the HTTP API. Add [[api_tokens]] token = \"...\" scopes = [\"admin\"] or set DROVER_ADMIN_TOKEN",
            ));
        }
        for (i, t) in self.join_tokens.iter().enumerate() {
            check_token(&format!("join_tokens[{i}].token"), &t.token)?;
            if let Some(pool) = &t.pool {
                drover_proto::model::validate_name(&format!("join_tokens[{i}].pool"), pool)
                    .map_err(|e| config_error(&e.field, e.message))?;
            }
        }
        for (i, t) in self.api_tokens.iter().enumerate() {
            check_token(&format!("api_tokens[{i}].token"), &t.token)?;
            if t.scopes.is_empty() {
                return Err(config_error(
                    &format!("api_tokens[{i}].scopes"),
                    "must list at least one of read, submit, admin",
                ));
            }
        }
        for (i, p) in self.pools.iter().enumerate() {
            drover_proto::model::validate_name(&format!("pools[{i}].name"), &p.name)
                .map_err(|e| config_error(&e.field, e.message))?;
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(config_error("heartbeat_interval_ms", "must be above 0"));
        }
        if let Some(url) = &self.public_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<axum::http::Uri>().is_ok_and(|u| {
                    u.host().is_some()
                        && u.query().is_none()
                        && u.path().trim_end_matches('/').is_empty()
                });
            if !ok {
                return Err(config_error(
                    "public_url",
                    format!("{url:?} is not a base URL: give scheme, host and port only, e.g. http://coordinator.internal:7080 (DROVER_PUBLIC_URL)"),
                ));
            }
        }
        self.tls_files()?;
        if self.artifact_url_ttl_ms < 60_000 {
            return Err(config_error(
                "artifact_url_ttl_ms",
                "must be at least 60000: agents and the CLI need time to start a transfer",
            ));
        }
        self.prices
            .validate()
            .map_err(|message| config_error("prices", message))?;
        for ttl in std::iter::once(self.session_ttl_ms)
            .chain(self.pools.iter().filter_map(|p| p.session_ttl_ms))
        {
            if ttl < 3 * self.heartbeat_interval_ms {
                return Err(config_error(
                    "session_ttl_ms",
                    format!(
                        "{ttl} ms is less than 3 heartbeat intervals ({} ms): sessions would expire between heartbeats",
                        3 * self.heartbeat_interval_ms
                    ),
                ));
            }
        }
        if self.store == StoreKind::Dynamodb {
            self.dynamodb.validate()?;
        }
        if self.blobs == BlobKind::S3 {
            self.s3.validate()?;
        }
        if self.claim_scan_limit == 0 {
            return Err(config_error("claim_scan_limit", "must be above 0"));
        }
        self.validate_scaling()?;
        Ok(())
    }
}

fn check_token(field: &str, token: &str) -> Result<(), ConfigError> {
    if let Some(hex) = token.strip_prefix("sha256:") {
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(config_error(
                field,
                "sha256: must be followed by 64 hex digits",
            ));
        }
    } else if token.len() < 16 {
        return Err(config_error(
            field,
            "is shorter than 16 characters; use a long random token (e.g. `openssl rand -hex 24`)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_config_is_valid_and_loopback_only() {
        let config = Config::dev("/tmp/x");
        config.validate().unwrap();
        assert!(config.grpc_addr.ip().is_loopback());
        assert!(config.http_addr.ip().is_loopback());
    }

    #[test]
    fn short_tokens_and_missing_tokens_are_rejected() {
        let mut config = Config::dev("/tmp/x");
        config.api_tokens[0].token = "short".into();
        assert_eq!(config.validate().unwrap_err().field, "api_tokens[0].token");
        let config = Config::default();
        assert_eq!(config.validate().unwrap_err().field, "join_tokens");
    }

    #[test]
    fn tls_needs_both_the_certificate_and_the_key() {
        let mut config = Config::dev("/tmp/x");
        assert!(config.tls_files().unwrap().is_none());
        config.tls_cert_file = Some("/etc/drover/cert.pem".into());
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, "tls_key_file");
        assert!(err.message.contains("DROVER_TLS_KEY_FILE"), "{err}");
        config.tls_cert_file = None;
        config.tls_key_file = Some("/etc/drover/key.pem".into());
        assert_eq!(config.validate().unwrap_err().field, "tls_cert_file");
        config.tls_cert_file = Some("/etc/drover/cert.pem".into());
        config.validate().unwrap();
        let parsed: Config =
            toml::from_str("tls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\n").unwrap();
        assert!(parsed.tls_files().unwrap().is_some());
    }

    #[test]
    fn ttl_below_three_heartbeats_is_rejected() {
        let mut config = Config::dev("/tmp/x");
        config.session_ttl_ms = 2 * config.heartbeat_interval_ms;
        assert_eq!(config.validate().unwrap_err().field, "session_ttl_ms");
    }

    #[test]
    fn scaling_pools_parse_from_toml() {
        let config: Config = toml::from_str(
            r#"
            [aws]
            region = "eu-west-1"

            [[pools]]
            name = "gpu"
            [pools.scaling]
            kind = "asg"
            asg_name = "drover-gpu"
            slots_per_instance = 2
            max = 6
            zombie_grace_ms = 300000
            capacity = { cpu_millis = 8000, memory_mib = 30000, gpus = 1, gpu_model = "t4" }
            labels = { arch = "x86_64" }

            [[pools]]
            name = "batch"
            [pools.scaling]
            kind = "fargate"
            cluster = "drover"
            task_definition = "drover-agent:3"
            subnets = ["subnet-1"]
            security_groups = ["sg-1"]
            max_tasks = 20
            "#,
        )
        .unwrap();
        let ScalingConfig::Asg(asg) = config.pools[0].scaling.as_ref().unwrap() else {
            panic!("an ASG pool");
        };
        assert_eq!(
            (asg.slots_per_instance, asg.min, asg.max, asg.cooldown_ms),
            (2, None, Some(6), 60_000)
        );
        assert_eq!(asg.capacity.as_ref().unwrap().gpus, 1);
        let ScalingConfig::Fargate(fargate) = config.pools[1].scaling.as_ref().unwrap() else {
            panic!("a Fargate pool");
        };
        assert_eq!((fargate.slots_per_task, fargate.max_tasks), (1, 20));
        assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.scaling_pools().count(), 2);
        let unknown = toml::from_str::<Config>(
            "[[pools]]\nname = \"x\"\n[pools.scaling]\nkind = \"asg\"\nasg_name = \"g\"\nslots = 2\n",
        );
        assert!(
            unknown.unwrap_err().to_string().contains("slots"),
            "unknown keys are refused"
        );
    }

    #[test]
    fn bad_scaling_settings_name_the_field() {
        let asg = |f: &dyn Fn(&mut AsgScaling)| {
            let mut a = AsgScaling {
                asg_name: "g".into(),
                slots_per_instance: 1,
                min: None,
                max: None,
                cooldown_ms: 60_000,
                capacity: None,
                labels: BTreeMap::new(),
                zombie_grace_ms: None,
            };
            f(&mut a);
            ScalingConfig::Asg(a)
        };
        let fargate = |f: &dyn Fn(&mut FargateScaling)| {
            let mut s = FargateScaling {
                cluster: "c".into(),
                task_definition: "t".into(),
                subnets: vec!["subnet-1".into()],
                security_groups: vec!["sg-1".into()],
                assign_public_ip: false,
                slots_per_task: 1,
                min_tasks: 0,
                max_tasks: 5,
                capacity: None,
                labels: BTreeMap::new(),
            };
            f(&mut s);
            ScalingConfig::Fargate(s)
        };
        let cases = [
            (asg(&|a| a.asg_name.clear()), "pools[0].scaling.asg_name"),
            (
                asg(&|a| a.slots_per_instance = 0),
                "pools[0].scaling.slots_per_instance",
            ),
            (
                asg(&|a| {
                    a.min = Some(4);
                    a.max = Some(2);
                }),
                "pools[0].scaling.min",
            ),
            (
                asg(&|a| a.zombie_grace_ms = Some(1000)),
                "pools[0].scaling.zombie_grace_ms",
            ),
            (
                asg(&|a| {
                    a.capacity = Some(WorkerCapacity {
                        gpu_model: Some("t4".into()),
                        ..WorkerCapacity::default()
                    })
                }),
                "pools[0].scaling.capacity.gpus",
            ),
            (fargate(&|f| f.subnets.clear()), "pools[0].scaling.subnets"),
            (
                fargate(&|f| f.security_groups = vec!["default".into()]),
                "pools[0].scaling.security_groups",
            ),
            (fargate(&|f| f.max_tasks = 0), "pools[0].scaling.max_tasks"),
            (fargate(&|f| f.min_tasks = 9), "pools[0].scaling.min_tasks"),
            (fargate(&|f| f.cluster.clear()), "pools[0].scaling.cluster"),
        ];
        for (scaling, field) in cases {
            let mut config = Config::dev("/tmp/x");
            config.pools = vec![PoolConfig {
                name: "p".into(),
                session_ttl_ms: None,
                scaling: Some(scaling),
            }];
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut config = Config::dev("/tmp/x");
        config.pools = ["a", "b"]
            .into_iter()
            .map(|name| PoolConfig {
                name: name.into(),
                session_ttl_ms: None,
                scaling: Some(asg(&|_| {})),
            })
            .collect();
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, "pools[1].scaling.asg_name");
        assert!(err.message.contains("already scales pool \"a\""), "{err}");
        let mut config = Config::dev("/tmp/x");
        config.scaler_leader_ttl_ms = config.scaler_interval_ms;
        assert_eq!(config.validate().unwrap_err().field, "scaler_leader_ttl_ms");
        let mut config = Config::dev("/tmp/x");
        config.aws.endpoint = Some("localhost:5000".into());
        assert_eq!(config.validate().unwrap_err().field, "aws.endpoint");
    }

    #[test]
    fn worker_capacity_decides_which_jobs_fit() {
        use drover_proto::model::Resources;
        let t4 = WorkerCapacity {
            cpu_millis: Some(4000),
            memory_mib: None,
            disk_gib: None,
            gpus: 1,
            gpu_model: Some("t4".into()),
        };
        let job = |cpu: u32, gpus: u32, model: Option<&str>| Resources {
            cpu_millis: cpu,
            gpus,
            gpu_model: model.map(str::to_string),
            ..Resources::default()
        };
        assert!(t4.fits(&job(4000, 1, Some("t4"))));
        assert!(t4.fits(&job(100, 0, None)));
        assert!(!t4.fits(&job(4001, 0, None)));
        assert!(!t4.fits(&job(100, 2, None)));
        assert!(!t4.fits(&job(100, 1, Some("a100"))));
        assert!(
            !WorkerCapacity::default().fits(&job(100, 1, None)),
            "no GPUs declared"
        );
    }

    #[test]
    fn s3_blobs_parse_and_bad_settings_name_the_field() {
        let config: Config = toml::from_str(
            "blobs = \"s3\"\n[s3]\nbucket = \"drover-logs\"\nendpoint = \"http://127.0.0.1:5000\"\nforce_path_style = true\n",
        )
        .unwrap();
        assert_eq!(config.blobs, BlobKind::S3);
        assert_eq!(config.s3.prefix, "drover/");
        assert!(config.s3.force_path_style);
        type Change = dyn Fn(&mut S3Config);
        let cases: [(&Change, &str); 7] = [
            (&|s| s.bucket.clear(), "s3.bucket"),
            (&|s| s.bucket = "Drover_Logs".into(), "s3.bucket"),
            (&|s| s.prefix = "/drover".into(), "s3.prefix"),
            (
                &|s| s.endpoint = Some("127.0.0.1:5000".into()),
                "s3.endpoint",
            ),
            (&|s| s.log_segment_bytes = 10, "s3.log_segment_bytes"),
            (&|s| s.log_flush_ms = 0, "s3.log_flush_ms"),
            (&|s| s.max_attempts = Some(0), "s3.max_attempts"),
        ];
        for (change, field) in cases {
            let mut config = Config::dev("/tmp/x");
            config.blobs = BlobKind::S3;
            config.s3.bucket = "drover-logs".into();
            config.validate().unwrap();
            change(&mut config.s3);
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let mut config = Config::dev("/tmp/x");
        config.s3.bucket.clear();
        config
            .validate()
            .expect("[s3] is only checked when blobs = \"s3\"");
    }

    #[test]
    fn dynamodb_max_attempts_parse_and_outside_1_to_20_are_refused() {
        let config: Config =
            toml::from_str("store = \"dynamodb\"\n[dynamodb]\nmax_attempts = 3\n").unwrap();
        assert_eq!(config.dynamodb.max_attempts, Some(3));
        config.dynamodb.validate().unwrap();
        DynamoDbConfig::default()
            .validate()
            .expect("unset: the AWS chain's or 8");
        for bad in [0, 21] {
            let config = DynamoDbConfig {
                max_attempts: Some(bad),
                ..DynamoDbConfig::default()
            };
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, "dynamodb.max_attempts", "{err}");
        }
    }

    #[test]
    fn scopes_imply_lesser_scopes() {
        assert!(Scope::Admin.allows(Scope::Submit));
        assert!(Scope::Submit.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Submit));
        assert!(!Scope::Submit.allows(Scope::Admin));
    }
}
