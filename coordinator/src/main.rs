use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_coordinator::{ApiTokenConfig, BlobKind, Config, JoinTokenConfig, Scope, StoreKind};

/// Drover's coordinator: leases jobs to agents over gRPC, serves the HTTP API.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the SQLite store and log blobs.
    #[arg(long, env = "DROVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "DROVER_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    #[arg(long, env = "DROVER_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// A join token for agents of any pool (added to the file's).
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// An API token with the admin scope (added to the file's).
    #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    #[arg(long, env = "DROVER_SESSION_TTL_MS")]
    session_ttl_ms: Option<u64>,
    /// Once listening, write `{"grpc_addr": …, "http_addr": …}` here (useful
    /// with port 0).
    #[arg(long, env = "DROVER_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Store backend: sqlite (default) or dynamodb.
    #[arg(long, env = "DROVER_STORE")]
    store: Option<StoreKind>,
    /// DynamoDB table name (store = dynamodb).
    #[arg(long, env = "DROVER_DYNAMODB_TABLE")]
    dynamodb_table: Option<String>,
    /// DynamoDB endpoint other than AWS's (a local emulator).
    #[arg(long, env = "DROVER_DYNAMODB_ENDPOINT")]
    dynamodb_endpoint: Option<String>,
    /// Tries per DynamoDB call, the first included (dynamodb.max_attempts;
    /// default: AWS_MAX_ATTEMPTS, else 8).
    #[arg(long, env = "DROVER_DYNAMODB_MAX_ATTEMPTS")]
    dynamodb_max_attempts: Option<u32>,
    /// Blob store for logs and artifacts: local (default) or s3.
    #[arg(long, env = "DROVER_BLOBS")]
    blobs: Option<BlobKind>,
    /// S3 bucket of logs and artifacts (blobs = s3).
    #[arg(long, env = "DROVER_S3_BUCKET")]
    s3_bucket: Option<String>,
    /// Key prefix of every object in the bucket (default `drover/`).
    #[arg(long, env = "DROVER_S3_PREFIX")]
    s3_prefix: Option<String>,
    /// S3 endpoint other than AWS's (a local emulator).
    #[arg(long, env = "DROVER_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Region of the bucket (default: the AWS chain's).
    #[arg(long, env = "DROVER_S3_REGION")]
    s3_region: Option<String>,
    /// Path-style S3 URLs (`endpoint/bucket/key`), for emulators.
    #[arg(long, env = "DROVER_S3_FORCE_PATH_STYLE")]
    s3_force_path_style: Option<bool>,
    /// Bytes of an attempt's output per S3 log object (s3.log_segment_bytes).
    #[arg(long, env = "DROVER_S3_LOG_SEGMENT_BYTES")]
    s3_log_segment_bytes: Option<usize>,
    /// Longest buffered output waits before it is written to S3
    /// (s3.log_flush_ms).
    #[arg(long, env = "DROVER_S3_LOG_FLUSH_MS")]
    s3_log_flush_ms: Option<u64>,
    /// Tries per S3 call, the first included (s3.max_attempts; default:
    /// AWS_MAX_ATTEMPTS, else 8).
    #[arg(long, env = "DROVER_S3_MAX_ATTEMPTS")]
    s3_max_attempts: Option<u32>,
    /// Auto Scaling and ECS endpoint other than AWS's, for the scaler (a
    /// local emulator).
    #[arg(long, env = "DROVER_AWS_ENDPOINT")]
    aws_endpoint: Option<String>,
    /// Region of the scaler's AWS calls (default: the AWS chain's).
    #[arg(long, env = "DROVER_AWS_REGION")]
    aws_region: Option<String>,
    /// The HTTP base URL agents and the CLI use to reach this coordinator
    /// (signed artifact URLs start with it).
    #[arg(long, env = "DROVER_PUBLIC_URL")]
    public_url: Option<String>,
    /// PEM certificate chain; with --tls-key-file both listeners serve TLS
    /// only.
    #[arg(long, env = "DROVER_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of the certificate in --tls-cert-file.
    #[arg(long, env = "DROVER_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the DynamoDB table, its indexes and TTL, then exit.
    InitTable,
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = &args.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = args.grpc_addr {
        config.grpc_addr = v;
    }
    if let Some(v) = args.http_addr {
        config.http_addr = v;
    }
    if let Some(v) = &args.public_url {
        config.public_url = Some(v.clone());
    }
    if let Some(v) = &args.tls_cert_file {
        config.tls_cert_file = Some(v.clone());
    }
    if let Some(v) = &args.tls_key_file {
        config.tls_key_file = Some(v.clone());
    }
    if let Some(token) = &args.join_token {
        config.join_tokens.push(JoinTokenConfig {
            token: token.clone(),
            pool: None,
        });
    }
    if let Some(token) = &args.admin_token {
        config.api_tokens.push(ApiTokenConfig {
            token: token.clone(),
            scopes: vec![Scope::Admin],
        });
    }
    if let Some(v) = args.heartbeat_interval_ms {
        config.heartbeat_interval_ms = v;
    }
    if let Some(v) = args.session_ttl_ms {
        config.session_ttl_ms = v;
    }
    if let Some(v) = args.store {
        config.store = v;
    }
    if let Some(v) = &args.dynamodb_table {
        config.dynamodb.table = v.clone();
    }
    if let Some(v) = &args.dynamodb_endpoint {
        config.dynamodb.endpoint = Some(v.clone());
    }
    if let Some(v) = args.dynamodb_max_attempts {
        config.dynamodb.max_attempts = Some(v);
    }
    if let Some(v) = args.blobs {
        config.blobs = v;
    }
    if let Some(v) = &args.s3_bucket {
        config.s3.bucket = v.clone();
    }
    if let Some(v) = &args.s3_prefix {
        config.s3.prefix = v.clone();
    }
    if let Some(v) = &args.s3_endpoint {
        config.s3.endpoint = Some(v.clone());
    }
    if let Some(v) = &args.s3_region {
        config.s3.region = Some(v.clone());
    }
    if let Some(v) = args.s3_force_path_style {
        config.s3.force_path_style = v;
    }
    if let Some(v) = args.s3_log_segment_bytes {
        config.s3.log_segment_bytes = v;
    }
    if let Some(v) = args.s3_log_flush_ms {
        config.s3.log_flush_ms = v;
    }
    if let Some(v) = args.s3_max_attempts {
        config.s3.max_attempts = Some(v);
    }
    if let Some(v) = &args.aws_endpoint {
        config.aws.endpoint = Some(v.clone());
    }
    if let Some(v) = &args.aws_region {
        config.aws.region = Some(v.clone());
    }
    Ok(config)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = load(&args)?;
    if let Some(Command::InitTable) = args.command {
        config.dynamodb.validate()?;
        return drover_coordinator::init_table(&config.dynamodb).await;
    }
    config.validate()?;
    let server = drover_coordinator::Server::start(config).await?;
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "grpc_addr": server.grpc_addr().to_string(),
            "http_addr": server.http_addr().to_string(),
        });
        std::fs::write(path, ready.to_string())
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}
