//! `drover jobs`, `show`, `logs`, `cancel`, `retry`.

use anyhow::Context;
use drover_proto::model::{EnvValue, EventList, Job, JobList, JobSpec};
use serde::Serialize;

use crate::args::{JobsArgs, LogsArgs};
use crate::client::{Client, JobQuery};
use crate::commands::print_json;
use crate::error::UsageError;
use crate::human;
use crate::table::Table;

pub async fn list(client: &Client, args: &JobsArgs, json: bool) -> anyhow::Result<()> {
    if args.limit == 0 {
        return Err(UsageError::new("--limit must be at least 1").into());
    }
    let query = JobQuery {
        state: args.state,
        pool: args.pool.clone(),
        name: args.name.clone(),
        cursor: None,
        limit: Some(args.limit),
    };
    let list = if args.all {
        JobList {
            jobs: client.list_all_jobs(&query).await?,
            next_cursor: None,
        }
    } else {
        client.list_jobs(&query).await?
    };
    if json {
        return print_json(&list);
    }
    print!("{}", jobs_table(&list.jobs, human::now_ms()));
    if list.next_cursor.is_some() {
        eprintln!("(more jobs: pass --all, or --limit to see more per page)");
    }
    Ok(())
}

pub fn jobs_table(jobs: &[Job], now_ms: i64) -> Table {
    let mut table = Table::new(["ID", "NAME", "POOL", "STATE", "ATTEMPT", "AGE", "REASON"]);
    for job in jobs {
        table.row([
            job.id.clone(),
            job.spec.name.clone(),
            job.spec.pool.clone(),
            job.state.to_string(),
            job.attempt.to_string(),
            human::age(now_ms, job.created_at_ms),
            job.reason.clone().unwrap_or_default(),
        ]);
    }
    table
}

pub async fn show(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let job = client.get_job(id).await?;
    show_job(client, job, json).await
}

/// `drover show` of a job already fetched: its events are fetched too.
pub async fn show_job(client: &Client, job: Job, json: bool) -> anyhow::Result<()> {
    let events = client.job_events(&job.id).await?;
    if json {
        #[derive(Serialize)]
        struct Shown<'a> {
            job: &'a Job,
            events: &'a EventList,
        }
        return print_json(&Shown {
            job: &job,
            events: &events,
        });
    }
    print!("{}", describe(&job, &events, human::now_ms()));
    Ok(())
}

