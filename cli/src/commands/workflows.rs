//! Workflows: `drover run FILE.yaml` (start a run and follow it), `drover
//! runs`, and the run side of `drover show` and `drover cancel`.
//!
//! The file is checked here for YAML syntax and structure (typos, wrong
//! types), with its line; the coordinator validates the graph (unknown
//! dependencies, cycles, limits) and answers 400 naming the field.

use std::future::Future;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use drover_proto::model::JobState;
use drover_proto::workflow::{
    RunList, RunState, RunStepStatus, RunSummary, StepSpec, WorkflowRun, WorkflowSpec,
};

use crate::args::{RunArgs, RunsArgs};
use crate::client::{ApiFailure, Client};
use crate::commands::print_json;
use crate::error::{UsageError, EXIT_ERROR, EXIT_OK};
use crate::human;
use crate::table::Table;

/// How often `drover run` polls the run.
const POLL: Duration = Duration::from_millis(500);
/// Consecutive failed polls tolerated (a coordinator restart).
const MAX_POLL_ERRORS: u32 = 20;
/// The exit code after Ctrl-C stopped the watching (the run goes on).
pub const EXIT_INTERRUPTED: i32 = 130;

// ---- the file ----------------------------------------------------------

/// A workflow file, read and checked: `json` is what goes to the coordinator.
#[derive(Debug, Clone)]
pub struct WorkflowFile {
    /// How to name the file in messages (its path, or `stdin`).
    pub label: String,
    pub json: serde_json::Value,
    pub spec: WorkflowSpec,
}

/// Reads `path` (`-`: stdin) and checks it with [`parse_workflow`].
pub fn load(
    path: &Path,
    read_stdin: impl FnOnce() -> std::io::Result<String>,
) -> anyhow::Result<WorkflowFile> {
    let (text, label) = if path == Path::new("-") {
        (
            read_stdin().context("reading the workflow from stdin")?,
            "stdin".to_string(),
        )
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the workflow file {}", path.display()))?;
        (text, path.display().to_string())
    };
    parse_workflow(&text, &label).map_err(anyhow::Error::new)
}

/// Parses a workflow (YAML, or JSON, which is YAML too). Syntax and
/// structure errors name the file and line and show the line. YAML merge
/// keys (`<<: *defaults`) are applied.
pub fn parse_workflow(text: &str, label: &str) -> Result<WorkflowFile, UsageError> {
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| yaml_error(label, text, "not valid YAML", &e))?;
    value
        .apply_merge()
        .map_err(|e| yaml_error(label, text, "not valid YAML", &e))?;
    if !value.is_mapping() {
        return Err(UsageError::new(format!(
            "{label}: a workflow is a mapping with `name` and `steps` (each step: name, image, command, depends_on…){}",
            if value.is_null() { "; the file is empty" } else { "" }
        )));
    }
    stringify_scalars(&mut value, label, text)?;
    let spec = match serde_yaml::from_value::<WorkflowSpec>(value.clone()) {
        Ok(spec) => spec,
        Err(err) => return Err(structure_error(label, text, &value, &err)),
    };
    let json = serde_json::to_value(&value).map_err(|e| {
        UsageError::new(format!(
            "{label}: cannot be sent as JSON ({e}); keys must be strings"
        ))
    })?;
    Ok(WorkflowFile {
        label: label.to_string(),
        json,
        spec,
    })
}

/// Where a workflow that parses as YAML goes wrong. serde_yaml places an
/// error inside `steps` at the list's start, so the failing step is found
/// by checking each, and its line by [`step_line`].
fn structure_error(
    label: &str,
    text: &str,
    value: &serde_yaml::Value,
    err: &serde_yaml::Error,
) -> UsageError {
    const WHAT: &str = "not a valid workflow";
    let steps = value
        .get("steps")
        .and_then(serde_yaml::Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, step) in steps.iter().enumerate() {
        if let Err(e) = serde_yaml::from_value::<StepSpec>(step.clone()) {
            return located(
                label,
                text,
                step_line(text, i),
                &format!("{WHAT}: steps[{i}]: {e}"),
            );
        }
    }
    // Not one step: the top level (an unknown key, a missing `name`), whose
    // location serde_yaml knows.
    match serde_yaml::from_str::<WorkflowSpec>(text) {
        Err(e) => yaml_error(label, text, WHAT, &e),
        Ok(_) => UsageError::new(format!("{label}: {WHAT}: {err}")),
    }
}

