//! `drover-agent`: parse flags and env, load agent.toml, validate, init
//! tracing, then run until SIGTERM/SIGINT, which start a drain.
//! `drover-agent bootstrap` writes agent.toml on an EC2 instance at boot;
//! `drover-agent fence-check` is the host-side fence a systemd timer runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use drover_agent::bootstrap::{self, TokenSource};
use drover_agent::AgentConfig;

#[derive(Debug, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "Drover agent: claims jobs from a coordinator and runs them"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file; flags and DROVER_* env override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator gRPC URL, e.g. http://127.0.0.1:7070 or https://….
    #[arg(long, env = "DROVER_COORDINATOR")]
    coordinator: Option<String>,
    /// PEM CA certificate(s) to trust besides the public roots (a
    /// coordinator with a privately issued certificate).
    #[arg(long, env = "DROVER_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// The pool's join token.
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    #[arg(long, env = "DROVER_POOL")]
    pool: Option<String>,
    /// Stable id of this agent (default: hostname).
    #[arg(long, env = "DROVER_AGENT_ID")]
    agent_id: Option<String>,
    #[arg(long, env = "DROVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Health HTTP address (port 0 picks a free port).
    #[arg(long, env = "DROVER_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Bearer token for POST /drain from non-loopback peers.
    #[arg(long, env = "DROVER_HEALTH_TOKEN", hide_env_values = true)]
    health_token: Option<String>,
    /// Job slots (default: number of CPUs).
    #[arg(long, env = "DROVER_MAX_JOBS")]
    max_jobs: Option<u32>,
    #[arg(long, env = "DROVER_CPU_MILLIS")]
    cpu_millis: Option<u32>,
    #[arg(long, env = "DROVER_MEMORY_MIB")]
    memory_mib: Option<u64>,
    #[arg(long, env = "DROVER_RESERVE_CPU_MILLIS")]
    reserve_cpu_millis: Option<u32>,
    #[arg(long, env = "DROVER_RESERVE_MEMORY_MIB")]
    reserve_memory_mib: Option<u64>,
    /// Extra agent labels, KEY=VALUE (repeatable or comma-separated).
    #[arg(long = "label", env = "DROVER_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    #[arg(long, env = "DROVER_KILL_GRACE_MS")]
    kill_grace_ms: Option<u64>,
    #[arg(long, env = "DROVER_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    /// Drain and exit after idle_timeout_ms with nothing running.
    #[arg(long, env = "DROVER_EXIT_WHEN_IDLE", num_args = 0..=1, default_missing_value = "true")]
    exit_when_idle: Option<bool>,
    #[arg(long, env = "DROVER_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    #[arg(long, env = "DROVER_CLAIM_WAIT_MS")]
    claim_wait_ms: Option<u64>,
    /// auto (docker when the Engine answers, else process), docker or process.
    #[arg(long, env = "DROVER_RUNTIME", value_enum)]
    runtime: Option<drover_agent::config::RuntimeChoice>,
    /// auto (ECS metadata → fargate; EC2 IMDS → ec2; else local), ec2,
    /// fargate or local.
    #[arg(long, env = "DROVER_PLATFORM", value_enum)]
    platform: Option<drover_agent::config::PlatformChoice>,
    /// EC2 instance metadata service base URL.
    #[arg(long, env = "DROVER_IMDS_ENDPOINT")]
    imds_endpoint: Option<String>,
    /// AWS API endpoint override (a local emulator); unset = AWS.
    #[arg(long, env = "DROVER_AWS_ENDPOINT")]
    aws_endpoint: Option<String>,
    /// ec2 (ASG) / fargate: terminate the instance or end the task when idle.
    #[arg(long, env = "DROVER_IDLE_TERMINATE", num_args = 0..=1, default_missing_value = "true")]
    idle_terminate: Option<bool>,
    /// ec2 (ASG): protect the instance from scale-in while jobs run.
    #[arg(long, env = "DROVER_SCALE_IN_PROTECTION", num_args = 0..=1, default_missing_value = "true")]
    scale_in_protection: Option<bool>,
    #[arg(long, env = "DROVER_PROTECTION_DEBOUNCE_MS")]
    protection_debounce_ms: Option<u64>,
    /// How often IMDS is polled for spot notices and lifecycle states.
    #[arg(long, env = "DROVER_PLATFORM_POLL_MS")]
    platform_poll_ms: Option<u64>,
    /// Stop running jobs this long before a spot or Fargate stop deadline.
    #[arg(long, env = "DROVER_INTERRUPT_MARGIN_MS")]
    interrupt_margin_ms: Option<u64>,
    /// Fargate: the task's stop timeout.
    #[arg(long, env = "DROVER_STOP_TIMEOUT_MS")]
    stop_timeout_ms: Option<u64>,
    /// ec2: the ASG's terminating lifecycle hook to complete.
    #[arg(long, env = "DROVER_LIFECYCLE_HOOK")]
    lifecycle_hook: Option<String>,
    #[arg(long, env = "DROVER_LIFECYCLE_HEARTBEAT_MS")]
    lifecycle_heartbeat_ms: Option<u64>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Configure this EC2 instance's agent from its Auto Scaling group's tags
    /// (run from user-data): reads IMDS, fetches the join token, writes
    /// agent.toml; on failure marks the instance Unhealthy and exits 1.
    Bootstrap(Box<BootstrapArgs>),
    /// The host-side fence, run by a systemd timer: once the deadline the
    /// agent writes on every heartbeat has passed, SIGKILL this agent's job
    /// containers and process groups. Reads the agent's own settings
    /// (--config, --data-dir, --agent-id, --runtime before the subcommand,
    /// or DROVER_*); exits 1 when something could not be killed.
    FenceCheck(FenceCheckArgs),
}