/// `drover show`'s text: the job's fields, then its events timeline.
pub fn describe(job: &Job, events: &EventList, now_ms: i64) -> String {
    let spec = &job.spec;
    let mut fields = Table::new(["Job:", job.id.as_str()]);
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            fields.row([format!("{name}:"), value]);
        }
    };
    field("Name", spec.name.clone());
    if let Some(link) = &job.workflow {
        let mut shown = format!("run {} step {}", link.run_id, link.step);
        if let Some(index) = link.task_index {
            shown.push_str(&format!(" task {index}"));
        }
        shown.push_str(&format!(" (drover show {})", link.run_id));
        field("Workflow", shown);
    }
    field("Pool", spec.pool.clone());
    let mut state = job.state.to_string();
    if job.cancel_requested && !job.state.is_terminal() {
        state.push_str(" (cancel requested)");
    }
    field("State", state);
    field("Reason", job.reason.clone().unwrap_or_default());
    field(
        "Exit code",
        job.exit_code.map(|c| c.to_string()).unwrap_or_default(),
    );
    field(
        "Attempt",
        format!(
            "{} (failures {}/{}, infra retries {}/{})",
            job.attempt,
            job.failures,
            spec.retry.max_attempts,
            job.infra_retries,
            spec.retry.max_infra_retries
        ),
    );
    field("Agent", job.agent_id.clone().unwrap_or_default());
    field("Command", shell_words(&spec.argv()));
    field("Image", spec.image.clone());
    field("Workdir", spec.workdir.clone());
    field("User", spec.user.clone());
    field("Env", env_summary(spec));
    field("Resources", spec.resources.to_string());
    field("Constraints", key_values(spec.constraints.iter()));
    field(
        "Timeout",
        if spec.timeout_secs == 0 {
            String::new()
        } else {
            human::duration_ms(spec.timeout_secs as i64 * 1000)
        },
    );
    field(
        "Retry",
        format!(
            "max {} attempt{}, backoff {}{}",
            spec.retry.max_attempts,
            if spec.retry.max_attempts == 1 {
                ""
            } else {
                "s"
            },
            human::duration_ms(spec.retry.backoff_secs as i64 * 1000),
            if spec.retry.retry_on_exit_codes.is_empty() {
                String::new()
            } else {
                format!(
                    ", on exit codes {}",
                    spec.retry
                        .retry_on_exit_codes
                        .iter()
                        .map(i32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ),
    );
    field("Priority", spec.priority.to_string());
    field(
        "Idempotency key",
        spec.idempotency_key.clone().unwrap_or_default(),
    );
    let when = |ms: i64| format!("{} ({} ago)", human::time(ms), human::age(now_ms, ms));
    field("Created", when(job.created_at_ms));
    if let Some(ms) = job.not_before_ms.filter(|&ms| ms > now_ms) {
        field(
            "Not before",
            format!(
                "{} (in {})",
                human::time(ms),
                human::duration_ms(ms - now_ms)
            ),
        );
    }
    if let Some(ms) = job.started_at_ms {
        field("Started", when(ms));
    }
    if let Some(ms) = job.finished_at_ms {
        field("Finished", when(ms));
    }
    if let Some(duration) = crate::commands::submit::run_duration(job) {
        field("Duration", duration);
    }
    if let Some(usd) = job.cost_usd {
        field("Cost", crate::commands::workflows::cost(Some(usd)));
    }

    let mut out = fields.render();
    out.push_str("\nEvents:\n");
    let mut timeline = Table::new(["TIME", "ATTEMPT", "STATE", "AGENT", "REASON"]);
    for event in &events.events {
        timeline.row([
            human::time(event.at_ms),
            event.attempt.to_string(),
            event.state.to_string(),
            event.agent_id.clone().unwrap_or_default(),
            event.reason.clone(),
        ]);
    }
    for line in timeline.render().lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn env_summary(spec: &JobSpec) -> String {
    key_values(spec.env.iter().map(|(key, value)| {
        let shown = match value {
            EnvValue::Secret { secret: true, .. } => drover_proto::model::SECRET_MASK,
            other => other.value(),
        };
        (key, shown)
    }))
}

fn key_values<K: AsRef<str>, V: AsRef<str>>(pairs: impl Iterator<Item = (K, V)>) -> String {
    pairs
        .map(|(k, v)| format!("{}={}", k.as_ref(), v.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// argv as a shell would take it back: words quoted only where needed.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn logs(client: &Client, args: &LogsArgs, json: bool) -> anyhow::Result<()> {
    if json {
        if args.follow {
            return Err(UsageError::new("--json cannot follow a log; drop -f or --json").into());
        }
        #[derive(Serialize)]
        struct Logs<'a> {
            job_id: &'a str,
            attempt: Option<u64>,
            logs: String,
        }
        let stream = client.logs(&args.job, args.attempt, false).await?;
        let attempt = stream.attempt;
        let mut bytes = Vec::new();
        stream.copy_to(&mut bytes).await?;
        return print_json(&Logs {
            job_id: &args.job,
            attempt,
            logs: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    let stream = client.logs(&args.job, args.attempt, args.follow).await?;
    stream
        .copy_to(&mut std::io::stdout())
        .await
        .context("writing the logs")?;
    Ok(())
}

pub async fn cancel(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let job = client.cancel_job(id).await?;
    print_cancelled(&job, json)
}

/// What `drover cancel` prints for a job.
pub fn print_cancelled(job: &Job, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(job);
    }
    if job.state.is_terminal() {
        println!("job {}: {}", job.id, job.state);
    } else {
        println!(
            "job {}: cancel requested ({}; its agent stops it)",
            job.id, job.state
        );
    }
    Ok(())
}

pub async fn retry(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let job = client.retry_job(id).await?;
    if json {
        return print_json(&job);
    }
    println!(
        "job {}: {} (attempt {} done)",
        job.id, job.state, job.attempt
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{JobEvent, JobState};

    use super::*;

    fn job() -> Job {
        let mut spec = JobSpec::command(["sh", "-c", "echo it's done"]);
        spec.name = "build".into();
        spec.env.insert(
            "TOKEN".into(),
            EnvValue::Secret {
                value: "***".into(),
                secret: true,
            },
        );
        spec.env
            .insert("MODE".into(), EnvValue::Plain("fast".into()));
        spec.retry.max_attempts = 3;
        Job {
            id: "01JABC".into(),
            spec,
            state: JobState::Failed,
            attempt: 2,
            failures: 2,
            infra_retries: 0,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_010_000,
            not_before_ms: None,
            session_id: None,
            agent_id: Some("dev-1".into()),
            started_at_ms: Some(1_700_000_005_000),
            finished_at_ms: Some(1_700_000_007_500),
            exit_code: Some(3),
            reason: Some("exit code 3".into()),
            cancel_requested: false,
            workflow: None,
            cost_usd: None,
        }
    }

    #[test]
    fn jobs_table_has_the_documented_columns() {
        let out = jobs_table(&[job()], 1_700_000_130_000).render();
        let mut lines = out.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["ID", "NAME", "POOL", "STATE", "ATTEMPT", "AGE", "REASON"]
        );
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["01JABC", "build", "default", "FAILED", "2", "2m10s", "exit", "code", "3"]
        );
    }

    #[test]
    fn describe_shows_state_attempts_masked_env_and_timeline() {
        let events = EventList {
            events: vec![
                JobEvent {
                    seq: 1,
                    at_ms: 1_700_000_000_000,
                    attempt: 0,
                    state: JobState::Queued,
                    agent_id: None,
                    reason: "submitted".into(),
                    usd_per_hour: None,
                },
                JobEvent {
                    seq: 2,
                    at_ms: 1_700_000_005_000,
                    attempt: 1,
                    state: JobState::Running,
                    agent_id: Some("dev-1".into()),
                    reason: String::new(),
                    usd_per_hour: None,
                },
            ],
        };
        let out = describe(&job(), &events, 1_700_000_060_000);
        assert!(
            out.lines()
                .any(|l| l.starts_with("State:") && l.ends_with(" FAILED")),
            "{out}"
        );
        assert!(out.contains("2 (failures 2/3, infra retries 0/5)"), "{out}");
        assert!(out.contains("Exit code:"), "{out}");
        assert!(out.contains("MODE=fast, TOKEN=***"), "{out}");
        assert!(out.contains(r"sh -c 'echo it'\''s done'"), "{out}");
        assert!(out.contains("Duration:"), "{out}");
        assert!(
            out.contains("2023-11-14T22:13:25Z  1        RUNNING  dev-1"),
            "{out}"
        );
        assert!(out.contains("submitted"), "{out}");
    }

    #[test]
    fn describe_links_a_workflow_job_to_its_run_and_shows_its_cost() {
        let mut job = job();
        job.workflow = Some(drover_proto::workflow::WorkflowLink {
            run_id: "01RUN".into(),
            step: "divide".into(),
            task_index: Some(1),
        });
        job.cost_usd = Some(0.0042);
        let out = describe(&job, &EventList { events: vec![] }, 1_700_000_060_000);
        assert!(
            out.lines().any(|l| l.starts_with("Workflow:")
                && l.ends_with("run 01RUN step divide task 1 (drover show 01RUN)")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("Cost:") && l.ends_with("$0.0042")),
            "{out}"
        );
        let plain = describe(&self::job(), &EventList { events: vec![] }, 0);
        assert!(
            !plain.contains("Workflow:") && !plain.contains("Cost:"),
            "{plain}"
        );
    }

    #[test]
    fn describe_never_prints_a_secret_value_even_if_unmasked() {
        let mut job = job();
        job.spec.env.insert(
            "LEAK".into(),
            EnvValue::Secret {
                value: "hunter2".into(),
                secret: true,
            },
        );
        let out = describe(&job, &EventList { events: vec![] }, 0);
        assert!(!out.contains("hunter2"), "{out}");
    }

    #[test]
    fn shell_words_quote_only_where_needed() {
        let argv: Vec<String> = ["echo", "a b", "", "x=1"].map(String::from).to_vec();
        assert_eq!(shell_words(&argv), "echo 'a b' '' x=1");
    }
}