/// YAML reads `command: [sleep, 5]` or `env: {DEBUG: true}` as numbers and
/// booleans where a job spec takes strings: integers and booleans in steps'
/// `command`, `args` and `env` values become the strings they were written
/// as. A float is refused (`1.10` would become `1.1`): quote it.
fn stringify_scalars(
    workflow: &mut serde_yaml::Value,
    label: &str,
    text: &str,
) -> Result<(), UsageError> {
    let as_text = |value: &mut serde_yaml::Value| -> Result<(), String> {
        let shown = match value {
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            serde_yaml::Value::Number(n) => {
                return Err(format!("{n} is read as a number: quote it (\"{n}\")"))
            }
            _ => return Ok(()),
        };
        *value = serde_yaml::Value::String(shown);
        Ok(())
    };
    let Some(steps) = workflow
        .get_mut("steps")
        .and_then(serde_yaml::Value::as_sequence_mut)
    else {
        return Ok(());
    };
    for (i, step) in steps.iter_mut().enumerate() {
        let fail = |field: String, e: String| {
            located(
                label,
                text,
                step_line(text, i),
                &format!("not a valid workflow: steps[{i}].{field}: {e}"),
            )
        };
        for key in ["command", "args"] {
            if let Some(words) = step
                .get_mut(key)
                .and_then(serde_yaml::Value::as_sequence_mut)
            {
                for (k, word) in words.iter_mut().enumerate() {
                    as_text(word).map_err(|e| fail(format!("{key}[{k}]"), e))?;
                }
            }
        }
        if let Some(env) = step
            .get_mut("env")
            .and_then(serde_yaml::Value::as_mapping_mut)
        {
            for (name, value) in env.iter_mut() {
                as_text(value)
                    .map_err(|e| fail(format!("env.{}", name.as_str().unwrap_or("?")), e))?;
            }
        }
    }
    Ok(())
}

/// The line and column (1-based) of the `i`th item of the top-level
/// `steps:` list written in block style (`- name: …`); `None` for other
/// layouts.
pub fn step_line(text: &str, i: usize) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| {
        l.strip_prefix("steps:")
            .is_some_and(|rest| rest.trim().is_empty() || rest.trim_start().starts_with('#'))
    })?;
    let mut indent = None;
    let mut seen = 0;
    for (n, line) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let here = line.len() - trimmed.len();
        let item = trimmed == "-" || trimmed.starts_with("- ");
        let indent = *indent.get_or_insert(here);
        if here < indent || (here == indent && !item) {
            return None;
        }
        if here == indent {
            if seen == i {
                return Some((n + 1, here + 1));
            }
            seen += 1;
        }
    }
    None
}

/// `calc.yaml:4:16: not valid YAML: <message>` and the line with a caret.
fn yaml_error(label: &str, text: &str, what: &str, err: &serde_yaml::Error) -> UsageError {
    let message = err.to_string();
    let Some(location) = err.location() else {
        return UsageError::new(format!("{label}: {what}: {message}"));
    };
    let (line, column) = (location.line(), location.column());
    let message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    located(
        label,
        text,
        Some((line, column)),
        &format!("{what}: {message}"),
    )
}

/// `FILE:LINE:COLUMN: message`, then the line with a caret under the column.
fn located(label: &str, text: &str, at: Option<(usize, usize)>, message: &str) -> UsageError {
    let Some((line, column)) = at else {
        return UsageError::new(format!("{label}: {message}"));
    };
    let mut out = format!("{label}:{line}:{column}: {message}");
    if let Some(source) = text.lines().nth(line.saturating_sub(1)) {
        let number = line.to_string();
        let shown: String = source.chars().take(160).collect();
        out.push_str(&format!("\n  {number} | {shown}"));
        out.push_str(&format!(
            "\n  {} | {}^",
            " ".repeat(number.len()),
            " ".repeat(column.saturating_sub(1).min(160))
        ));
    }
    UsageError(out)
}

/// Names the file (and the step a `steps[i]…` field is in) in the
/// coordinator's validation errors; other errors pass through.
fn in_file(err: anyhow::Error, file: &WorkflowFile) -> anyhow::Error {
    let Some(failure) = err.downcast_ref::<ApiFailure>() else {
        return err;
    };
    if !failure.is_validation() {
        return err;
    }
    let step = failure
        .error
        .field
        .as_deref()
        .and_then(step_index)
        .and_then(|i| file.spec.steps.get(i));
    match step {
        Some(step) => err.context(format!("{}: step {:?}", file.label, step.name)),
        None => err.context(file.label.clone()),
    }
}

/// `steps[2].depends_on[0]` → 2.
fn step_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("steps[")?;
    rest[..rest.find(']')?].parse().ok()
}

// ---- drover run ----------------------------------------------------------

