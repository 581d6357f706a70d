//! Domain types of the HTTP JSON API (DESIGN §2), shared by the coordinator
//! and the CLI. Validation lives beside the types so every entry point
//! rejects the same bad input with the same message.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What a secret value reads as anywhere it is shown.
pub const SECRET_MASK: &str = "***";
pub const DEFAULT_POOL: &str = "default";

/// Largest total size of a job's env (keys + values), in bytes.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Largest total size of a job's command + args, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
pub const MAX_PRIORITY: i32 = 1_000_000;
pub const MAX_ATTEMPTS: u32 = 100;
/// Most jobs in one batch submit.
pub const MAX_BATCH: usize = 1_000;

/// A job as submitted (DESIGN §2). Unknown fields are rejected so a typo is an
/// error, not a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Container image (docker runtime). Ignored by the process runtime.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workdir: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default)]
    pub resources: Resources,
    /// Cap the job at `resources.cpu_millis` (a CFS quota, Docker's
    /// `--cpus`). Unset, the CPU request is a weight (`--cpu-shares`, 1024
    /// per core, as ECS and Nomad do): the job may use idle CPU and gets its
    /// share when the host is busy. Memory is always a hard limit.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cpu_hard_limit: bool,
    /// Label matches on agents: every entry must equal the agent's label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constraints: BTreeMap<String, String>,
    /// Wall-clock limit of one attempt in seconds; 0 means none.
    #[serde(default)]
    pub timeout_secs: u64,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Higher first; FIFO within a priority.
    #[serde(default)]
    pub priority: i32,
    /// A repeat submit with the same key returns the existing job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Keep what the job writes to its output directory (`/output`, or
    /// `$DROVER_OUTPUT_DIR`) as the attempt's artifact (tar + zstd), for
    /// `drover artifacts get` and for later jobs' `inputs`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub outputs: bool,
    /// Artifacts of earlier jobs, unpacked read-only under `/input/<name>/`
    /// (`$DROVER_INPUT_DIR/<name>/`) before the job starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputSpec>,
    /// When the Docker runtime pulls `image`; unset: `always` for `latest`
    /// and untagged references, `if-not-present` for other tags and digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

/// When to pull a job's image (Docker runtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Before every attempt: a moving tag may have moved.
    Always,
    /// Only when the agent does not have the image.
    IfNotPresent,
}

impl PullPolicy {
    /// The wire name (`always`, `if-not-present`).
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
        }
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(PullPolicy::Always),
            "if-not-present" => Ok(PullPolicy::IfNotPresent),
            other => Err(format!(
                "unknown pull policy {other:?}: use always or if-not-present"
            )),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Most inputs one job may name.
pub const MAX_INPUTS: usize = 64;

/// One input of a job: the artifact of another job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// The directory under `/input`: a safe path component.
    pub name: String,
    /// The job whose artifact (its latest attempt's) is unpacked there; it
    /// must have declared `outputs` and succeeded by the time this job starts.
    pub job: String,
}

fn default_pool() -> String {
    DEFAULT_POOL.to_string()
}

impl JobSpec {
    /// A spec that runs `command` in the default pool with default settings.
    pub fn command<I: IntoIterator<Item = S>, S: Into<String>>(command: I) -> JobSpec {
        JobSpec {
            name: String::new(),
            pool: default_pool(),
            image: String::new(),
            command: command.into_iter().map(Into::into).collect(),
            args: Vec::new(),
            env: BTreeMap::new(),
            workdir: String::new(),
            user: String::new(),
            resources: Resources::default(),
            cpu_hard_limit: false,
            constraints: BTreeMap::new(),
            timeout_secs: 0,
            retry: RetryPolicy::default(),
            priority: 0,
            idempotency_key: None,
            outputs: false,
            inputs: Vec::new(),
            pull_policy: None,
        }
    }

