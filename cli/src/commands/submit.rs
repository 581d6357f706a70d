//! `drover submit`: build specs from flags or a file, submit them, and with
//! `--wait` follow them to the end.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use drover_proto::model::{EnvValue, Job, JobEvent, JobList, JobSpec, JobState, SubmitRequest};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::args::SubmitArgs;
use crate::client::Client;
use crate::commands::print_json;
use crate::error::{UsageError, EXIT_OK};
use crate::human;
use crate::table::Table;

/// How often `--wait` polls the job and its events.
const POLL: Duration = Duration::from_millis(500);
/// Consecutive failed polls `--wait` tolerates (a coordinator restart).
const MAX_POLL_ERRORS: u32 = 20;

pub async fn run(client: &Client, args: &SubmitArgs, json: bool) -> anyhow::Result<i32> {
    let specs = build_specs(args, || {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map(|_| text)
    })?;
    let request = match <[JobSpec; 1]>::try_from(specs) {
        Ok([spec]) => SubmitRequest::One(Box::new(spec)),
        Err(specs) => SubmitRequest::Batch { jobs: specs },
    };
    let response = client.submit(&request).await?;
    if !args.wait {
        if json {
            print_json(&response)?;
        } else {
            for job in &response.jobs {
                println!("{}", job.id);
                if !job.created {
                    eprintln!("job {}: an existing job has this idempotency key", job.id);
                }
            }
        }
        return Ok(EXIT_OK);
    }

    let ids: Vec<String> = response.jobs.into_iter().map(|job| job.id).collect();
    if let [id] = ids.as_slice() {
        let job = wait_for_job(
            client,
            id,
            WaitOptions {
                follow_logs: !json,
                progress: true,
            },
        )
        .await?;
        if json {
            print_json(&job)?;
        }
        return Ok(exit_code_for(&job));
    }
    let waits = ids.iter().map(|id| {
        wait_for_job(
            client,
            id,
            WaitOptions {
                follow_logs: false,
                progress: true,
            },
        )
    });
    let jobs = futures::future::try_join_all(waits).await?;
    if json {
        print_json(&JobList {
            jobs: jobs.clone(),
            next_cursor: None,
        })?;
    } else {
        print!("{}", results_table(&jobs));
    }
    Ok(jobs
        .iter()
        .map(exit_code_for)
        .find(|&code| code != EXIT_OK)
        .unwrap_or(EXIT_OK))
}

/// The specs to submit: the file's (or one from the command), with the
/// flags applied on top, each validated locally so mistakes exit 2 before
/// anything is sent.
pub fn build_specs(
    args: &SubmitArgs,
    read_stdin: impl FnOnce() -> std::io::Result<String>,
) -> anyhow::Result<Vec<JobSpec>> {
    let mut specs = match &args.file {
        Some(path) => {
            if !args.command.is_empty() {
                return Err(UsageError::new(
                    "give either -f FILE or a command after `--`, not both",
                )
                .into());
            }
            let (text, label) = if path == Path::new("-") {
                (
                    read_stdin().context("reading the spec from stdin")?,
                    "stdin".to_string(),
                )
            } else {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                (text, path.display().to_string())
            };
            let is_json = path.extension().is_some_and(|ext| ext == "json");
            parse_spec_text(&text, is_json).with_context(|| label.clone())?
        }
        None => {
            if args.command.is_empty() {
                return Err(UsageError::new(
                    "nothing to run: give a command after `--` (drover submit -- echo hi) or a spec file with -f",
                )
                .into());
            }
            vec![JobSpec::command(args.command.clone())]
        }
    };
    if specs.len() > 1 && args.idempotency_key.is_some() {
        return Err(UsageError::new(
            "--idempotency-key would give every job of the batch the same key; put keys in the file",
        )
        .into());
    }
    for spec in &mut specs {
        apply_flags(spec, args);
    }
    for (i, spec) in specs.iter().enumerate() {
        if let Err(err) = spec.validate() {
            let err = if specs.len() > 1 {
                err.in_batch(i)
            } else {
                err
            };
            return Err(UsageError::from(err).into());
        }
    }
    Ok(specs)
}