pub async fn run(
    client: &Client,
    args: &RunArgs,
    json: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<i32> {
    let file = load(&args.file, || {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map(|_| text)
    })?;
    let run = client
        .create_workflow(&file.json)
        .await
        .map_err(|e| in_file(e, &file))?;
    if args.detach {
        if json {
            print_json(&run)?;
        } else {
            println!("{}", run.id);
            eprintln!(
                "run {} ({}): {}; follow it with `drover show {}`",
                run.id,
                run.name,
                counts(&run),
                run.id
            );
        }
        return Ok(EXIT_OK);
    }
    match watch(client, run, shutdown).await? {
        Watched::Finished(run) => {
            if json {
                print_json(&run)?;
            } else {
                print!("{}", summary(&run, human::now_ms()));
            }
            Ok(exit_code_for(&run))
        }
        Watched::Interrupted(run) => {
            if json {
                print_json(&run)?;
            }
            Ok(EXIT_INTERRUPTED)
        }
    }
}

/// 0 when the run succeeded, 1 otherwise.
pub fn exit_code_for(run: &WorkflowRun) -> i32 {
    if run.state == RunState::Succeeded {
        EXIT_OK
    } else {
        EXIT_ERROR
    }
}

/// How watching a run ended.
#[derive(Debug)]
pub enum Watched {
    /// The run reached a final state.
    Finished(WorkflowRun),
    /// Ctrl-C: stopped watching; the run goes on. Its latest state.
    Interrupted(WorkflowRun),
}

/// Polls the run until it ends (or `shutdown`), drawing its progress on
/// stderr: redrawn in place on a terminal, one line per change otherwise.
pub async fn watch(
    client: &Client,
    mut run: WorkflowRun,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Watched> {
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let mut shutdown = std::pin::pin!(shutdown);
    // A signal future installs its handler when first polled: from here on
    // Ctrl-C stops the watching instead of killing the process.
    if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
        return Ok(Watched::Interrupted(run));
    }
    let mut errors = 0;
    loop {
        eprint!("{}", progress.frame(&run, human::now_ms()));
        if run.state.is_terminal() {
            eprint!("{}", progress.finish(&run, human::now_ms()));
            return Ok(Watched::Finished(run));
        }
        let next = async {
            tokio::time::sleep(POLL).await;
            client.get_workflow(&run.id).await
        };
        let polled = tokio::select! {
            polled = next => polled,
            () = &mut shutdown => {
                eprint!("{}", progress.interrupted(&run));
                return Ok(Watched::Interrupted(run));
            }
        };
        match polled {
            Ok(latest) => {
                errors = 0;
                run = latest;
            }
            Err(err) => {
                errors += 1;
                if errors >= MAX_POLL_ERRORS {
                    eprint!("{}", progress.interrupted(&run));
                    return Err(err.context(format!("following run {}", run.id)));
                }
                tracing::debug!(error = %format!("{err:#}"), "polling run {}", run.id);
            }
        }
    }
}

/// The progress display of a run being watched. Pure: each call returns
/// the text to write to stderr.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    /// Lines drawn by the last frame (TTY), to draw over.
    drawn: usize,
    started: bool,
    /// What was last printed per step (non-TTY): state and tasks done.
    seen: std::collections::BTreeMap<String, (String, u32)>,
}

impl Progress {
    pub fn new(tty: bool) -> Progress {
        Progress {
            tty,
            drawn: 0,
            started: false,
            seen: Default::default(),
        }
    }

    /// The text for the run as it is now.
    pub fn frame(&mut self, run: &WorkflowRun, now_ms: i64) -> String {
        if self.tty {
            let mut lines = vec![format!(
                "run {} ({}): {}, {}/{} jobs done, {}",
                run.id,
                run.name,
                run.state,
                run.steps.iter().map(|s| s.done).sum::<u32>(),
                run.steps.iter().map(|s| s.tasks).sum::<u32>(),
                human::duration_ms(run_elapsed_ms(run, now_ms))
            )];
            let mut table = Table::new(["STEP", "STATE", "TASKS", "DURATION"]);
            for step in &run.steps {
                table.row([
                    step.name.clone(),
                    step.state.clone(),
                    format!("{}/{}", step.done, step.tasks),
                    step_duration(step),
                ]);
            }
            lines.extend(table.render().lines().map(|l| format!("  {l}")));
            let mut out = self.clear();
            for line in &lines {
                // Long lines would wrap and break the redraw.
                out.extend(line.chars().take(160));
                out.push('\n');
            }
            self.drawn = lines.len();
            return out;
        }
        let mut out = String::new();
        if !self.started {
            self.started = true;
            out.push_str(&format!("run {} ({}): {}\n", run.id, run.name, counts(run)));
        }
        for step in &run.steps {
            let key = (step.state.clone(), step.done);
            if self.seen.get(&step.name) == Some(&key) {
                continue;
            }
            self.seen.insert(step.name.clone(), key);
            out.push_str(&change_line(step));
            out.push('\n');
        }
        out
    }

    /// The text once the run has ended: the TTY block is wiped (the summary
    /// follows), and one line says how it ended.
    pub fn finish(&mut self, run: &WorkflowRun, now_ms: i64) -> String {
        let mut out = self.clear();
        self.drawn = 0;
        out.push_str(&format!(
            "run {} ({}): {} in {}\n",
            run.id,
            run.name,
            run.state,
            human::duration_ms(run_elapsed_ms(run, now_ms))
        ));
        out
    }

    /// The text when Ctrl-C stopped the watching: the latest frame stays.
    pub fn interrupted(&mut self, run: &WorkflowRun) -> String {
        self.drawn = 0;
        format!(
            "stopped watching run {id}; it goes on: `drover show {id}` shows it, `drover cancel {id}` stops it\n",
            id = run.id
        )
    }