#[derive(Debug, clap::Args)]
struct FenceCheckArgs {
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct BootstrapArgs {
    /// Where to write the agent's configuration (mode 0600, replaced atomically).
    #[arg(long, env = "DROVER_BOOTSTRAP_OUTPUT", default_value = bootstrap::DEFAULT_OUTPUT)]
    output: PathBuf,
    /// Coordinator gRPC URL [default: instance tag drover:coordinator].
    #[arg(long, env = "DROVER_COORDINATOR")]
    coordinator: Option<String>,
    /// [default: instance tag drover:pool]
    #[arg(long, env = "DROVER_POOL")]
    pool: Option<String>,
    /// SSM parameter holding the join token [default: instance tag
    /// drover:join-token-parameter].
    #[arg(
        long,
        env = "DROVER_JOIN_TOKEN_PARAMETER",
        conflicts_with = "join_token_secret"
    )]
    join_token_parameter: Option<String>,
    /// Secrets Manager secret holding the join token [default: instance tag
    /// drover:join-token-secret].
    #[arg(long, env = "DROVER_JOIN_TOKEN_SECRET")]
    join_token_secret: Option<String>,
    /// The group's terminating lifecycle hook [default: instance tag
    /// drover:lifecycle-hook].
    #[arg(long, env = "DROVER_LIFECYCLE_HOOK")]
    lifecycle_hook: Option<String>,
    /// The agent's data directory, written to agent.toml.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = bootstrap::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// EC2 instance metadata service base URL.
    #[arg(
        long,
        env = "DROVER_IMDS_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    imds_endpoint: String,
    /// AWS API endpoint override (a local emulator); unset = AWS.
    #[arg(long, env = "DROVER_AWS_ENDPOINT")]
    aws_endpoint: Option<String>,
    /// On failure, mark the instance Unhealthy in its Auto Scaling group so
    /// the group replaces it.
    #[arg(long, env = "DROVER_BOOTSTRAP_MARK_UNHEALTHY", default_value_t = true, action = clap::ArgAction::Set)]
    mark_unhealthy: bool,
    /// Do nothing but fail with REASON (marking the instance Unhealthy): for
    /// user-data steps after bootstrap, e.g. the service not starting.
    #[arg(long, value_name = "REASON")]
    fail: Option<String>,
}