/// A spec file: one JobSpec, or `{jobs: [...]}`. YAML unless `is_json`
/// (YAML accepts JSON too, but serde_json's messages are clearer for it).
pub fn parse_spec_text(text: &str, is_json: bool) -> anyhow::Result<Vec<JobSpec>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        jobs: Vec<JobSpec>,
    }
    #[derive(Deserialize)]
    struct Probe {
        jobs: Option<serde::de::IgnoredAny>,
    }

    let usage = |err: String| anyhow::Error::new(UsageError(err));
    let specs = if is_json {
        let probe: Probe = serde_json::from_str(text).map_err(|e| usage(e.to_string()))?;
        if probe.jobs.is_some() {
            serde_json::from_str::<Batch>(text)
                .map_err(|e| usage(e.to_string()))?
                .jobs
        } else {
            vec![serde_json::from_str::<JobSpec>(text).map_err(|e| usage(e.to_string()))?]
        }
    } else {
        let probe: Probe = serde_yaml::from_str(text).map_err(|e| usage(e.to_string()))?;
        if probe.jobs.is_some() {
            serde_yaml::from_str::<Batch>(text)
                .map_err(|e| usage(e.to_string()))?
                .jobs
        } else {
            vec![serde_yaml::from_str::<JobSpec>(text).map_err(|e| usage(e.to_string()))?]
        }
    };
    if specs.is_empty() {
        return Err(usage("the batch has no jobs".into()));
    }
    Ok(specs)
}

/// Applies the flags that were given; unset flags leave the spec alone.
pub fn apply_flags(spec: &mut JobSpec, args: &SubmitArgs) {
    let set = |field: &mut String, value: &Option<String>| {
        if let Some(value) = value {
            field.clone_from(value);
        }
    };
    set(&mut spec.name, &args.name);
    set(&mut spec.pool, &args.pool);
    set(&mut spec.image, &args.image);
    set(&mut spec.workdir, &args.workdir);
    for (key, value) in &args.env {
        spec.env.insert(key.clone(), EnvValue::Plain(value.clone()));
    }
    for (key, value) in &args.secret_env {
        spec.env.insert(
            key.clone(),
            EnvValue::Secret {
                value: value.clone(),
                secret: true,
            },
        );
    }
    if let Some(cpu) = args.cpu {
        spec.resources.cpu_millis = cpu;
    }
    if let Some(memory) = args.memory {
        spec.resources.memory_mib = memory;
    }
    if args.cpu_hard_limit {
        spec.cpu_hard_limit = true;
    }
    if let Some(gpus) = args.gpus {
        spec.resources.gpus = gpus;
    }
    if let Some(timeout) = args.timeout {
        spec.timeout_secs = timeout;
    }
    if let Some(retries) = args.retries {
        spec.retry.max_attempts = retries.saturating_add(1);
    }
    if let Some(max_attempts) = args.max_attempts {
        spec.retry.max_attempts = max_attempts;
    }
    if let Some(priority) = args.priority {
        spec.priority = priority;
    }
    if let Some(key) = &args.idempotency_key {
        spec.idempotency_key = Some(key.clone());
    }
    for (key, value) in &args.constraints {
        spec.constraints.insert(key.clone(), value.clone());
    }
    if args.outputs {
        spec.outputs = true;
    }
    if let Some(policy) = args.pull_policy {
        spec.pull_policy = Some(policy);
    }
    for (name, job) in &args.inputs {
        spec.inputs.retain(|i| &i.name != name);
        spec.inputs.push(drover_proto::model::InputSpec {
            name: name.clone(),
            job: job.clone(),
        });
    }
}