    /// Moves up over the last frame and clears to the end of the screen.
    fn clear(&self) -> String {
        if self.tty && self.drawn > 0 {
            format!("\x1b[{}A\x1b[J", self.drawn)
        } else {
            String::new()
        }
    }
}

/// `divide: RUNNING (1/2 tasks done)`, `sum: SUCCEEDED (1/1, 120ms)`.
pub fn change_line(step: &RunStepStatus) -> String {
    let finished = step.tasks > 0 && step.done == step.tasks;
    let mut line = format!(
        "{}: {} ({}/{} tasks done",
        step.name, step.state, step.done, step.tasks
    );
    if finished && step.duration_ms > 0 {
        line.push_str(&format!(
            ", {}",
            human::duration_ms(step.duration_ms as i64)
        ));
    }
    line.push(')');
    if finished && step.succeeded < step.tasks {
        if let Some(reason) = first_failure(step) {
            line.push_str(": ");
            line.push_str(reason);
        }
    }
    line
}

/// The reason of the step's first task that did not succeed.
fn first_failure(step: &RunStepStatus) -> Option<&str> {
    step.jobs
        .iter()
        .filter(|t| t.state.is_terminal() && t.state != JobState::Succeeded)
        .find_map(|t| t.reason.as_deref())
}

/// `4 steps, 5 jobs`.
fn counts(run: &WorkflowRun) -> String {
    let jobs: u32 = run.steps.iter().map(|s| s.tasks).sum();
    format!(
        "{} step{}, {} job{}",
        run.steps.len(),
        plural(run.steps.len() as u64),
        jobs,
        plural(jobs as u64)
    )
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The run's wall-clock time: to its end, or to now.
fn run_elapsed_ms(run: &WorkflowRun, now_ms: i64) -> i64 {
    run.finished_at_ms.unwrap_or(now_ms) - run.created_at_ms
}

/// Blank until the step has run.
fn step_duration(step: &RunStepStatus) -> String {
    if step.duration_ms == 0 {
        String::new()
    } else {
        human::duration_ms(step.duration_ms as i64)
    }
}

/// `$1.25`, `$0.0123`, `$0.00000014` (two significant digits below a
/// cent); `-` when a price is unknown.
pub fn cost(usd: Option<f64>) -> String {
    match usd {
        None => "-".into(),
        Some(c) if c <= 0.0 => "$0".into(),
        Some(c) if c < 1e-9 => "<$0.000000001".into(),
        Some(c) if c < 0.01 => {
            let digits = (1 - c.log10().floor() as i32).clamp(2, 10) as usize;
            format!("${c:.digits$}")
        }
        Some(c) if c < 1.0 => format!("${c:.4}"),
        Some(c) => format!("${c:.2}"),
    }
}

/// The steps table with a TOTAL row (the run's state, wall-clock time and cost).
pub fn steps_table(run: &WorkflowRun, now_ms: i64) -> Table {
    let mut table = Table::new(["STEP", "STATE", "TASKS", "DURATION", "COST"]);
    for step in &run.steps {
        table.row([
            step.name.clone(),
            step.state.clone(),
            format!("{}/{}", step.done, step.tasks),
            step_duration(step),
            cost(step.cost_usd),
        ]);
    }
    table.row([
        "TOTAL".to_string(),
        run.state.to_string(),
        format!(
            "{}/{}",
            run.steps.iter().map(|s| s.done).sum::<u32>(),
            run.steps.iter().map(|s| s.tasks).sum::<u32>()
        ),
        human::duration_ms(run_elapsed_ms(run, now_ms)),
        cost(run.cost_usd),
    ]);
    table
}

/// What `drover run` prints at the end: the steps table, then the tasks
/// that did not succeed and why.
pub fn summary(run: &WorkflowRun, now_ms: i64) -> String {
    let mut out = steps_table(run, now_ms).render();
    let mut failed = Table::new(["STEP", "JOB", "STATE", "REASON"]);
    for step in &run.steps {
        for task in &step.jobs {
            if task.state.is_terminal() && task.state != JobState::Succeeded {
                failed.row([
                    task_name(step, task.task_index),
                    task.job_id.clone(),
                    task.state.to_string(),
                    task.reason.clone().unwrap_or_default(),
                ]);
            }
        }
    }
    if !failed.is_empty() {
        out.push_str("\nNot succeeded:\n");
        for line in failed.render().lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("Logs: drover logs <job>\n");
    }
    out
}

/// `divide[1]` for an array task, `sum` otherwise.
fn task_name(step: &RunStepStatus, index: Option<u32>) -> String {
    match index {
        Some(i) => format!("{}[{i}]", step.name),
        None => step.name.clone(),
    }
}

// ---- drover show / cancel / runs -------------------------------------------

/// `drover show RUN`.
pub fn show(run: &WorkflowRun, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(run);
    }
    print!("{}", describe(run, human::now_ms()));
    Ok(())
}