    /// The full argv: `command` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        self.command
            .iter()
            .chain(self.args.iter())
            .cloned()
            .collect()
    }

    /// The spec as it may be shown: secret env values masked.
    pub fn redacted(&self) -> JobSpec {
        let mut spec = self.clone();
        for value in spec.env.values_mut() {
            if let EnvValue::Secret { value, .. } = value {
                *value = SECRET_MASK.to_string();
            }
        }
        spec
    }

    /// Checks everything that can be checked without the coordinator's state.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.name.len() > 256 {
            return Err(FieldError::new("name", "must be at most 256 bytes"));
        }
        validate_name("pool", &self.pool)?;
        if self.command.is_empty() || self.command[0].trim().is_empty() {
            return Err(FieldError::new(
                "command",
                "must not be empty: give the program to run, e.g. [\"sh\", \"-c\", \"echo hi\"]",
            ));
        }
        let argv_bytes: usize = self.argv().iter().map(|a| a.len() + 1).sum();
        if argv_bytes > MAX_COMMAND_BYTES {
            return Err(FieldError::new(
                "command",
                format!(
                    "command and args are {argv_bytes} bytes; the limit is {MAX_COMMAND_BYTES}"
                ),
            ));
        }
        if self.argv().iter().any(|a| a.contains('\0')) {
            return Err(FieldError::new("command", "must not contain NUL bytes"));
        }
        let mut env_bytes = 0;
        for (key, value) in &self.env {
            if !is_env_key(key) {
                return Err(FieldError::new(
                    format!("env.{key}"),
                    "is not a valid variable name: use letters, digits and '_', not starting with a digit",
                ));
            }
            if value.value().contains('\0') {
                return Err(FieldError::new(
                    format!("env.{key}"),
                    "must not contain NUL bytes",
                ));
            }
            env_bytes += key.len() + value.value().len();
        }
        if env_bytes > MAX_ENV_BYTES {
            return Err(FieldError::new(
                "env",
                format!("is {env_bytes} bytes; the limit is {MAX_ENV_BYTES}: pass large data as an input file"),
            ));
        }
        if !self.workdir.is_empty() && !self.workdir.starts_with('/') {
            return Err(FieldError::new("workdir", "must be an absolute path"));
        }
        self.resources.validate()?;
        for key in self.constraints.keys() {
            validate_name(&format!("constraints.{key}"), key)?;
        }
        if self.timeout_secs > 30 * 24 * 3600 {
            return Err(FieldError::new(
                "timeout_secs",
                "must be at most 30 days (2592000)",
            ));
        }
        self.retry.validate()?;
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(FieldError::new(
                "priority",
                format!("must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > 256 {
                return Err(FieldError::new("idempotency_key", "must be 1 to 256 bytes"));
            }
        }
        self.validate_inputs()
    }

    fn validate_inputs(&self) -> Result<(), FieldError> {
        if self.inputs.len() > MAX_INPUTS {
            return Err(FieldError::new(
                "inputs",
                format!(
                    "names {} inputs; the limit is {MAX_INPUTS}: pack them into fewer artifacts",
                    self.inputs.len()
                ),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            validate_input_name(&format!("inputs[{i}].name"), &input.name)?;
            if !seen.insert(input.name.as_str()) {
                return Err(FieldError::new(
                    format!("inputs[{i}].name"),
                    format!(
                        "{:?} is used twice: each input needs its own directory name",
                        input.name
                    ),
                ));
            }
            let id_ok = !input.job.is_empty()
                && input.job.len() <= 64
                && input.job.chars().all(|c| c.is_ascii_alphanumeric());
            if !id_ok {
                return Err(FieldError::new(
                    format!("inputs[{i}].job"),
                    format!(
                        "{:?} is not a job id (as printed by drover submit)",
                        input.job
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Pool names, label keys: short, and safe in paths, URLs and metric labels.
pub fn validate_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{name:?} is not a valid name: use 1 to 64 letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// An input's directory under `/input`: a name, or `<step>/<task index>`
/// for the tasks of a workflow's array step.
pub fn validate_input_name(field: &str, name: &str) -> Result<(), FieldError> {
    match name.split_once('/') {
        Some((step, index))
            if !index.is_empty()
                && index.len() <= 6
                && index.bytes().all(|b| b.is_ascii_digit()) =>
        {
            validate_name(field, step)
        }
        _ => validate_name(field, name),
    }
}

fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && key.len() <= 256
}

/// An env value: a plain string, or `{"value": "...", "secret": true}`.
/// Secret values reach the job but are never logged or returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Plain(String),
    Secret {
        value: String,
        #[serde(default)]
        secret: bool,
    },
}

impl EnvValue {
    pub fn value(&self) -> &str {
        match self {
            EnvValue::Plain(v) | EnvValue::Secret { value: v, .. } => v,
        }
    }
    pub fn is_secret(&self) -> bool {
        matches!(self, EnvValue::Secret { secret: true, .. })
    }
}

/// What a job needs from an agent. Defaults fit many jobs on a laptop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpu_millis", alias = "cpu")]
    pub cpu_millis: u32,
    #[serde(default = "default_memory_mib", alias = "memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default, alias = "disk")]
    pub disk_gib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
}

fn default_cpu_millis() -> u32 {
    100
}
fn default_memory_mib() -> u64 {
    128
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: default_cpu_millis(),
            memory_mib: default_memory_mib(),
            gpus: 0,
            disk_gib: 0,
            gpu_model: None,
        }
    }
}

impl Resources {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.cpu_millis == 0 {
            return Err(FieldError::new(
                "resources.cpu_millis",
                "must be at least 1 (millicores)",
            ));
        }
        if self.memory_mib == 0 {
            return Err(FieldError::new(
                "resources.memory_mib",
                "must be at least 1 (MiB)",
            ));
        }
        if self.gpus > 64 {
            return Err(FieldError::new("resources.gpus", "must be at most 64"));
        }
        Ok(())
    }

    /// True when `self` (a request) fits in `free`.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millis <= free.cpu_millis
            && self.memory_mib <= free.memory_mib
            && self.gpus <= free.gpus
            && self.disk_gib <= free.disk_gib
            && match (&self.gpu_model, &free.gpu_model) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m CPU, {} MiB", self.cpu_millis, self.memory_mib)?;
        if self.gpus > 0 {
            write!(f, ", {} GPU", self.gpus)?;
            if let Some(model) = &self.gpu_model {
                write!(f, " ({model})")?;
            }
        }
        if self.disk_gib > 0 {
            write!(f, ", {} GiB disk", self.disk_gib)?;
        }
        Ok(())
    }
}

/// Retries: `max_attempts` counts job failures (non-zero exits, timeouts);
/// `max_infra_retries` counts lost agents and interruptions, separately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Exit codes that are retried; empty means every non-zero exit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on_exit_codes: Vec<i32>,
    /// First backoff; doubles per failure, capped at one hour.
    #[serde(default = "default_backoff_secs")]
    pub backoff_secs: u64,
    #[serde(default = "default_max_infra_retries")]
    pub max_infra_retries: u32,
}