/// The exit code `submit --wait` ends with: the job's own exit code.
pub fn exit_code_for(job: &Job) -> i32 {
    match job.state {
        JobState::Succeeded => 0,
        JobState::Failed => match job.exit_code {
            Some(code) if (1..=255).contains(&code) => code,
            _ => 1,
        },
        JobState::TimedOut => 124,
        JobState::Cancelled => 130,
        JobState::Pending | JobState::Queued | JobState::Leased | JobState::Running => 1,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    /// Stream each attempt's logs to stdout, in order.
    pub follow_logs: bool,
    /// Print state transitions on stderr.
    pub progress: bool,
}

/// Polls the job until it is terminal; returns it as it ended.
pub async fn wait_for_job(client: &Client, id: &str, options: WaitOptions) -> anyhow::Result<Job> {
    let (attempts_tx, attempts_rx) = mpsc::unbounded_channel();
    let logs = options
        .follow_logs
        .then(|| tokio::spawn(follow_attempts(client.clone(), id.to_string(), attempts_rx)));
    let mut attempts_tx = Some(attempts_tx);
    let mut queued_attempts = 0;
    let mut last_event: Option<JobEvent> = None;
    let mut errors = 0;
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let job = loop {
        interval.tick().await;
        // The job first, then its events, so the events printed always
        // reach at least the state acted on.
        let job = match client.get_job(id).await {
            Ok(job) => job,
            Err(err) => {
                errors += 1;
                if errors >= MAX_POLL_ERRORS {
                    return Err(err.context(format!("following job {id}")));
                }
                tracing::debug!(error = %format!("{err:#}"), "polling job {id}");
                continue;
            }
        };
        errors = 0;
        if options.progress {
            if let Ok(events) = client.job_events(id).await {
                for event in events.events {
                    if last_event
                        .as_ref()
                        .is_some_and(|last| event.seq <= last.seq)
                    {
                        continue;
                    }
                    let prev = last_event.as_ref().map(|e| e.state);
                    eprintln!("{}", transition_line(id, prev, &event));
                    last_event = Some(event);
                }
            }
        }
        if let Some(tx) = &attempts_tx {
            while queued_attempts < attempts_with_logs(&job) {
                queued_attempts += 1;
                let _ = tx.send(queued_attempts);
            }
        }
        if job.state.is_terminal() {
            break job;
        }
    };
    attempts_tx.take();
    if let Some(logs) = logs {
        // The coordinator ends a follow when its attempt ends; the bound only
        // guards against a stream that never closes.
        if tokio::time::timeout(Duration::from_secs(30), logs)
            .await
            .is_err()
        {
            eprintln!("warning: the log stream of job {id} did not end; stopped following");
        }
    }
    Ok(job)
}

/// Attempts whose logs exist and that will not be followed live by a later
/// poll: every attempt that has started or ended.
fn attempts_with_logs(job: &Job) -> u64 {
    match job.state {
        // Between attempts `attempt` names the last one, which has ended.
        JobState::Pending | JobState::Queued => job.attempt,
        // Leased but not started: only earlier attempts have logs so far.
        JobState::Leased => job.attempt.saturating_sub(1),
        _ => job.attempt,
    }
}

/// Streams the logs of each attempt received, in order, to stdout.
async fn follow_attempts(client: Client, id: String, mut attempts: mpsc::UnboundedReceiver<u64>) {
    while let Some(attempt) = attempts.recv().await {
        let result = async {
            let stream = client.logs(&id, Some(attempt), true).await?;
            stream.copy_to(&mut std::io::stdout()).await
        }
        .await;
        if let Err(err) = result {
            let not_found = err
                .downcast_ref::<crate::client::ApiFailure>()
                .is_some_and(|f| f.status == 404);
            if !not_found {
                eprintln!("warning: logs of job {id} attempt {attempt}: {err:#}");
            }
        }
    }
}

/// `job 01J… QUEUED → RUNNING on agent dev-1 (attempt 1): reason`
pub fn transition_line(id: &str, prev: Option<JobState>, event: &JobEvent) -> String {
    let mut line = match prev {
        Some(prev) => format!("job {id} {prev} → {}", event.state),
        None => format!("job {id} {}", event.state),
    };
    if let Some(agent) = &event.agent_id {
        if !event.state.is_terminal() && event.state != JobState::Queued {
            line.push_str(&format!(" on agent {agent}"));
        }
    }
    if event.attempt > 0 {
        line.push_str(&format!(" (attempt {})", event.attempt));
    }
    if !event.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&event.reason);
    }
    line
}

/// A finished batch: one row per job.
pub fn results_table(jobs: &[Job]) -> Table {
    let mut table = Table::new([
        "ID", "NAME", "STATE", "ATTEMPT", "EXIT", "DURATION", "REASON",
    ]);
    for job in jobs {
        table.row([
            job.id.clone(),
            job.spec.name.clone(),
            job.state.to_string(),
            job.attempt.to_string(),
            job.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            run_duration(job).unwrap_or_default(),
            job.reason.clone().unwrap_or_default(),
        ]);
    }
    table
}