/// The run's fields, its steps table, then every job.
pub fn describe(run: &WorkflowRun, now_ms: i64) -> String {
    let mut fields = Table::new(["Run:", run.id.as_str()]);
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            fields.row([format!("{name}:"), value]);
        }
    };
    field("Name", run.name.clone());
    field("Description", run.description.trim().to_string());
    let mut state = run.state.to_string();
    if run.cancel_requested && !run.state.is_terminal() {
        state.push_str(" (cancel requested)");
    }
    field("State", state);
    let when = |ms: i64| format!("{} ({} ago)", human::time(ms), human::age(now_ms, ms));
    field("Created", when(run.created_at_ms));
    if let Some(ms) = run.finished_at_ms {
        field("Finished", when(ms));
    }
    field("Duration", human::duration_ms(run_elapsed_ms(run, now_ms)));
    field("Cost", cost(run.cost_usd));
    let mut out = fields.render();
    out.push_str("\nSteps:\n");
    indent(&mut out, &steps_table(run, now_ms).render());
    out.push_str("\nJobs:\n");
    let mut jobs = Table::new([
        "STEP", "JOB", "STATE", "ATTEMPT", "EXIT", "DURATION", "COST", "REASON",
    ]);
    for step in &run.steps {
        for task in &step.jobs {
            jobs.row([
                task_name(step, task.task_index),
                task.job_id.clone(),
                task.state.to_string(),
                task.attempt.to_string(),
                task.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                if task.duration_ms == 0 {
                    String::new()
                } else {
                    human::duration_ms(task.duration_ms as i64)
                },
                cost(task.cost_usd),
                task.reason.clone().unwrap_or_default(),
            ]);
        }
    }
    indent(&mut out, &jobs.render());
    out
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
}

/// `drover cancel RUN`.
pub async fn cancel(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let run = client.cancel_workflow(id).await?;
    if json {
        return print_json(&run);
    }
    if run.state.is_terminal() {
        println!("run {} ({}): {}", run.id, run.name, run.state);
    } else {
        println!(
            "run {} ({}): cancel requested ({}; agents stop its running jobs)",
            run.id, run.name, run.state
        );
    }
    Ok(())
}

/// `drover runs`.
pub async fn list(client: &Client, args: &RunsArgs, json: bool) -> anyhow::Result<()> {
    if args.limit == 0 {
        return Err(UsageError::new("--limit must be at least 1").into());
    }
    let list = if args.all {
        RunList {
            runs: client.list_all_workflows(Some(args.limit)).await?,
            next_cursor: None,
        }
    } else {
        client.list_workflows(Some(args.limit), None).await?
    };
    if json {
        return print_json(&list);
    }
    print!("{}", runs_table(&list.runs, human::now_ms()));
    if list.next_cursor.is_some() {
        eprintln!("(more runs: pass --all, or --limit to see more per page)");
    }
    Ok(())
}

