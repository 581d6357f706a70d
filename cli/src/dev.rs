//! `drover dev`: a coordinator (SQLite + local blobs, loopback only) and N
//! local agents in this process, plus a `cli.toml` so the other commands
//! work from this directory. `--demo` runs a few jobs through the HTTP API
//! with the same [`Client`] the commands use, then exits.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use drover_agent::{Agent, AgentConfig};
use drover_coordinator::{Config, Scope, Server};
use drover_proto::model::{EnvValue, Job, JobSpec, JobState, SubmitRequest};

use crate::args::DevArgs;
use crate::client::Client;
use crate::config::{self, FileConfig};
use crate::error::{UsageError, EXIT_ERROR, EXIT_OK};
use crate::human;
use crate::table::Table;

/// Running jobs get this long when `drover dev` stops before they are
/// interrupted (and requeued).
const DEV_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// The whole demo must finish within this.
const DEMO_DEADLINE: Duration = Duration::from_secs(120);
const DEMO_POLL: Duration = Duration::from_millis(250);

pub async fn run(
    args: DevArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<i32> {
    if args.demo && args.agents == 0 {
        return Err(UsageError::new("--demo needs at least one agent (--agents 1 or more)").into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;

    let mut coordinator_config = Config::dev(&data_dir);
    if let Some(port) = args.http_port {
        coordinator_config.http_addr.set_port(port);
    }
    if let Some(port) = args.grpc_port {
        coordinator_config.grpc_addr.set_port(port);
    }
    let join_token = coordinator_config
        .join_tokens
        .first()
        .map(|t| t.token.clone())
        .context("the dev config has no join token")?;
    let admin_token = coordinator_config
        .api_tokens
        .iter()
        .find(|t| t.scopes.contains(&Scope::Admin))
        .map(|t| t.token.clone())
        .context("the dev config has no admin token")?;

    let server = Server::start(coordinator_config)
        .await
        .context("starting the coordinator")?;
    let http_url = format!("http://{}", server.http_addr());
    let grpc_url = format!("http://{}", server.grpc_addr());

    let mut agents = Vec::new();
    for n in 1..=args.agents {
        let agent_config = AgentConfig {
            coordinator: grpc_url.clone(),
            join_token: join_token.clone(),
            data_dir: data_dir.join(format!("agent-{n}")),
            health_addr: "127.0.0.1:0".parse().expect("valid literal"),
            agent_id: format!("dev-{n}"),
            drain_timeout_ms: DEV_DRAIN_TIMEOUT_MS,
            runtime: args.runtime,
            ..AgentConfig::default()
        };
        match Agent::start(agent_config).await {
            Ok(agent) => agents.push(agent),
            Err(err) => {
                stop(agents, server).await;
                return Err(err.context(format!("starting agent dev-{n}")));
            }
        }
    }

    let cli_toml = cli_toml_path(&data_dir);
    config::write_file(
        &cli_toml,
        &FileConfig {
            addr: Some(http_url.clone()),
            token: Some(admin_token.clone()),
            ca_file: None,
        },
    )?;
    let client = Client::new(&http_url, Some(admin_token))?;
    print_banner(
        &http_url, &grpc_url, &agents, &data_dir, &cli_toml, args.demo,
    );

    let mut shutdown = Box::pin(shutdown);
    let code = if args.demo {
        tokio::select! {
            result = demo(&client, &data_dir, args.agents) => match result {
                Ok(true) => EXIT_OK,
                Ok(false) => EXIT_ERROR,
                Err(err) => {
                    eprintln!("{}", crate::error::render(&err.context("demo")));
                    EXIT_ERROR
                }
            },
            () = &mut shutdown => {
                eprintln!("demo interrupted");
                EXIT_ERROR
            }
        }
    } else {
        shutdown.await;
        EXIT_OK
    };

    if !agents.is_empty() {
        eprintln!(
            "stopping: draining agents (running jobs get up to {}; Ctrl-C again to quit now)",
            human::duration_ms(DEV_DRAIN_TIMEOUT_MS as i64)
        );
    }
    stop(agents, server).await;
    Ok(code)
}

/// Drains the agents (they finish or interrupt their jobs and leave), then
/// stops the coordinator. A second Ctrl-C skips the wait.
async fn stop(agents: Vec<Agent>, server: Server) {
    for agent in &agents {
        agent.drain("drover dev is stopping");
    }
    let waits = futures::future::join_all(agents.into_iter().map(Agent::wait));
    tokio::select! {
        results = waits => {
            for result in results {
                if let Err(err) = result {
                    eprintln!("warning: an agent stopped with an error: {err:#}");
                }
            }
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("not waiting for the agents");
        }
    }
    if let Err(err) = server.shutdown().await {
        eprintln!("warning: the coordinator stopped with an error: {err:#}");
    }
}

fn print_banner(
    http_url: &str,
    grpc_url: &str,
    agents: &[Agent],
    data_dir: &Path,
    cli_toml: &Path,
    demo: bool,
) {
    let mut out = String::new();
    out.push_str(&format!(
        "drover dev: a coordinator and {} local agent(s), data in {}\n\n",
        agents.len(),
        data_dir.display()
    ));
    let mut table = Table::new([
        "  HTTP API",
        http_url,
        "(also /health, /metrics, /v1/openapi.json)",
    ]);
    table.row(["  agent gRPC", grpc_url, ""]);
    for (n, agent) in agents.iter().enumerate() {
        table.row([
            format!("  agent dev-{}", n + 1),
            format!("http://{}/health", agent.health_addr()),
            String::new(),
        ]);
    }
    table.row([
        "  CLI config".to_string(),
        cli_toml.display().to_string(),
        "(address and admin token, readable only by you)".to_string(),
    ]);
    out.push_str(&table.render());
    if !demo {
        let found = std::env::current_dir()
            .ok()
            .and_then(|cwd| config::find_file(&config::process_env, &cwd).ok().flatten());
        out.push_str("\nIn another terminal");
        if found.as_deref() == Some(cli_toml) {
            out.push_str(" in this directory:\n");
        } else {
            out.push_str(&format!(
                ":\n  export DROVER_CONFIG={}\n",
                cli_toml.display()
            ));
        }
        out.push_str(concat!(
            "  drover submit --wait -- sh -c 'echo hello from drover'\n",
            "  drover submit --name flaky --retries 2 -- sh -c 'exit 1'\n",
            "  drover run examples/calc.yaml   (a workflow: steps, arrays, artifacts)\n",
            "  drover jobs\n",
            "  drover show <job id>\n",
            "  drover agents\n",
            "  drover pools\n",
            "\nStop with Ctrl-C.\n",
        ));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// One demo job and what became of it.
struct Tracked {
    name: &'static str,
    id: Option<String>,
    job: Option<Job>,
    /// Why it never ran (a step it needed failed).
    skipped: Option<String>,
}

impl Tracked {
    fn done(&self) -> bool {
        self.skipped.is_some() || self.job.as_ref().is_some_and(|j| j.state.is_terminal())
    }
    fn succeeded(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.state == JobState::Succeeded)
    }
}

/// The demo: a two-step pipeline (generate numbers, then sum them: the
/// numbers pass as `generate`'s artifact, `sum`'s input), a job
/// with a secret env var, a job that fails once and succeeds on its retry,
/// and a high-priority job. True when they all succeeded and the secret
/// never showed up in the API's answers or the logs.
async fn demo(client: &Client, data_dir: &Path, agents: u32) -> anyhow::Result<bool> {
    wait_for_agents(client, agents).await?;
    let run_dir = data_dir.join("demo").join(human::now_ms().to_string());
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let secret = format!("s3cret-{}-{}", std::process::id(), human::now_ms());
    let specs = demo_specs(&run_dir, &secret);

    let mut tracked: Vec<Tracked> = specs
        .iter()
        .map(|(name, _)| Tracked {
            name,
            id: None,
            job: None,
            skipped: None,
        })
        .collect();
    let first: Vec<JobSpec> = specs
        .iter()
        .filter(|(name, _)| *name != "sum")
        .map(|(_, spec)| spec.clone())
        .collect();
    let sum_spec = specs
        .iter()
        .find(|(name, _)| *name == "sum")
        .map(|(_, spec)| spec.clone())
        .context("demo has no sum step")?;
    let response = client.submit(&SubmitRequest::Batch { jobs: first }).await?;
    let mut submitted = response.jobs.into_iter();
    for entry in tracked.iter_mut().filter(|t| t.name != "sum") {
        entry.id = submitted.next().map(|j| j.id);
    }
    println!(
        "\nsubmitted {} demo jobs; `sum` follows once `generate` succeeds\n",
        tracked.len() - 1
    );

    let mut progress = Progress::new();
    let deadline = tokio::time::Instant::now() + DEMO_DEADLINE;
    let mut interval = tokio::time::interval(DEMO_POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        for entry in tracked.iter_mut() {
            if let (Some(id), false) = (&entry.id, entry.done()) {
                entry.job = Some(client.get_job(id).await?);
            }
        }
        let generate = tracked
            .iter()
            .find(|t| t.name == "generate")
            .map(|t| (t.done(), t.succeeded()));
        let generate_id = tracked
            .iter()
            .find(|t| t.name == "generate")
            .and_then(|t| t.id.clone());
        if let Some(sum) = tracked
            .iter_mut()
            .find(|t| t.name == "sum" && t.id.is_none() && t.skipped.is_none())
        {
            match generate {
                Some((true, true)) => {
                    let mut spec = sum_spec.clone();
                    spec.inputs = generate_id
                        .iter()
                        .map(|job| drover_proto::model::InputSpec {
                            name: "numbers".into(),
                            job: job.clone(),
                        })
                        .collect();
                    sum.id = Some(client.submit_one(spec).await?)
                }
                Some((true, false)) => sum.skipped = Some("generate did not succeed".into()),
                _ => {}
            }
        }
        progress.show(&tracked);
        if tracked.iter().all(Tracked::done) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            progress.finish();
            let waiting: Vec<String> = tracked
                .iter()
                .filter(|t| !t.done())
                .map(|t| {
                    format!(
                        "{} ({})",
                        t.name,
                        t.job
                            .as_ref()
                            .map_or("not submitted".into(), |j| j.state.to_string())
                    )
                })
                .collect();
            anyhow::bail!(
                "demo jobs did not finish within {}: {} (is an agent running? see `drover agents`)",
                human::duration_ms(DEMO_DEADLINE.as_millis() as i64),
                waiting.join(", ")
            );
        }
    }
    progress.finish();

    println!();
    print!("{}", demo_results(&tracked));
    if let Some(sum) = tracked.iter().find(|t| t.name == "sum" && t.succeeded()) {
        if let Some(id) = &sum.id {
            let logs = client.read_logs(id, None).await?;
            println!("\nlogs of `sum` ({id}):");
            print!("{}", String::from_utf8_lossy(&logs));
        }
    }

    let mut ok = true;
    if let Some(id) = tracked
        .iter()
        .find(|t| t.name == "secret")
        .and_then(|t| t.id.clone())
    {
        let shown = serde_json::to_string(&client.get_job(&id).await?)?;
        let logs = client.read_logs(&id, None).await.unwrap_or_default();
        if shown.contains(&secret) || String::from_utf8_lossy(&logs).contains(&secret) {
            eprintln!(
                "error: the secret env value of job {id} appeared in the API's answer or its logs"
            );
            ok = false;
        } else {
            println!("\nthe `secret` job's value never appeared in the API's answers or its logs");
        }
    }
    let failed: Vec<String> = tracked
        .iter()
        .filter(|t| !t.succeeded())
        .map(|t| match (&t.job, &t.skipped) {
            (_, Some(why)) => format!("{} skipped ({why})", t.name),
            (Some(job), None) => format!(
                "{} {}{}",
                t.name,
                job.state,
                job.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
            (None, None) => format!("{} never submitted", t.name),
        })
        .collect();
    if !failed.is_empty() {
        eprintln!("error: demo failed: {}", failed.join("; "));
        ok = false;
    }
    if ok {
        println!("demo succeeded: all {} jobs SUCCEEDED", tracked.len());
    }
    Ok(ok)
}

/// Waits until the started agents show up as active (they register on
/// start, so this is normally immediate).
async fn wait_for_agents(client: &Client, agents: u32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = client.list_agents().await?;
        let active = list
            .agents
            .iter()
            .filter(|a| a.state == drover_proto::model::AgentState::Active)
            .count();
        if active >= agents as usize {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("only {active} of {agents} agent(s) registered within 30s");
        }
        tokio::time::sleep(DEMO_POLL).await;
    }
}

/// The demo's jobs, in display order. Plain `sh`, so they run anywhere the
/// process runtime does.
fn demo_specs(run_dir: &Path, secret: &str) -> Vec<(&'static str, JobSpec)> {
    let job = |name: &str, script: &str| {
        let mut spec = JobSpec::command(["sh", "-c", script]);
        spec.name = format!("demo-{name}");
        spec.env.insert(
            "DEMO_DIR".into(),
            EnvValue::Plain(run_dir.display().to_string()),
        );
        spec.timeout_secs = 60;
        spec
    };
    // `generate` keeps its output; `sum` gets it as its input `numbers`.
    let mut generate = job(
        "generate",
        r#"i=1; while [ $i -le 100 ]; do echo $i; i=$((i+1)); done > "$DROVER_OUTPUT_DIR/numbers.txt"
echo "wrote numbers 1..100 to its output directory""#,
    );
    generate.outputs = true;
    let mut secret_job = job(
        "secret",
        r#"if [ -z "$DEMO_TOKEN" ]; then echo "DEMO_TOKEN is missing" >&2; exit 1; fi
echo "got a secret of ${#DEMO_TOKEN} characters; its value stays out of the logs""#,
    );
    secret_job.env.insert(
        "DEMO_TOKEN".into(),
        EnvValue::Secret {
            value: secret.to_string(),
            secret: true,
        },
    );
    let mut flaky = job(
        "flaky",
        r#"if [ -e "$DEMO_DIR/flaky.marker" ]; then echo "marker found: succeeding on this attempt"; exit 0; fi
touch "$DEMO_DIR/flaky.marker"
echo "first attempt: failing on purpose (exit 3)" >&2; exit 3"#,
    );
    flaky.retry.max_attempts = 2;
    flaky.retry.backoff_secs = 1;
    let mut urgent = job(
        "urgent",
        r#"echo "priority 100: claimed ahead of the others""#,
    );
    urgent.priority = 100;
    let sum = job(
        "sum",
        r#"s=0; n=0; while read x; do s=$((s+x)); n=$((n+1)); done < "$DROVER_INPUT_DIR/numbers/numbers.txt"
echo "read $n numbers"; echo "sum = $s"
[ "$s" -eq 5050 ] || { echo "expected 5050" >&2; exit 1; }"#,
    );
    vec![
        ("generate", generate),
        ("sum", sum),
        ("secret", secret_job),
        ("flaky", flaky),
        ("urgent", urgent),
    ]
}

/// One line per demo job: name, state, attempt, duration.
fn progress_line(entry: &Tracked, now_ms: i64) -> String {
    let (state, attempt, duration) = match (&entry.job, &entry.skipped) {
        (_, Some(why)) => (format!("SKIPPED ({why})"), String::new(), String::new()),
        (None, None) => ("waiting".to_string(), String::new(), String::new()),
        (Some(job), None) => {
            let duration = job
                .started_at_ms
                .map(|start| human::duration_ms(job.finished_at_ms.unwrap_or(now_ms) - start))
                .unwrap_or_default();
            let attempt = if job.attempt > 0 {
                format!("attempt {}", job.attempt)
            } else {
                String::new()
            };
            (job.state.to_string(), attempt, duration)
        }
    };
    format!(
        "  {:<10} {:<10} {:<10} {}",
        entry.name, state, attempt, duration
    )
    .trim_end()
    .to_string()
}

/// Live progress on stderr: redrawn in place on a terminal, otherwise a
/// line whenever a job's state or attempt changes.
struct Progress {
    tty: bool,
    drawn_lines: usize,
    last: BTreeMap<&'static str, String>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            drawn_lines: 0,
            last: BTreeMap::new(),
        }
    }

    fn show(&mut self, tracked: &[Tracked]) {
        let now = human::now_ms();
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn_lines > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn_lines);
            }
            for entry in tracked {
                let _ = writeln!(err, "\x1b[2K{}", progress_line(entry, now));
            }
            self.drawn_lines = tracked.len();
        } else {
            for entry in tracked {
                let key = entry
                    .skipped
                    .clone()
                    .or_else(|| {
                        entry
                            .job
                            .as_ref()
                            .map(|j| format!("{} {}", j.state, j.attempt))
                    })
                    .unwrap_or_default();
                if self.last.get(entry.name) != Some(&key) {
                    let _ = writeln!(err, "{}", progress_line(entry, now));
                    self.last.insert(entry.name, key);
                }
            }
        }
        let _ = err.flush();
    }

    fn finish(&mut self) {
        self.drawn_lines = 0;
    }
}