/// How long the job's current (or last) attempt ran, if it started.
pub fn run_duration(job: &Job) -> Option<String> {
    let started = job.started_at_ms?;
    let end = job.finished_at_ms.unwrap_or_else(human::now_ms);
    Some(human::duration_ms(end - started))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let cli = Cli::try_parse_from(["drover", "submit"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Submit(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    fn no_stdin() -> std::io::Result<String> {
        panic!("stdin read unexpectedly")
    }

    fn job(state: JobState, exit_code: Option<i32>) -> Job {
        Job {
            id: "01JOB".into(),
            spec: JobSpec::command(["true"]),
            state,
            attempt: 1,
            failures: 0,
            infra_retries: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            not_before_ms: None,
            session_id: None,
            agent_id: None,
            started_at_ms: Some(1_000),
            finished_at_ms: Some(4_000),
            exit_code,
            reason: None,
            cancel_requested: false,
            workflow: None,
            cost_usd: None,
        }
    }

    #[test]
    fn flags_become_the_spec() {
        let args = submit_args(&[
            "--name",
            "train",
            "--pool",
            "gpu",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--secret-env",
            "TOKEN=hunter2",
            "--cpu",
            "2000",
            "--cpu-hard-limit",
            "--memory",
            "4096",
            "--gpus",
            "1",
            "--timeout",
            "90s",
            "--retries",
            "2",
            "--priority",
            "-5",
            "--idempotency-key",
            "k1",
            "--constraint",
            "arch=arm64",
            "--constraint",
            "spot=false",
            "--workdir",
            "/work",
            "--",
            "python",
            "train.py",
            "--epochs",
            "3",
        ]);
        let specs = build_specs(&args, no_stdin).unwrap();
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        assert_eq!(spec.name, "train");
        assert_eq!(spec.pool, "gpu");
        assert_eq!(spec.command, ["python", "train.py", "--epochs", "3"]);
        assert_eq!(spec.env["A"], EnvValue::Plain("1".into()));
        assert_eq!(spec.env["B"], EnvValue::Plain("x=y".into()));
        assert!(spec.env["TOKEN"].is_secret());
        assert_eq!(spec.env["TOKEN"].value(), "hunter2");
        assert_eq!(spec.resources.cpu_millis, 2000);
        assert!(spec.cpu_hard_limit);
        assert_eq!(spec.resources.memory_mib, 4096);
        assert_eq!(spec.resources.gpus, 1);
        assert_eq!(spec.timeout_secs, 90);
        assert_eq!(spec.retry.max_attempts, 3);
        assert_eq!(spec.priority, -5);
        assert_eq!(spec.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(
            spec.constraints,
            BTreeMap::from([
                ("arch".into(), "arm64".into()),
                ("spot".into(), "false".into())
            ])
        );
        assert_eq!(spec.workdir, "/work");
    }

    #[test]
    fn unset_flags_keep_the_defaults() {
        let specs = build_specs(&submit_args(&["--", "true"]), no_stdin).unwrap();
        assert_eq!(specs[0], JobSpec::command(["true"]));
    }

    #[test]
    fn max_attempts_is_taken_as_is() {
        let specs = build_specs(
            &submit_args(&["--max-attempts", "4", "--", "true"]),
            no_stdin,
        )
        .unwrap();
        assert_eq!(specs[0].retry.max_attempts, 4);
    }

    #[test]
    fn missing_command_and_invalid_specs_are_usage_errors() {
        let err = build_specs(&submit_args(&[]), no_stdin).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        let err =
            build_specs(&submit_args(&["--env", "1BAD=x", "--", "true"]), no_stdin).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
        assert!(err.to_string().contains("(field: env.1BAD)"), "{err}");
    }

    #[test]
    fn yaml_file_with_flag_overrides() {
        let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        write!(
            file,
            "name: build\ncommand: [sh, -c, 'make all']\nenv:\n  PLAIN: one\n  KEY: {{value: s3, secret: true}}\nresources: {{cpu: 500, memory: 256}}\ntimeout_secs: 60\n"
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let specs = build_specs(&submit_args(&["-f", path, "--pool", "cpu"]), no_stdin).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "build");
        assert_eq!(specs[0].pool, "cpu");
        assert_eq!(specs[0].command, ["sh", "-c", "make all"]);
        assert!(specs[0].env["KEY"].is_secret());
        assert_eq!(specs[0].resources.cpu_millis, 500);
        assert_eq!(specs[0].timeout_secs, 60);
    }

    #[test]
    fn json_batch_file() {
        let mut file = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
        write!(
            file,
            r#"{{"jobs":[{{"command":["a"]}},{{"command":["b"],"priority":3}}]}}"#
        )
        .unwrap();
        let path = file.path().to_str().unwrap();
        let specs = build_specs(&submit_args(&["-f", path]), no_stdin).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].command, ["b"]);
        assert_eq!(specs[1].priority, 3);
    }

    #[test]
    fn yaml_batch_from_stdin() {
        let specs = build_specs(&submit_args(&["-f", "-"]), || {
            Ok(
                "jobs:\n  - command: [echo, one]\n  - command: [echo, two]\n    name: second\n"
                    .into(),
            )
        })
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].name, "second");
    }

    #[test]
    fn spec_file_typos_are_usage_errors_naming_the_field() {
        let err = parse_spec_text("command: [x]\ncomand: [y]\n", false).unwrap_err();
        assert!(err.to_string().contains("comand"), "{err}");
        assert_eq!(crate::error::exit_code(&err), 2);
        let err =
            parse_spec_text(r#"{"jobs": [{"command": ["x"], "prio": 1}]}"#, true).unwrap_err();
        assert!(err.to_string().contains("prio"), "{err}");
    }

    #[test]
    fn invalid_batch_entry_names_its_index() {
        let err = build_specs(&submit_args(&["-f", "-"]), || {
            Ok("jobs:\n  - command: [ok]\n  - command: []\n".into())
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("(field: jobs[1].command)"),
            "{err}"
        );
    }

    #[test]
    fn file_and_command_together_are_rejected() {
        let err = build_specs(&submit_args(&["-f", "-", "--", "true"]), no_stdin).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2);
    }

    #[test]
    fn exit_code_follows_the_final_state() {
        assert_eq!(exit_code_for(&job(JobState::Succeeded, Some(0))), 0);
        assert_eq!(exit_code_for(&job(JobState::Failed, Some(3))), 3);
        assert_eq!(exit_code_for(&job(JobState::Failed, None)), 1);
        assert_eq!(exit_code_for(&job(JobState::Failed, Some(0))), 1);
        assert_eq!(exit_code_for(&job(JobState::Failed, Some(300))), 1);
        assert_eq!(exit_code_for(&job(JobState::Failed, Some(-9))), 1);
        assert_eq!(exit_code_for(&job(JobState::TimedOut, None)), 124);
        assert_eq!(exit_code_for(&job(JobState::Cancelled, None)), 130);
    }

    #[test]
    fn attempts_with_logs_excludes_a_lease_not_yet_started() {
        let mut j = job(JobState::Leased, None);
        j.attempt = 2;
        assert_eq!(attempts_with_logs(&j), 1);
        j.state = JobState::Running;
        assert_eq!(attempts_with_logs(&j), 2);
        j.state = JobState::Queued;
        assert_eq!(attempts_with_logs(&j), 2);
        j.attempt = 0;
        assert_eq!(attempts_with_logs(&j), 0);
    }

    #[test]
    fn transition_lines_name_states_agent_and_attempt() {
        let event = JobEvent {
            seq: 2,
            at_ms: 0,
            attempt: 1,
            state: JobState::Running,
            agent_id: Some("dev-1".into()),
            reason: String::new(),
            usd_per_hour: None,
        };
        assert_eq!(
            transition_line("01J", Some(JobState::Queued), &event),
            "job 01J QUEUED → RUNNING on agent dev-1 (attempt 1)"
        );
        let failed = JobEvent {
            state: JobState::Failed,
            reason: "exit code 3".into(),
            ..event
        };
        assert_eq!(
            transition_line("01J", Some(JobState::Running), &failed),
            "job 01J RUNNING → FAILED (attempt 1): exit code 3"
        );
    }

    #[test]
    fn results_table_shows_exit_and_duration() {
        let out = results_table(&[job(JobState::Failed, Some(3))]).render();
        assert!(out.contains("FAILED"), "{out}");
        assert!(out.lines().nth(1).unwrap().contains("  3  "), "{out}");
        assert!(out.contains("3s"), "{out}");
    }
}