fn default_max_attempts() -> u32 {
    1
}
fn default_backoff_secs() -> u64 {
    5
}
fn default_max_infra_retries() -> u32 {
    5
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            retry_on_exit_codes: Vec::new(),
            backoff_secs: default_backoff_secs(),
            max_infra_retries: default_max_infra_retries(),
        }
    }
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(FieldError::new(
                "retry.max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            ));
        }
        if self.backoff_secs > 3600 {
            return Err(FieldError::new(
                "retry.backoff_secs",
                "must be at most 3600",
            ));
        }
        if self.max_infra_retries > 100 {
            return Err(FieldError::new(
                "retry.max_infra_retries",
                "must be at most 100",
            ));
        }
        Ok(())
    }

    /// Backoff before the attempt after `failures` failures, in milliseconds.
    pub fn backoff_ms(&self, failures: u32) -> u64 {
        let exp = failures.saturating_sub(1).min(20);
        (self.backoff_secs.saturating_mul(1000))
            .saturating_mul(1u64 << exp)
            .min(3_600_000)
    }

    /// Whether a failure with this exit code may be retried (attempts aside).
    pub fn retries_exit_code(&self, exit_code: Option<i32>) -> bool {
        match exit_code {
            Some(code) if !self.retry_on_exit_codes.is_empty() => {
                self.retry_on_exit_codes.contains(&code)
            }
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Pending,
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Queued,
        JobState::Leased,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Queued => "QUEUED",
            JobState::Leased => "LEASED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase().replace('-', "_");
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == upper)
            .ok_or_else(|| {
                FieldError::new(
                    "state",
                    format!(
                        "{s:?} is not a job state; use one of {}",
                        JobState::ALL.map(JobState::as_str).join(", ")
                    ),
                )
            })
    }
}