impl BootstrapArgs {
    fn into_options(self) -> bootstrap::Options {
        let token = match (self.join_token_parameter, self.join_token_secret) {
            (Some(p), _) => Some(TokenSource::Parameter(p)),
            (None, Some(s)) => Some(TokenSource::Secret(s)),
            (None, None) => None,
        };
        bootstrap::Options {
            imds_endpoint: self.imds_endpoint,
            aws_endpoint: self.aws_endpoint,
            output: self.output,
            data_dir: self.data_dir,
            overrides: bootstrap::Overrides {
                coordinator: self.coordinator,
                pool: self.pool,
                token,
                lifecycle_hook: self.lifecycle_hook,
            },
            mark_unhealthy: self.mark_unhealthy,
            fail: self.fail,
        }
    }
}

/// `drover-agent bootstrap`: one line on stdout when it worked; the error,
/// and what became of the instance, on stderr and exit 1 when not.
async fn bootstrap(args: BootstrapArgs) -> ExitCode {
    init_tracing(std::io::stderr);
    match bootstrap::run(&args.into_options()).await {
        Ok(b) => {
            println!(
                "drover-agent bootstrap: wrote {} for instance {} (pool {}, coordinator {})",
                b.path.display(),
                b.instance_id,
                b.settings.pool,
                b.settings.coordinator
            );
            ExitCode::SUCCESS
        }
        Err(failed) => {
            eprintln!("drover-agent bootstrap: {failed}");
            ExitCode::FAILURE
        }
    }
}

/// `drover-agent fence-check`: what it found and killed on stdout (text or
/// JSON), logs on stderr; exit 1 when the deadline cannot be read or
/// something could not be killed.
async fn fence_check(config: AgentConfig, args: FenceCheckArgs) -> anyhow::Result<ExitCode> {
    init_tracing(std::io::stderr);
    let report = drover_agent::fence::check(&config).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn init_tracing<W>(writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

impl Args {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let mut c = match &self.config {
            Some(path) => AgentConfig::from_toml_file(path)?,
            None => AgentConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            coordinator,
            join_token,
            pool,
            agent_id,
            data_dir,
            health_addr,
            max_jobs
        );
        set!(
            reserve_cpu_millis,
            reserve_memory_mib,
            kill_grace_ms,
            drain_timeout_ms
        );
        set!(exit_when_idle, idle_timeout_ms, claim_wait_ms, runtime);
        set!(
            platform,
            imds_endpoint,
            idle_terminate,
            scale_in_protection,
            protection_debounce_ms
        );
        set!(
            platform_poll_ms,
            interrupt_margin_ms,
            stop_timeout_ms,
            lifecycle_heartbeat_ms
        );
        c.tls_ca_file = self.tls_ca_file.or(c.tls_ca_file);
        c.aws_endpoint = self.aws_endpoint.or(c.aws_endpoint);
        c.lifecycle_hook = self.lifecycle_hook.or(c.lifecycle_hook);
        c.cpu_millis = self.cpu_millis.or(c.cpu_millis);
        c.memory_mib = self.memory_mib.or(c.memory_mib);
        c.health_token = self.health_token.or(c.health_token);
        let extra: BTreeMap<String, String> = self
            .labels
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| {
                        format!("label {l:?} is not KEY=VALUE (--label / DROVER_LABELS)")
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        c.labels.extend(extra);
        Ok(c)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Command::Bootstrap(b)) => return Ok(bootstrap(*b).await),
        // The agent's own settings, unvalidated: it needs no join token.
        Some(Command::FenceCheck(f)) => return fence_check(args.into_config()?, f).await,
        None => {}
    }
    let config = args.into_config()?;
    config.validate()?;
    init_tracing(std::io::stdout);
    drover_agent::run(config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or SIGINT: in production SIGTERM means drain.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}
