//! The command line (clap derive). Parsing only: the commands live in
//! [`crate::commands`].

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use drover_proto::model::JobState;

use crate::human::parse_timeout_secs;

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Submit and watch jobs on a Drover fleet; run one locally with `drover dev`",
    after_help = "The coordinator address, token and CA file come from --addr/--token/--ca-file, \
                  then DROVER_ADDR/DROVER_TOKEN/DROVER_TLS_CA_FILE, then a cli.toml file ($DROVER_CONFIG, \
                  .drover/cli.toml here or in a parent directory, \
                  ~/.config/drover/cli.toml)."
)]
pub struct Cli {
    /// Coordinator HTTP URL, e.g. http://127.0.0.1:7080 [env: DROVER_ADDR]
    #[arg(long, global = true, value_name = "URL")]
    pub addr: Option<String>,
    /// API token [env: DROVER_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust besides the public roots, for a
    /// coordinator with a privately issued certificate [env: DROVER_TLS_CA_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// More diagnostics on stderr (-v, -vv); DROVER_LOG takes a tracing filter
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job (`drover submit [flags] -- CMD ARGS...`) or a spec file (`-f`)
    Submit(Box<SubmitArgs>),
    /// List jobs
    Jobs(JobsArgs),
    /// Show a job (spec, state, attempts, events timeline) or a workflow run
    /// (its steps and jobs)
    Show {
        /// Job id or run id
        #[arg(value_name = "JOB|RUN")]
        id: String,
    },
    /// Print a job's logs
    Logs(LogsArgs),
    /// Cancel a job, or every unfinished step of a workflow run (running
    /// jobs are stopped by their agent)
    Cancel {
        /// Job id or run id
        #[arg(value_name = "JOB|RUN")]
        id: String,
    },
    /// Run a finished job again as a new attempt
    Retry {
        /// Job id
        job: String,
    },
    /// Run a workflow file (steps of jobs with dependencies, arrays and
    /// artifacts passed between steps) and follow it to the end
    Run(RunArgs),
    /// List workflow runs, newest first
    Runs(RunsArgs),
    /// List agents
    Agents,
    /// Drain an agent: it stops claiming, finishes its jobs and leaves
    Drain {
        /// Agent id
        agent: String,
    },
    /// Download a job's artifact (what it wrote to its output directory)
    Artifacts {
        #[command(subcommand)]
        action: ArtifactsAction,
    },
    /// List pools, or pause/resume one
    Pools {
        #[command(subcommand)]
        action: Option<PoolsAction>,
    },
    /// Run a coordinator and local agents in this process (loopback only)
    Dev(DevArgs),
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsAction {
    /// Download the artifact of a job's latest attempt (tar + zstd), or
    /// unpack it with -x
    Get {
        /// A job id, or a workflow run's step: RUN/STEP, or RUN/STEP/INDEX
        /// for a task of an array step
        #[arg(value_name = "JOB|RUN/STEP[/INDEX]")]
        target: String,
        /// Archive file to write [default: <job>.tar.zst]; `-` writes stdout
        #[arg(
            short = 'o',
            long = "output",
            value_name = "FILE",
            conflicts_with = "extract"
        )]
        output: Option<PathBuf>,
        /// Unpack into this directory instead of keeping the archive
        #[arg(short = 'x', long = "extract", value_name = "DIR")]
        extract: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolsAction {
    /// Stop handing out the pool's jobs (queued jobs stay queued)
    Pause { pool: String },
    /// Hand out the pool's jobs again
    Resume { pool: String },
}

#[derive(Debug, Default, Args)]
pub struct SubmitArgs {
    /// A JobSpec (YAML or JSON), or `{jobs: [...]}` for a batch; `-` reads stdin.
    /// Flags given with -f override the file's fields
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub pool: Option<String>,
    /// Container image (docker runtime)
    #[arg(long)]
    pub image: Option<String>,
    /// Environment variable (repeatable)
    #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Secret environment variable: reaches the job, never shown or logged (repeatable)
    #[arg(long = "secret-env", value_name = "K=V", value_parser = parse_key_value)]
    pub secret_env: Vec<(String, String)>,
    /// CPU in millicores (1000 = one core)
    #[arg(long, value_name = "MILLICORES")]
    pub cpu: Option<u32>,
    /// Cap the job at --cpu (a CFS quota); by default the CPU request is a
    /// weight and the job may use idle CPU
    #[arg(long)]
    pub cpu_hard_limit: bool,
    /// Memory in MiB
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Whole GPUs
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Wall-clock limit of one attempt: 90s, 10m, 1h30m
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout_secs)]
    pub timeout: Option<u64>,
    /// Retries after a failed attempt (max_attempts = N + 1)
    #[arg(long, value_name = "N", conflicts_with = "max_attempts")]
    pub retries: Option<u32>,
    /// Attempts in all, the first included
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Higher runs first
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// A repeat submit with the same key returns the existing job
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Agent label the job needs (repeatable)
    #[arg(long = "constraint", value_name = "K=V", value_parser = parse_key_value)]
    pub constraints: Vec<(String, String)>,
    /// Working directory (absolute)
    #[arg(long)]
    pub workdir: Option<String>,
    /// Keep what the job writes to its output directory (/output,
    /// $DROVER_OUTPUT_DIR) for `drover artifacts get` and later jobs' inputs
    #[arg(long)]
    pub outputs: bool,
    /// When the Docker runtime pulls the image: always or if-not-present
    /// [default: always for :latest and untagged, else if-not-present]
    #[arg(long = "pull", value_name = "POLICY")]
    pub pull_policy: Option<drover_proto::model::PullPolicy>,
    /// Another job's artifact, unpacked read-only at /input/NAME
    /// ($DROVER_INPUT_DIR/NAME) before this job starts (repeatable)
    #[arg(long = "input", value_name = "NAME=JOB", value_parser = parse_key_value)]
    pub inputs: Vec<(String, String)>,
    /// Follow the job: progress on stderr, logs on stdout; exit with its exit code
    #[arg(long)]
    pub wait: bool,
    /// The program and its arguments (after `--`)
    #[arg(value_name = "CMD", trailing_var_arg = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state (queued, running, failed, ...)
    #[arg(long, value_parser = parse_state)]
    pub state: Option<JobState>,
    #[arg(long)]
    pub pool: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs per page
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Every page, not just the first
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The workflow file (YAML or JSON): `name`, `steps`; `-` reads stdin
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the run id and return instead of following the run
    #[arg(short, long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Runs per page
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Every page, not just the first
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Job id
    pub job: String,
    /// Keep streaming until the attempt ends
    #[arg(short, long)]
    pub follow: bool,
    /// Which attempt (default: the latest)
    #[arg(long)]
    pub attempt: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Holds the database, blobs, agent work dirs and cli.toml
    #[arg(long, default_value = ".drover", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Local agents to start
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub agents: u32,
    /// Run a few demo jobs, show them, then exit
    #[arg(long)]
    pub demo: bool,
    /// HTTP API port (default: any free port)
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Agent gRPC port (default: any free port)
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// How the local agents run jobs: `process` (host shell commands, the
    /// default here), `docker` (every job needs an `image`), or `auto`
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: drover_agent::config::RuntimeChoice,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse()
        .map_err(|e: drover_proto::model::FieldError| e.message)
}

