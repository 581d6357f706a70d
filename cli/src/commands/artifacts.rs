//! `drover artifacts get`: download a job's artifact, or unpack it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_proto::model::Artifact;
use drover_proto::workflow::WorkflowRun;
use serde::Serialize;

use crate::args::ArtifactsAction;
use crate::client::Client;
use crate::commands::print_json;
use crate::error::UsageError;

pub async fn run(client: &Client, action: &ArtifactsAction, json: bool) -> anyhow::Result<()> {
    match action {
        ArtifactsAction::Get {
            target,
            output,
            extract,
        } => {
            let job = resolve(client, &parse_target(target)?).await?;
            get(client, &job, output.as_deref(), extract.as_deref(), json).await
        }
    }
}

/// Whose artifact: a job, or a workflow run's step (a task of an array step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Job(String),
    Step {
        run: String,
        step: String,
        index: Option<u32>,
    },
}

/// `JOB`, `RUN/STEP` or `RUN/STEP/INDEX`.
pub fn parse_target(target: &str) -> Result<Target, UsageError> {
    let parts: Vec<&str> = target.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
        return Err(UsageError::new(format!(
            "{target:?}: name a job id, RUN/STEP, or RUN/STEP/INDEX for a task of an array step"
        )));
    }
    Ok(match parts.as_slice() {
        [job] => Target::Job(job.to_string()),
        [run, step] => Target::Step {
            run: run.to_string(),
            step: step.to_string(),
            index: None,
        },
        [run, step, index] => Target::Step {
            run: run.to_string(),
            step: step.to_string(),
            index: Some(index.parse().map_err(|_| {
                UsageError::new(format!(
                    "{target:?}: {index:?} is not a task index (0, 1, …)"
                ))
            })?),
        },
        _ => unreachable!("1 to 3 parts"),
    })
}

/// The job id of `target`; a step is looked up in its run.
pub async fn resolve(client: &Client, target: &Target) -> anyhow::Result<String> {
    match target {
        Target::Job(job) => Ok(job.clone()),
        Target::Step { run, step, index } => {
            let found = client
                .get_workflow(run)
                .await
                .with_context(|| format!("looking up run {run}"))?;
            Ok(step_job(&found, step, *index)?)
        }
    }
}

