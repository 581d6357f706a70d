//! Coordinator configuration: a TOML file, `DROVER_*` environment overrides
//! and flags (applied by `main.rs`), then [`Config::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;

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
        }
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
            grpc_addr: "127.0.0.1:7070".parse().expect("valid literal"),
            http_addr: "127.0.0.1:7080".parse().expect("valid literal"),
            join_tokens: Vec::new(),
            api_tokens: Vec::new(),
            heartbeat_interval_ms: 10_000,
            session_ttl_ms: 60_000,
            pools: Vec::new(),
            clock_skew_ms: 5_000,
            start_deadline_ms: 15 * 60_000,
            timeout_grace_ms: 30_000,
            reaper_interval_ms: 1_000,
            claim_scan_limit: 64,
            max_claim_wait_ms: 30_000,
            kill_grace_ms: 10_000,
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
            let table = &self.dynamodb.table;
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
            if self.dynamodb.retention_days == 0 {
                return Err(config_error(
                    "dynamodb.retention_days",
                    "must be at least 1",
                ));
            }
            if !(1..=64).contains(&self.dynamodb.queue_shards) {
                return Err(config_error("dynamodb.queue_shards", "must be 1 to 64"));
            }
        }
        if self.claim_scan_limit == 0 {
            return Err(config_error("claim_scan_limit", "must be above 0"));
        }
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
    fn ttl_below_three_heartbeats_is_rejected() {
        let mut config = Config::dev("/tmp/x");
        config.session_ttl_ms = 2 * config.heartbeat_interval_ms;
        assert_eq!(config.validate().unwrap_err().field, "session_ttl_ms");
    }

    #[test]
    fn scopes_imply_lesser_scopes() {
        assert!(Scope::Admin.allows(Scope::Submit));
        assert!(Scope::Submit.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Submit));
        assert!(!Scope::Submit.allows(Scope::Admin));
    }
}