/// A job as the API returns it. Secret env values are masked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Grows on every lease: the fencing token; names the attempt's logs.
    pub attempt: u64,
    /// Failures counted against `retry.max_attempts`.
    pub failures: u32,
    /// Requeues on the infrastructure budget (agent lost, interrupted).
    pub infra_retries: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the job is in its state (the last transition's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The workflow run and step this job belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<crate::workflow::WorkflowLink>,
    /// What its attempts cost so far (duration × the agent's price, by the
    /// job's share of the agent). Filled by `GET /v1/jobs/{id}`; `None` in
    /// listings or when an agent's price is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// `GET /v1/jobs/{id}/artifacts`: where to download the job's artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub job_id: String,
    /// The attempt that produced it (the job's latest).
    pub attempt: u64,
    /// Size of the archive (tar + zstd).
    pub bytes: u64,
    /// A signed GET, valid until `expires_at_ms`; needs no API token.
    pub url: String,
    pub expires_at_ms: i64,
}

/// One transition in a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: u64,
    pub at_ms: i64,
    pub attempt: u64,
    /// The state the job entered.
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub reason: String,
    /// On RUNNING events: what this attempt costs per hour on its agent
    /// (the job's share of it), when the agent's price is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_hour: Option<f64>,
}

/// `POST /v1/jobs` body: one spec, or `{"jobs": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SubmitRequest {
    Batch { jobs: Vec<JobSpec> },
    One(Box<JobSpec>),
}