pub fn runs_table(runs: &[RunSummary], now_ms: i64) -> Table {
    let mut table = Table::new(["ID", "NAME", "STATE", "DONE", "AGE"]);
    for run in runs {
        table.row([
            run.id.clone(),
            run.name.clone(),
            run.state.to_string(),
            format!("{}/{}", run.done, run.jobs),
            human::age(now_ms, run.created_at_ms),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use drover_proto::workflow::RunTask;

    use super::*;

    fn task(id: &str, index: Option<u32>, state: JobState, reason: Option<&str>) -> RunTask {
        RunTask {
            job_id: id.into(),
            task_index: index,
            state,
            attempt: u64::from(state != JobState::Pending && state != JobState::Queued),
            duration_ms: if state.is_terminal() { 1_500 } else { 0 },
            cost_usd: None,
            exit_code: (state == JobState::Failed && reason == Some("exit code 3")).then_some(3),
            reason: reason.map(str::to_string),
        }
    }

    fn step(name: &str, deps: &[&str], state: &str, jobs: Vec<RunTask>) -> RunStepStatus {
        let done = jobs.iter().filter(|t| t.state.is_terminal()).count() as u32;
        let succeeded = jobs
            .iter()
            .filter(|t| t.state == JobState::Succeeded)
            .count() as u32;
        RunStepStatus {
            name: name.into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            state: state.into(),
            tasks: jobs.len() as u32,
            done,
            succeeded,
            duration_ms: jobs.iter().map(|t| t.duration_ms).max().unwrap_or(0),
            cost_usd: None,
            jobs,
        }
    }

    fn calc(divide: JobState, sum: JobState) -> WorkflowRun {
        let sum_state = if sum.is_terminal() || sum == JobState::Running {
            sum.to_string()
        } else {
            "PENDING".to_string()
        };
        WorkflowRun {
            id: "01RUN".into(),
            name: "calc".into(),
            description: String::new(),
            state: if sum == JobState::Succeeded {
                RunState::Succeeded
            } else if sum.is_terminal() {
                RunState::Failed
            } else {
                RunState::Running
            },
            created_at_ms: 1_000_000,
            finished_at_ms: sum.is_terminal().then_some(1_004_000),
            cancel_requested: false,
            steps: vec![
                step(
                    "generate",
                    &[],
                    "SUCCEEDED",
                    vec![task("01GEN", None, JobState::Succeeded, None)],
                ),
                step(
                    "divide",
                    &["generate"],
                    divide.as_str(),
                    vec![
                        task("01DIV0", Some(0), JobState::Succeeded, None),
                        task(
                            "01DIV1",
                            Some(1),
                            divide,
                            (divide == JobState::Failed).then_some("exit code 3"),
                        ),
                    ],
                ),
                step(
                    "sum",
                    &["divide"],
                    &sum_state,
                    vec![task(
                        "01SUM",
                        None,
                        sum,
                        (sum == JobState::Failed)
                            .then_some("dependency_failed: step divide (job 01DIV1) ended FAILED"),
                    )],
                ),
            ],
            cost_usd: None,
        }
    }

    #[test]
    fn non_tty_progress_prints_only_changes() {
        let mut progress = Progress::new(false);
        let first = progress.frame(&calc(JobState::Running, JobState::Pending), 1_001_000);
        assert_eq!(
            first,
            "run 01RUN (calc): 3 steps, 4 jobs\n\
             generate: SUCCEEDED (1/1 tasks done, 1s)\n\
             divide: RUNNING (1/2 tasks done)\n\
             sum: PENDING (0/1 tasks done)\n"
        );
        // Nothing changed: nothing printed, however much time passed.
        assert_eq!(
            progress.frame(&calc(JobState::Running, JobState::Pending), 1_002_000),
            ""
        );
        let run = calc(JobState::Succeeded, JobState::Succeeded);
        assert_eq!(
            progress.frame(&run, 1_004_000),
            "divide: SUCCEEDED (2/2 tasks done, 1s)\nsum: SUCCEEDED (1/1 tasks done, 1s)\n"
        );
        assert_eq!(
            progress.finish(&run, 1_009_000),
            "run 01RUN (calc): SUCCEEDED in 4s\n"
        );
    }

    #[test]
    fn non_tty_progress_names_why_a_step_failed() {
        let mut progress = Progress::new(false);
        let out = progress.frame(&calc(JobState::Failed, JobState::Failed), 1_004_000);
        assert!(
            out.contains("divide: FAILED (2/2 tasks done, 1s): exit code 3\n"),
            "{out}"
        );
        assert!(
            out.contains("sum: FAILED (1/1 tasks done, 1s): dependency_failed: step divide"),
            "{out}"
        );
    }

    #[test]
    fn tty_progress_redraws_the_block_in_place() {
        let mut progress = Progress::new(true);
        let first = progress.frame(&calc(JobState::Running, JobState::Pending), 1_002_000);
        assert!(
            !first.contains('\x1b'),
            "nothing to draw over yet: {first:?}"
        );
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines[0], "run 01RUN (calc): RUNNING, 2/4 jobs done, 2s");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["STEP", "STATE", "TASKS", "DURATION"]
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["divide", "RUNNING", "1/2", "1s"]
        );
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["sum", "PENDING", "0/1"]
        );
        assert_eq!(lines.len(), 5);
        // The next frame moves up over those 5 lines and clears them.
        let second = progress.frame(&calc(JobState::Running, JobState::Pending), 1_003_000);
        assert!(second.starts_with("\x1b[5A\x1b[J"), "{second:?}");
        assert!(second.contains("2/4 jobs done, 3s"), "{second:?}");
        // The end wipes the block and leaves one line.
        let end = progress.finish(&calc(JobState::Succeeded, JobState::Succeeded), 1_005_000);
        assert_eq!(end, "\x1b[5A\x1b[Jrun 01RUN (calc): SUCCEEDED in 4s\n");
    }

    #[test]
    fn interrupting_says_how_to_come_back() {
        let mut progress = Progress::new(true);
        progress.frame(&calc(JobState::Running, JobState::Pending), 1_002_000);
        let out = progress.interrupted(&calc(JobState::Running, JobState::Pending));
        assert!(out.contains("drover show 01RUN"), "{out}");
        assert!(!out.contains('\x1b'), "the last frame stays: {out:?}");
    }

    #[test]
    fn summary_has_a_row_per_step_and_a_total() {
        let out = summary(&calc(JobState::Succeeded, JobState::Succeeded), 2_000_000);
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["STEP", "STATE", "TASKS", "DURATION", "COST"],
                vec!["generate", "SUCCEEDED", "1/1", "1s", "-"],
                vec!["divide", "SUCCEEDED", "2/2", "1s", "-"],
                vec!["sum", "SUCCEEDED", "1/1", "1s", "-"],
                vec!["TOTAL", "SUCCEEDED", "4/4", "4s", "-"],
            ]
        );
    }

    #[test]
    fn summary_of_a_failed_run_lists_the_tasks_that_did_not_succeed() {
        let out = summary(&calc(JobState::Failed, JobState::Failed), 2_000_000);
        assert!(out.contains("TOTAL     FAILED"), "{out}");
        assert!(out.contains("Not succeeded:"), "{out}");
        let failed: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("Not succeeded"))
            .collect();
        assert!(
            failed.iter().any(|l| l.contains("divide[1]")
                && l.contains("01DIV1")
                && l.ends_with("exit code 3")),
            "{out}"
        );
        assert!(
            failed
                .iter()
                .any(|l| l.contains("sum") && l.contains("dependency_failed: step divide")),
            "{out}"
        );
        assert!(!failed.iter().any(|l| l.contains("01GEN")), "{out}");
    }

    #[test]
    fn costs_show_when_known() {
        let mut run = calc(JobState::Succeeded, JobState::Succeeded);
        run.cost_usd = Some(0.01234);
        run.steps[0].cost_usd = Some(0.00001);
        run.steps[1].cost_usd = Some(2.5);
        let out = steps_table(&run, 0).render();
        assert!(out.lines().nth(1).unwrap().ends_with("$0.000010"), "{out}");
        assert!(out.lines().nth(2).unwrap().ends_with("$2.50"), "{out}");
        assert!(out.lines().nth(4).unwrap().ends_with("$0.0123"), "{out}");
        assert_eq!(cost(None), "-");
        assert_eq!(cost(Some(1.43e-7)), "$0.00000014");
        assert_eq!(cost(Some(0.0042)), "$0.0042");
        assert_eq!(cost(Some(0.0099)), "$0.0099");
        assert_eq!(cost(Some(1e-12)), "<$0.000000001");
        assert_eq!(cost(Some(0.0)), "$0");
    }

    #[test]
    fn describe_lists_fields_steps_and_every_job() {
        let out = describe(&calc(JobState::Failed, JobState::Failed), 1_010_000);
        assert!(out.starts_with("Run:"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("State:") && l.ends_with("FAILED")),
            "{out}"
        );
        assert!(out.contains("\nSteps:\n"), "{out}");
        assert!(out.contains("\nJobs:\n"), "{out}");
        for id in ["01GEN", "01DIV0", "01DIV1", "01SUM"] {
            assert!(out.contains(id), "{id}: {out}");
        }
        assert!(
            out.lines()
                .any(|l| l.contains("divide[1]") && l.contains("  3  ")),
            "the exit code: {out}"
        );
    }

    #[test]
    fn runs_table_shows_done_of_total_and_age() {
        let runs = [RunSummary {
            id: "01RUN".into(),
            name: "calc".into(),
            state: RunState::Running,
            created_at_ms: 1_000_000,
            jobs: 5,
            done: 2,
        }];
        let out = runs_table(&runs, 1_065_000).render();
        assert_eq!(
            out.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["01RUN", "calc", "RUNNING", "2/5", "1m5s"]
        );
    }

    #[test]
    fn exit_code_is_zero_only_for_success() {
        assert_eq!(
            exit_code_for(&calc(JobState::Succeeded, JobState::Succeeded)),
            0
        );
        assert_eq!(exit_code_for(&calc(JobState::Failed, JobState::Failed)), 1);
        let mut cancelled = calc(JobState::Cancelled, JobState::Cancelled);
        cancelled.state = RunState::Cancelled;
        assert_eq!(exit_code_for(&cancelled), 1);
    }

    // ---- the file ----

    const CALC: &str = "\
name: calc
steps:
  - name: generate
    command: [sh, -c, 'echo 6 > $DROVER_OUTPUT_DIR/x']
    outputs: true
  - name: double
    depends_on: [generate]
    array: 2
    command: [sh, -c, 'cat $DROVER_INPUT_DIR/generate/x']