fn demo_results(tracked: &[Tracked]) -> Table {
    let mut table = Table::new([
        "NAME", "ID", "STATE", "ATTEMPTS", "EXIT", "DURATION", "REASON",
    ]);
    for entry in tracked {
        let job = entry.job.as_ref();
        table.row([
            entry.name.to_string(),
            entry.id.clone().unwrap_or_default(),
            job.map(|j| j.state.to_string())
                .or_else(|| entry.skipped.as_ref().map(|_| "SKIPPED".to_string()))
                .unwrap_or_default(),
            job.map(|j| j.attempt.to_string()).unwrap_or_default(),
            job.and_then(|j| j.exit_code)
                .map(|c| c.to_string())
                .unwrap_or_default(),
            job.and_then(crate::commands::submit::run_duration)
                .unwrap_or_default(),
            job.and_then(|j| j.reason.clone())
                .or_else(|| entry.skipped.clone())
                .unwrap_or_default(),
        ]);
    }
    table
}

/// Where `drover dev` keeps the CLI config for `data_dir`.
pub fn cli_toml_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cli.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_specs_are_valid_and_keep_the_secret_secret() {
        let specs = demo_specs(Path::new("/tmp/demo"), "hunter2");
        assert_eq!(specs.len(), 5);
        for (name, spec) in &specs {
            spec.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.command[0], "sh");
        }
        let (_, secret) = specs.iter().find(|(n, _)| *n == "secret").unwrap();
        assert!(secret.env["DEMO_TOKEN"].is_secret());
        assert!(!serde_json::to_string(&secret.redacted())
            .unwrap()
            .contains("hunter2"));
        let (_, flaky) = specs.iter().find(|(n, _)| *n == "flaky").unwrap();
        assert_eq!(flaky.retry.max_attempts, 2);
        let (_, urgent) = specs.iter().find(|(n, _)| *n == "urgent").unwrap();
        assert!(specs
            .iter()
            .all(|(n, s)| *n == "urgent" || s.priority < urgent.priority));
    }

    #[test]
    fn demo_scripts_work_in_sh() {
        let dir = tempfile::tempdir().unwrap();
        let specs = demo_specs(dir.path(), "hunter2");
        let run = |name: &str| {
            let (_, spec) = specs.iter().find(|(n, _)| *n == name).unwrap();
            let mut command = std::process::Command::new(&spec.command[0]);
            command.args(&spec.command[1..]);
            for (key, value) in &spec.env {
                command.env(key, value.value());
            }
            command
                .env("DROVER_OUTPUT_DIR", dir.path().join("out"))
                .env("DROVER_INPUT_DIR", dir.path().join("in"));
            command.output().unwrap()
        };
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        std::os::unix::fs::symlink(&out, dir.path().join("in/numbers")).unwrap();
        assert!(run("generate").status.success());
        let sum = run("sum");
        assert!(sum.status.success());
        assert!(String::from_utf8_lossy(&sum.stdout).contains("sum = 5050"));
        let secret = run("secret");
        assert!(secret.status.success());
        assert!(!String::from_utf8_lossy(&secret.stdout).contains("hunter2"));
        assert_eq!(run("flaky").status.code(), Some(3));
        assert!(run("flaky").status.success());
    }

    #[test]
    fn progress_lines_show_state_attempt_and_duration() {
        let mut job = Job {
            id: "01J".into(),
            spec: JobSpec::command(["true"]),
            state: JobState::Running,
            attempt: 2,
            failures: 1,
            infra_retries: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            not_before_ms: None,
            session_id: None,
            agent_id: None,
            started_at_ms: Some(10_000),
            finished_at_ms: None,
            exit_code: None,
            reason: None,
            cancel_requested: false,
            workflow: None,
            cost_usd: None,
        };
        let entry = |job: &Job| Tracked {
            name: "flaky",
            id: None,
            job: Some(job.clone()),
            skipped: None,
        };
        assert_eq!(
            progress_line(&entry(&job), 13_000),
            "  flaky      RUNNING    attempt 2  3s"
        );
        job.state = JobState::Succeeded;
        job.finished_at_ms = Some(11_000);
        assert_eq!(
            progress_line(&entry(&job), 99_000),
            "  flaky      SUCCEEDED  attempt 2  1s"
        );
    }
}