impl SubmitRequest {
    pub fn into_specs(self) -> Vec<JobSpec> {
        match self {
            SubmitRequest::Batch { jobs } => jobs,
            SubmitRequest::One(spec) => vec![*spec],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmittedJob {
    pub id: String,
    pub state: JobState,
    /// False when an idempotency key matched an existing job.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub jobs: Vec<SubmittedJob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<JobEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Active,
    Draining,
    /// Left cleanly or its session expired.
    Gone,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Draining => "draining",
            AgentState::Gone => "gone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub agent_id: String,
    pub session_id: String,
    pub pool: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub runtime: String,
    pub version: String,
    pub state: AgentState,
    pub registered_at_ms: i64,
    pub last_heartbeat_ms: i64,
    pub running: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_addr: String,
    /// What the coordinator did about this agent beyond ending its session,
    /// e.g. "instance i-… terminated by the coordinator: …" when the scaler
    /// terminated its instance as a zombie. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<Agent>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    pub pool: String,
    pub queued: u64,
    pub running: u64,
    pub agents: u64,
    pub paused: bool,
    /// Age of the oldest job waiting to be claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_age_ms: Option<i64>,
    /// How the pool grows, when it is bound to an Auto Scaling group or to
    /// a Fargate task definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<PoolScaling>,
}

/// A pool's scaler as last seen by the coordinator that runs it. Scale-out
/// only: workers leave by themselves when idle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolScaling {
    /// `asg` or `fargate`.
    pub kind: String,
    /// The Auto Scaling group, or `<cluster>/<task definition>`.
    pub target: String,
    /// Jobs one instance or task runs at a time.
    pub slots_per_worker: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Queued jobs the workers can run plus running jobs, in slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand_slots: Option<u64>,
    /// Workers the demand asks for: `clamp(ceil(demand / slots), min, max)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<u64>,
    /// ASG: its desired capacity. Fargate: tasks pending or running,
    /// including those just launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u64>,
    /// ASG: instances in service. Fargate: tasks ECS lists as pending or
    /// running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<u64>,
    /// The outcome of the latest evaluation (a hold, an action or an error),
    /// timed from when it was first reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<ScalingDecision>,
    /// The latest change the scaler made (scale-out, task launch, zombie
    /// termination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<ScalingDecision>,
    /// The latest AWS error, while the scaler backs off because of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// No scale-out before this time (after errors or capacity failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_until_ms: Option<i64>,
    /// When the scaler last looked at the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_at_ms: Option<i64>,
}

/// One decision of a pool's scaler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingDecision {
    pub at_ms: i64,
    /// `scale_out`, `launch`, `terminate_zombie`, `none`, `cooldown`,
    /// `paused`, `backoff` or `error`.
    pub action: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<Pool>,
}

/// Error body of every non-2xx answer of the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: crate::ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A validation failure: which field, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field with a batch index: `jobs[3].command`.
    pub fn in_batch(mut self, index: usize) -> Self {
        self.field = format!("jobs[{index}].{}", self.field);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_parses_from_specs_and_rejects_unknown_values() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"command": ["true"], "image": "app:1", "pull_policy": "always"}"#,
        )
        .unwrap();
        assert_eq!(spec.pull_policy, Some(PullPolicy::Always));
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""pull_policy":"always""#), "{json}");
        let err =
            serde_json::from_str::<JobSpec>(r#"{"command": ["true"], "pull_policy": "sometimes"}"#)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("always") && err.contains("if-not-present"),
            "{err}"
        );
        assert_eq!("if-not-present".parse(), Ok(PullPolicy::IfNotPresent));
        assert!("never".parse::<PullPolicy>().is_err());
    }

    #[test]
    fn empty_command_is_rejected_naming_the_field() {
        let err = JobSpec::command(Vec::<String>::new())
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "command");
    }

    #[test]
    fn secret_env_is_masked_in_the_redacted_spec() {
        let mut spec = JobSpec::command(["true"]);
        spec.env.insert(
            "TOKEN".into(),
            EnvValue::Secret {
                value: "hunter2".into(),
                secret: true,
            },
        );
        spec.env
            .insert("PLAIN".into(), EnvValue::Plain("visible".into()));
        let shown = serde_json::to_string(&spec.redacted()).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("visible"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<JobSpec>(r#"{"command":["true"],"comand":["x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("comand"), "{err}");
    }

    #[test]
    fn submit_request_accepts_one_spec_or_a_batch() {
        let one: SubmitRequest = serde_json::from_str(r#"{"command":["true"]}"#).unwrap();
        assert_eq!(one.into_specs().len(), 1);
        let batch: SubmitRequest =
            serde_json::from_str(r#"{"jobs":[{"command":["a"]},{"command":["b"]}]}"#).unwrap();
        assert_eq!(batch.into_specs().len(), 2);
    }

    #[test]
    fn priority_out_of_range_is_rejected() {
        let mut spec = JobSpec::command(["true"]);
        spec.priority = MAX_PRIORITY + 1;
        assert_eq!(spec.validate().unwrap_err().field, "priority");
    }

    #[test]
    fn bad_env_key_and_oversized_env_are_rejected() {
        let mut spec = JobSpec::command(["true"]);
        spec.env.insert("1BAD".into(), EnvValue::Plain("x".into()));
        assert_eq!(spec.validate().unwrap_err().field, "env.1BAD");
        let mut spec = JobSpec::command(["true"]);
        spec.env
            .insert("BIG".into(), EnvValue::Plain("x".repeat(MAX_ENV_BYTES + 1)));
        assert_eq!(spec.validate().unwrap_err().field, "env");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let retry = RetryPolicy {
            backoff_secs: 2,
            ..RetryPolicy::default()
        };
        assert_eq!(retry.backoff_ms(1), 2_000);
        assert_eq!(retry.backoff_ms(2), 4_000);
        assert_eq!(retry.backoff_ms(3), 8_000);
        assert_eq!(retry.backoff_ms(30), 3_600_000);
    }

    #[test]
    fn retry_on_exit_codes_limits_which_failures_retry() {
        let retry = RetryPolicy {
            retry_on_exit_codes: vec![75],
            ..RetryPolicy::default()
        };
        assert!(retry.retries_exit_code(Some(75)));
        assert!(!retry.retries_exit_code(Some(1)));
        assert!(RetryPolicy::default().retries_exit_code(Some(1)));
    }

    #[test]
    fn fit_respects_gpu_model() {
        let want = Resources {
            gpus: 1,
            gpu_model: Some("A10G".into()),
            ..Resources::default()
        };
        let mut free = Resources {
            cpu_millis: 4000,
            memory_mib: 8192,
            gpus: 1,
            disk_gib: 10,
            gpu_model: Some("T4".into()),
        };
        assert!(!want.fits_in(&free));
        free.gpu_model = Some("A10G".into());
        assert!(want.fits_in(&free));
    }
}