";

    #[test]
    fn a_workflow_file_becomes_json_as_written() {
        let file = parse_workflow(CALC, "calc.yaml").unwrap();
        assert_eq!(file.json["name"], "calc");
        assert_eq!(file.json["steps"][1]["array"], 2);
        assert_eq!(file.json["steps"][1]["depends_on"][0], "generate");
        assert_eq!(file.json["steps"][0]["outputs"], true);
        // Defaults stay the coordinator's: nothing is added.
        assert!(file.json["steps"][0].get("pool").is_none());
        assert_eq!(file.spec.steps[1].tasks(), 2);
    }

    #[test]
    fn json_files_parse_too() {
        let file = parse_workflow(
            r#"{"name": "j", "steps": [{"name": "a", "command": ["true"]}]}"#,
            "j.json",
        )
        .unwrap();
        assert_eq!(file.spec.steps[0].name, "a");
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "\
name: merged
steps:
  - &base
    name: a
    image: busybox:stable
    command: [true]
  - <<: *base
    name: b
    depends_on: [a]
";
        let file = parse_workflow(text, "m.yaml").unwrap();
        assert_eq!(file.json["steps"][1]["image"], "busybox:stable");
        assert_eq!(file.json["steps"][1]["name"], "b");
        assert!(file.json["steps"][1].get("<<").is_none());
    }

    #[test]
    fn integers_and_booleans_in_commands_and_env_become_strings() {
        let text = "\
name: scalars
steps:
  - name: a
    command: [sleep, 5]
    args: [true]
    env: {N: 3, DEBUG: false, NAME: x}
";
        let file = parse_workflow(text, "s.yaml").unwrap();
        assert_eq!(file.json["steps"][0]["command"][1], "5");
        assert_eq!(file.json["steps"][0]["args"][0], "true");
        assert_eq!(file.json["steps"][0]["env"]["N"], "3");
        assert_eq!(file.json["steps"][0]["env"]["DEBUG"], "false");
        let err = parse_workflow(
            "name: f\nsteps:\n  - name: a\n    command: [x]\n  - name: b\n    command: [x]\n    env: {V: 1.10}\n",
            "f.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("f.yaml:5:3: "), "{err}");
        assert!(
            err.contains("steps[1].env.V: 1.1 is read as a number"),
            "{err}"
        );
    }

    #[test]
    fn yaml_syntax_errors_name_the_file_and_line() {
        let text = "name: bad\nsteps:\n  - name: a\n    command: sh: -c\n";
        let err = parse_workflow(text, "bad.yaml").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml:4:"), "{err}");
        assert!(err.contains("not valid YAML"), "{err}");
        assert!(err.contains("4 |     command: sh: -c"), "{err}");
        assert!(!err.contains(" at line 4 column"), "said once: {err}");
    }

    #[test]
    fn structure_errors_name_the_line_of_the_step() {
        let text = "name: typo\nsteps:\n  - name: a\n    command: [\"true\"]\n  - name: b\n    comand: [\"true\"]\n";
        let err = parse_workflow(text, "typo.yaml").unwrap_err().to_string();
        assert!(err.starts_with("typo.yaml:5:3: "), "{err}");
        assert!(err.contains("steps[1]") && err.contains("comand"), "{err}");
        assert!(err.contains("5 |   - name: b"), "{err}");
        let text = "name: t\nsteps:\n- name: a\n  command: [x]\n\n  # second\n- name: b\n  depends_on: a\n  command: [x]\n";
        let err = parse_workflow(text, "t.yaml").unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:7:1: "), "{err}");
        assert!(err.contains("depends_on"), "{err}");
        let err = parse_workflow("name: x\nstep: []\n", "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.yaml:2:"), "{err}");
    }

    #[test]
    fn the_examples_are_valid_workflows_with_an_image_on_every_step() {
        for (name, text) in [
            ("calc.yaml", include_str!("../../../examples/calc.yaml")),
            ("fanout.yaml", include_str!("../../../examples/fanout.yaml")),
            (
                "failing.yaml",
                include_str!("../../../examples/failing.yaml"),
            ),
        ] {
            let file = parse_workflow(text, name).unwrap_or_else(|e| panic!("{e}"));
            file.spec
                .validate()
                .unwrap_or_else(|e| panic!("{name}: {} ({})", e.message, e.field));
            for step in &file.spec.steps {
                assert!(
                    !step.job.image.is_empty(),
                    "{name}: {} has no image",
                    step.name
                );
            }
        }
    }

    #[test]
    fn step_lines_are_found_in_block_lists_only() {
        let text = "name: x\nsteps:  # the steps\n  - name: a\n    command: [x]\n  -\n    name: b\nother: 1\n";
        assert_eq!(step_line(text, 0), Some((3, 3)));
        assert_eq!(step_line(text, 1), Some((5, 3)));
        assert_eq!(step_line(text, 2), None);
        assert_eq!(step_line("name: x\nsteps: [{name: a}]\n", 0), None);
    }

    #[test]
    fn empty_and_non_mapping_files_are_refused() {
        let err = parse_workflow("", "e.yaml").unwrap_err().to_string();
        assert!(err.contains("e.yaml") && err.contains("empty"), "{err}");
        let err = parse_workflow("- a\n- b\n", "l.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mapping with `name` and `steps`"), "{err}");
    }

    #[test]
    fn server_validation_errors_name_the_file_and_step() {
        let file = parse_workflow(CALC, "calc.yaml").unwrap();
        let failure = |field: Option<&str>| -> anyhow::Error {
            ApiFailure {
                status: 400,
                error: drover_proto::model::ApiError {
                    code: drover_proto::ErrorCode::InvalidArgument,
                    message: "\"gen\" is not a step of this workflow".into(),
                    field: field.map(str::to_string),
                },
            }
            .into()
        };
        let err = in_file(failure(Some("steps[1].depends_on[0]")), &file);
        assert_eq!(
            crate::error::render(&err),
            "error: calc.yaml: step \"double\": \"gen\" is not a step of this workflow (field: steps[1].depends_on[0])"
        );
        assert_eq!(crate::error::exit_code(&err), 2);
        let err = in_file(failure(Some("steps")), &file);
        assert!(crate::error::render(&err).starts_with("error: calc.yaml: \"gen\""));
        assert_eq!(step_index("steps[12].array"), Some(12));
        assert_eq!(step_index("name"), None);
    }
}