/// The job of `step` (task `index` of an array step) in `run`.
pub fn step_job(run: &WorkflowRun, step: &str, index: Option<u32>) -> Result<String, UsageError> {
    let Some(found) = run.steps.iter().find(|s| s.name == step) else {
        return Err(UsageError::new(format!(
            "run {} has no step {step:?}; its steps are: {}",
            run.id,
            run.steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let array = found.jobs.iter().any(|t| t.task_index.is_some());
    match (array, index) {
        (false, None) => found
            .jobs
            .first()
            .map(|t| t.job_id.clone())
            .ok_or_else(|| UsageError::new(format!("step {step:?} has no job"))),
        (false, Some(_)) => Err(UsageError::new(format!(
            "step {step:?} is not an array step: drop the task index (use {}/{step})",
            run.id
        ))),
        (true, None) => {
            let n = found.jobs.len();
            Err(UsageError::new(format!(
                "step {step:?} is an array of {n} tasks, each with its own artifact: name one, e.g. {}/{step}/0 (tasks 0 to {})",
                run.id,
                n.saturating_sub(1),
            )))
        }
        (true, Some(i)) => found
            .jobs
            .iter()
            .find(|t| t.task_index == Some(i))
            .map(|t| t.job_id.clone())
            .ok_or_else(|| {
                UsageError::new(format!(
                    "step {step:?} has no task {i}: its tasks are 0 to {}",
                    found.jobs.len().saturating_sub(1)
                ))
            }),
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Fetched<'a> {
    job_id: &'a str,
    attempt: u64,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<String>,
}

async fn get(
    client: &Client,
    job: &str,
    output: Option<&Path>,
    extract: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let artifact = client.artifact(job).await?;
    let to_stdout = output.is_some_and(|p| p == Path::new("-"));
    if to_stdout {
        let mut out = std::io::stdout().lock();
        download(client, &artifact, &mut out, false).await?;
        out.flush()?;
        return Ok(());
    }
    match extract {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let archive = tempfile_in(dir)?;
            let result = async {
                let mut file = std::fs::File::create(&archive)
                    .with_context(|| format!("cannot write {}", archive.display()))?;
                download(client, &artifact, &mut file, !json).await?;
                file.sync_all()?;
                drover_agent::artifacts::unpack(&archive, dir)
                    .with_context(|| format!("cannot unpack the artifact into {}", dir.display()))
            }
            .await;
            let _ = std::fs::remove_file(&archive);
            result?;
            report(&artifact, None, Some(dir), json)
        }
        None => {
            let file_name = output
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(format!("{}.tar.zst", artifact.job_id)));
            let partial = file_name.with_extension("zst.part");
            let result = async {
                let mut file = std::fs::File::create(&partial)
                    .with_context(|| format!("cannot write {}", partial.display()))?;
                download(client, &artifact, &mut file, !json).await?;
                file.sync_all()?;
                std::fs::rename(&partial, &file_name)
                    .with_context(|| format!("cannot write {}", file_name.display()))
            }
            .await;
            if result.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            result?;
            report(&artifact, Some(&file_name), None, json)
        }
    }
}

fn tempfile_in(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(dir.join(format!(".drover-artifact-{}.part", std::process::id())))
}

fn report(
    artifact: &Artifact,
    file: Option<&Path>,
    dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&Fetched {
            job_id: &artifact.job_id,
            attempt: artifact.attempt,
            bytes: artifact.bytes,
            file: file.map(|f| f.display().to_string()),
            dir: dir.map(|d| d.display().to_string()),
        });
    }
    match (file, dir) {
        (Some(file), _) => println!(
            "{} ({} bytes, job {} attempt {})",
            file.display(),
            artifact.bytes,
            artifact.job_id,
            artifact.attempt
        ),
        (_, Some(dir)) => println!(
            "unpacked into {} (job {} attempt {})",
            dir.display(),
            artifact.job_id,
            artifact.attempt
        ),
        _ => {}
    }
    Ok(())
}

/// Streams the artifact into `out`, with progress on stderr when asked.
async fn download(
    client: &Client,
    artifact: &Artifact,
    out: &mut impl Write,
    progress: bool,
) -> anyhow::Result<u64> {
    let mut response = client.download(&artifact.url).await?;
    let tty = progress && std::io::stderr().is_terminal();
    let mut done = 0u64;
    let mut last = Instant::now();
    while let Some(chunk) = response
        .chunk()
        .await
        .context("the download broke off; run the command again")?
    {
        out.write_all(&chunk)?;
        done += chunk.len() as u64;
        if tty && last.elapsed() >= Duration::from_millis(200) {
            last = Instant::now();
            eprint!("\r  {done} / {} bytes", artifact.bytes);
        }
    }
    if tty {
        eprintln!("\r  {done} / {} bytes", artifact.bytes);
    }
    if done != artifact.bytes {
        anyhow::bail!(
            "the download ended after {done} of {} bytes; run the command again",
            artifact.bytes
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use drover_proto::model::JobState;
    use drover_proto::workflow::{RunState, RunStepStatus, RunTask};

    use super::*;

    fn run() -> WorkflowRun {
        let task = |id: &str, index: Option<u32>| RunTask {
            job_id: id.into(),
            task_index: index,
            state: JobState::Succeeded,
            attempt: 1,
            duration_ms: 10,
            cost_usd: None,
            exit_code: Some(0),
            reason: None,
        };
        let step = |name: &str, jobs: Vec<RunTask>| RunStepStatus {
            name: name.into(),
            depends_on: vec![],
            state: "SUCCEEDED".into(),
            tasks: jobs.len() as u32,
            done: jobs.len() as u32,
            succeeded: jobs.len() as u32,
            duration_ms: 10,
            cost_usd: None,
            jobs,
        };
        WorkflowRun {
            id: "01RUN".into(),
            name: "calc".into(),
            description: String::new(),
            state: RunState::Succeeded,
            created_at_ms: 0,
            finished_at_ms: Some(1),
            cancel_requested: false,
            steps: vec![
                step("sum", vec![task("01SUM", None)]),
                step(
                    "divide",
                    vec![task("01DIV0", Some(0)), task("01DIV1", Some(1))],
                ),
            ],
            cost_usd: None,
        }
    }

    #[test]
    fn targets_are_a_job_a_step_or_a_task() {
        assert_eq!(parse_target("01JOB"), Ok(Target::Job("01JOB".into())));
        assert_eq!(
            parse_target("01RUN/sum"),
            Ok(Target::Step {
                run: "01RUN".into(),
                step: "sum".into(),
                index: None
            })
        );
        assert_eq!(
            parse_target("01RUN/divide/1"),
            Ok(Target::Step {
                run: "01RUN".into(),
                step: "divide".into(),
                index: Some(1)
            })
        );
        for bad in [
            "01RUN/",
            "/sum",
            "a/b/c/d",
            "01RUN/divide/x",
            "01RUN/divide/-1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn steps_resolve_to_their_job_and_arrays_need_an_index() {
        let run = run();
        assert_eq!(step_job(&run, "sum", None).unwrap(), "01SUM");
        assert_eq!(step_job(&run, "divide", Some(1)).unwrap(), "01DIV1");
        let err = step_job(&run, "divide", None).unwrap_err().to_string();
        assert!(
            err.contains("array of 2 tasks") && err.contains("01RUN/divide/0"),
            "{err}"
        );
        let err = step_job(&run, "divide", Some(2)).unwrap_err().to_string();
        assert!(err.contains("0 to 1"), "{err}");
        let err = step_job(&run, "sum", Some(0)).unwrap_err().to_string();
        assert!(err.contains("not an array step"), "{err}");
        let err = step_job(&run, "nope", None).unwrap_err().to_string();
        assert!(err.contains("sum, divide"), "{err}");
    }
}