/// `K=V` → `(K, V)`; the value may contain `=`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_the_command_after_flags() {
        let cli = parse(&["submit", "--name", "x", "--", "sh", "-c", "echo hi"]);
        let Command::Submit(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.name.as_deref(), Some("x"));
        assert_eq!(args.command, ["sh", "-c", "echo hi"]);
        let cli = parse(&["submit", "echo", "-n", "hi"]);
        let Command::Submit(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.command, ["echo", "-n", "hi"]);
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = parse(&[
            "jobs",
            "--json",
            "--addr",
            "http://x:1",
            "--state",
            "running",
        ]);
        assert!(cli.json);
        assert_eq!(cli.addr.as_deref(), Some("http://x:1"));
        let Command::Jobs(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.state, Some(JobState::Running));
        assert_eq!(args.limit, 50);
    }

    #[test]
    fn run_takes_a_file_and_detach() {
        let cli = parse(&["run", "calc.yaml", "--detach", "--json"]);
        assert!(cli.json);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.file, PathBuf::from("calc.yaml"));
        assert!(args.detach);
        let cli = parse(&["runs", "--limit", "5"]);
        let Command::Runs(args) = cli.command else {
            panic!()
        };
        assert_eq!((args.limit, args.all), (5, false));
        let cli = parse(&["artifacts", "get", "01RUN/divide/1", "-x", "out"]);
        let Command::Artifacts {
            action: ArtifactsAction::Get {
                target, extract, ..
            },
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(target, "01RUN/divide/1");
        assert_eq!(extract, Some(PathBuf::from("out")));
    }

    #[test]
    fn key_values_split_at_the_first_equals() {
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_key_value("A="), Ok(("A".into(), String::new())));
        assert!(parse_key_value("A").is_err());
        assert!(parse_key_value("=v").is_err());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let err = Cli::try_parse_from(["drover", "submit", "--timeout", "soon", "--", "true"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err =
            Cli::try_parse_from(["drover", "submit", "--retries", "1", "--max-attempts", "2"])
                .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
