//! Workflows (DESIGN §2, §8): named steps of container jobs with
//! dependencies, arrays and artifacts passed between steps.
//!
//! A [`WorkflowSpec`] is what a user writes (YAML for the CLI, JSON over
//! HTTP). [`WorkflowSpec::validate`] checks everything that can be checked
//! without the coordinator's state, before anything is written; and
//! [`WorkflowSpec::expand`] turns it into the run's jobs, one per step or
//! per array task, each linked to its run and step.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{validate_name, EnvValue, FieldError, InputSpec, JobSpec, JobState, MAX_INPUTS};

/// Most steps in one workflow.
pub const MAX_STEPS: usize = 100;
/// Most tasks of one array step.
pub const MAX_ARRAY: u32 = 256;
/// Most jobs (steps and array tasks together) in one run.
pub const MAX_RUN_JOBS: usize = 1_000;
/// Most dependency edges between jobs in one run (an array of N depending on
/// an array of M counts N × M).
pub const MAX_RUN_EDGES: usize = 20_000;

/// The environment variables an array task gets.
pub const TASK_INDEX_ENV: &str = "DROVER_TASK_INDEX";
pub const TASK_COUNT_ENV: &str = "DROVER_TASK_COUNT";

/// A workflow file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub steps: Vec<StepSpec>,
}

/// One step: a job spec plus where it sits in the graph. Unknown fields are
/// rejected (a typo is an error, not an ignored setting).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct StepSpec {
    /// Unique in the workflow; names the step's input directory in the steps
    /// that read its outputs (`/input/<name>/`).
    pub name: String,
    /// Steps that must all SUCCEED before this one is queued.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Run N tasks of this step, each with `DROVER_TASK_INDEX` (0..N) and
    /// `DROVER_TASK_COUNT`. `array: 8` or `array: {count: 8}`.
    #[serde(default)]
    pub array: Option<ArrayCount>,
    /// Steps whose outputs this step reads; default: every step it depends
    /// on that declares `outputs`. Each must be one of `depends_on`.
    #[serde(default)]
    pub inputs: Option<Vec<String>>,
    /// Everything else is the job spec (`image`, `command`, `env`, `outputs`…).
    pub job: JobSpec,
}

/// The step's own fields, next to the job spec's.
const STEP_FIELDS: [&str; 4] = ["name", "depends_on", "array", "inputs"];

impl TryFrom<serde_json::Map<String, serde_json::Value>> for StepSpec {
    type Error = String;

    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        fn take<T: serde::de::DeserializeOwned + Default>(
            map: &mut serde_json::Map<String, serde_json::Value>,
            key: &str,
        ) -> Result<T, String> {
            match map.remove(key) {
                None | Some(serde_json::Value::Null) => Ok(T::default()),
                Some(v) => {
                    serde_json::from_value(v).map_err(|e| format!("step field `{key}`: {e}"))
                }
            }
        }
        let name: String = take(&mut map, "name")?;
        if name.is_empty() {
            return Err("every step needs a `name`".into());
        }
        let depends_on = take(&mut map, "depends_on")?;
        let array = take(&mut map, "array")?;
        let inputs = take(&mut map, "inputs")?;
        let job: JobSpec = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| {
            let e = e.to_string();
            if e.starts_with("unknown field") {
                format!(
                    "step {name:?}: {e}, or a step field: {}",
                    STEP_FIELDS.join(", ")
                )
            } else {
                format!("step {name:?}: {e}")
            }
        })?;
        Ok(StepSpec {
            name,
            depends_on,
            array,
            inputs,
            job,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a task count: `array: 8` or `array: {count: 8}`"
)]
pub enum ArrayCount {
    Count(u32),
    Spec { count: u32 },
}

impl ArrayCount {
    pub fn count(self) -> u32 {
        match self {
            ArrayCount::Count(n) | ArrayCount::Spec { count: n } => n,
        }
    }
}

impl StepSpec {
    /// How many jobs the step becomes.
    pub fn tasks(&self) -> u32 {
        self.array.map_or(1, ArrayCount::count)
    }

    /// The steps whose outputs this step reads.
    pub fn input_steps<'a>(&'a self, workflow: &'a WorkflowSpec) -> Vec<&'a str> {
        match &self.inputs {
            Some(inputs) => inputs.iter().map(String::as_str).collect(),
            None => self
                .depends_on
                .iter()
                .filter(|d| workflow.step(d).is_some_and(|s| s.job.outputs))
                .map(String::as_str)
                .collect(),
        }
    }
}

/// Where a job sits in a workflow run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowLink {
    pub run_id: String,
    pub step: String,
    /// The task's index for array steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_index: Option<u32>,
}

/// One step of a run as stored: its dependencies and its jobs by task index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStep {
    pub name: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// For array steps, the task count (`jobs.len()`); `None` for plain steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<u32>,
    pub jobs: Vec<String>,
}

/// A job of a run to create.
#[derive(Debug, Clone)]
pub struct ExpandedJob {
    pub id: String,
    pub spec: JobSpec,
    pub link: WorkflowLink,
}

/// A workflow turned into a run's steps and jobs.
#[derive(Debug, Clone)]
pub struct Expansion {
    pub steps: Vec<RunStep>,
    pub jobs: Vec<ExpandedJob>,
}

impl WorkflowSpec {
    pub fn step(&self, name: &str) -> Option<&StepSpec> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Checks the workflow and every step's job spec. Fields are named as in
    /// the file: `steps[2].depends_on[0]`.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        if self.description.len() > 4096 {
            return Err(FieldError::new("description", "must be at most 4096 bytes"));
        }
        if self.steps.is_empty() {
            return Err(FieldError::new(
                "steps",
                "must list at least one step (name, image, command…)",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(FieldError::new(
                "steps",
                format!(
                    "has {} steps; the limit is {MAX_STEPS}: split the workflow or use array steps",
                    self.steps.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            validate_name(&format!("steps[{i}].name"), &step.name).map_err(|e| {
                FieldError::new(
                    e.field,
                    format!(
                        "{}; step names become directory names under /input",
                        e.message
                    ),
                )
            })?;
            if !seen.insert(step.name.as_str()) {
                return Err(FieldError::new(
                    format!("steps[{i}].name"),
                    format!(
                        "{:?} is used by two steps: step names must be unique",
                        step.name
                    ),
                ));
            }
        }
        let mut jobs = 0usize;
        let mut edges = 0usize;
        for (i, step) in self.steps.iter().enumerate() {
            self.validate_step(i, step)?;
            jobs += step.tasks() as usize;
            edges += step.tasks() as usize
                * step
                    .depends_on
                    .iter()
                    .filter_map(|d| self.step(d))
                    .map(|d| d.tasks() as usize)
                    .sum::<usize>();
        }
        if jobs > MAX_RUN_JOBS {
            return Err(FieldError::new(
                "steps",
                format!("expand to {jobs} jobs; the limit per run is {MAX_RUN_JOBS}"),
            ));
        }
        if edges > MAX_RUN_EDGES {
            return Err(FieldError::new(
                "steps",
                format!(
                    "make {edges} job-to-job dependencies (an array of N depending on an array of M counts N × M); the limit is {MAX_RUN_EDGES}"
                ),
            ));
        }
        if let Some(cycle) = self.cycle() {
            return Err(FieldError::new(
                "steps",
                format!("the dependencies form a cycle: {}", cycle.join(" -> ")),
            ));
        }
        Ok(())
    }

    fn validate_step(&self, i: usize, step: &StepSpec) -> Result<(), FieldError> {
        let field = |f: &str| format!("steps[{i}].{f}");
        let mut deps = BTreeSet::new();
        for (d, dep) in step.depends_on.iter().enumerate() {
            if self.step(dep).is_none() {
                return Err(FieldError::new(
                    field(&format!("depends_on[{d}]")),
                    format!(
                        "{dep:?} is not a step of this workflow; steps are: {}",
                        self.steps
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            if dep == &step.name {
                return Err(FieldError::new(
                    field(&format!("depends_on[{d}]")),
                    "a step cannot depend on itself",
                ));
            }
            if !deps.insert(dep.as_str()) {
                return Err(FieldError::new(
                    field(&format!("depends_on[{d}]")),
                    format!("{dep:?} is listed twice"),
                ));
            }
        }
        if let Some(array) = step.array {
            let n = array.count();
            if !(1..=MAX_ARRAY).contains(&n) {
                return Err(FieldError::new(
                    field("array"),
                    format!("is {n}; an array step runs 1 to {MAX_ARRAY} tasks"),
                ));
            }
        }
        if let Some(inputs) = &step.inputs {
            for (k, input) in inputs.iter().enumerate() {
                let Some(source) = self.step(input) else {
                    return Err(FieldError::new(
                        field(&format!("inputs[{k}]")),
                        format!("{input:?} is not a step of this workflow"),
                    ));
                };
                if !deps.contains(input.as_str()) {
                    return Err(FieldError::new(
                        field(&format!("inputs[{k}]")),
                        format!(
                            "reads step {input:?} but does not depend on it: add it to depends_on"
                        ),
                    ));
                }
                if !source.job.outputs {
                    return Err(FieldError::new(
                        field(&format!("inputs[{k}]")),
                        format!("step {input:?} declares no outputs: add `outputs: true` to it"),
                    ));
                }
            }
        }
        let input_dirs: usize = step
            .input_steps(self)
            .iter()
            .filter_map(|s| self.step(s))
            .map(|s| s.tasks() as usize)
            .sum();
        if input_dirs > MAX_INPUTS {
            return Err(FieldError::new(
                field("inputs"),
                format!(
                    "reads {input_dirs} artifacts (array tasks count one each); the limit is {MAX_INPUTS}: add a step that merges them"
                ),
            ));
        }
        if step.job.idempotency_key.is_some() {
            return Err(FieldError::new(
                field("idempotency_key"),
                "is not supported on workflow steps: each run creates its own jobs",
            ));
        }
        if !step.job.name.is_empty() {
            // Unreachable through serde (the step's `name` takes the key), but
            // a programmatic spec could set both.
            return Err(FieldError::new(
                field("name"),
                "set the step's name only once",
            ));
        }
        for reserved in [TASK_INDEX_ENV, TASK_COUNT_ENV] {
            if step.array.is_some() && step.job.env.contains_key(reserved) {
                return Err(FieldError::new(
                    field(&format!("env.{reserved}")),
                    "is set by Drover for array tasks: remove it",
                ));
            }
        }
        // The spec as it will run (any task: they differ only in env).
        self.task_spec(step, 0, &BTreeMap::new())
            .validate()
            .map_err(|e| FieldError::new(field(&e.field), e.message))
    }

    /// The first cycle in the dependency graph, as step names ending where
    /// they started (`a -> b -> a`).
    fn cycle(&self) -> Option<Vec<String>> {
        // 0 unvisited, 1 on the stack, 2 done.
        let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
        let mut stack: Vec<&str> = Vec::new();
        fn visit<'a>(
            wf: &'a WorkflowSpec,
            name: &'a str,
            mark: &mut BTreeMap<&'a str, u8>,
            stack: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match mark.get(name).copied().unwrap_or(0) {
                2 => return None,
                1 => {
                    let start = stack.iter().position(|s| *s == name).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(name.to_string());
                    return Some(cycle);
                }
                _ => {}
            }
            mark.insert(name, 1);
            stack.push(name);
            if let Some(step) = wf.step(name) {
                for dep in &step.depends_on {
                    if let Some(cycle) = visit(wf, dep, mark, stack) {
                        return Some(cycle);
                    }
                }
            }
            stack.pop();
            mark.insert(name, 2);
            None
        }
        for step in &self.steps {
            if let Some(cycle) = visit(self, &step.name, &mut mark, &mut stack) {
                return Some(cycle);
            }
        }
        None
    }

    /// The job spec of one task of `step`; `ids` maps (step, task) to job ids
    /// for its inputs (absent ids leave the input out, for validation).
    fn task_spec(
        &self,
        step: &StepSpec,
        index: u32,
        ids: &BTreeMap<(&str, u32), String>,
    ) -> JobSpec {
        let mut spec = step.job.clone();
        spec.name = match step.array {
            Some(_) => format!("{}/{}[{index}]", self.name, step.name),
            None => format!("{}/{}", self.name, step.name),
        };
        if let Some(array) = step.array {
            spec.env
                .insert(TASK_INDEX_ENV.into(), EnvValue::Plain(index.to_string()));
            spec.env.insert(
                TASK_COUNT_ENV.into(),
                EnvValue::Plain(array.count().to_string()),
            );
        }
        spec.inputs = Vec::new();
        for source in step.input_steps(self) {
            let Some(source_step) = self.step(source) else {
                continue;
            };
            for task in 0..source_step.tasks() {
                let name = match source_step.array {
                    Some(_) => format!("{source}/{task}"),
                    None => source.to_string(),
                };
                let job = ids
                    .get(&(source, task))
                    .cloned()
                    .unwrap_or_else(|| "0".repeat(26));
                spec.inputs.push(InputSpec { name, job });
            }
        }
        spec
    }

    /// The run's steps and jobs, with ids from `new_id` (ULIDs), in step
    /// order. Call after [`validate`](Self::validate).
    pub fn expand(&self, run_id: &str, mut new_id: impl FnMut() -> String) -> Expansion {
        let mut ids: BTreeMap<(&str, u32), String> = BTreeMap::new();
        let mut steps = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            let jobs: Vec<String> = (0..step.tasks()).map(|_| new_id()).collect();
            for (task, id) in jobs.iter().enumerate() {
                ids.insert((step.name.as_str(), task as u32), id.clone());
            }
            steps.push(RunStep {
                name: step.name.clone(),
                depends_on: step.depends_on.clone(),
                array: step.array.map(ArrayCount::count),
                jobs,
            });
        }
        let mut jobs = Vec::new();
        for step in &self.steps {
            for task in 0..step.tasks() {
                jobs.push(ExpandedJob {
                    id: ids[&(step.name.as_str(), task)].clone(),
                    spec: self.task_spec(step, task, &ids),
                    link: WorkflowLink {
                        run_id: run_id.to_string(),
                        step: step.name.clone(),
                        task_index: step.array.map(|_| task),
                    },
                });
            }
        }
        Expansion { steps, jobs }
    }
}

/// How many of a job's dependencies (jobs of the steps it depends on) it
/// waits for: the initial value of its counter.
pub fn dependency_count(steps: &[RunStep], step: &str) -> u32 {
    let Some(step) = steps.iter().find(|s| s.name == step) else {
        return 0;
    };
    step.depends_on
        .iter()
        .filter_map(|d| steps.iter().find(|s| &s.name == d))
        .map(|s| s.jobs.len() as u32)
        .sum()
}

/// The jobs that wait for `step`'s jobs: every job of every step that
/// depends on it.
pub fn dependents_of<'a>(steps: &'a [RunStep], step: &str) -> Vec<&'a str> {
    steps
        .iter()
        .filter(|s| s.depends_on.iter().any(|d| d == step))
        .flat_map(|s| s.jobs.iter().map(String::as_str))
        .collect()
}

/// The steps ordered so that every step comes before the steps it depends
/// on (the order to cancel a run in: a PENDING step is cancelled before its
/// dependency's end could fail it). Steps in a cycle (never stored) keep
/// their relative order at the end.
pub fn dependents_first(steps: &[RunStep]) -> Vec<&RunStep> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut order: Vec<&RunStep> = Vec::with_capacity(steps.len());
    // Repeatedly take the steps nothing unplaced depends on.
    while order.len() < steps.len() {
        let ready: Vec<&RunStep> = steps
            .iter()
            .filter(|s| !placed.contains(s.name.as_str()))
            .filter(|s| {
                !steps.iter().any(|other| {
                    !placed.contains(other.name.as_str())
                        && other.name != s.name
                        && other.depends_on.iter().any(|d| d == &s.name)
                })
            })
            .collect();
        if ready.is_empty() {
            order.extend(steps.iter().filter(|s| !placed.contains(s.name.as_str())));
            break;
        }
        for step in ready {
            placed.insert(&step.name);
            order.push(step);
        }
    }
    order
}

/// The reason a dependent fails with when one of its dependencies ends
/// unsuccessfully.
pub fn dependency_failed_reason(step: &str, job_id: &str, state: JobState) -> String {
    format!("dependency_failed: step {step} (job {job_id}) ended {state}")
}

/// The prefix every such reason starts with.
pub const DEPENDENCY_FAILED: &str = "dependency_failed";

// ---- API types ----------------------------------------------------------

/// Overall state of a run, derived from its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    /// Some jobs are not finished yet.
    Running,
    Succeeded,
    /// A job failed (or timed out); its dependents failed with it.
    Failed,
    /// The run was cancelled.
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "RUNNING",
            RunState::Succeeded => "SUCCEEDED",
            RunState::Failed => "FAILED",
            RunState::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        self != RunState::Running
    }

    /// The state of a run (or a step) whose jobs are in `states`.
    pub fn of(states: impl IntoIterator<Item = JobState>, cancel_requested: bool) -> RunState {
        let mut all_succeeded = true;
        let mut failed = false;
        let mut cancelled = false;
        for state in states {
            if !state.is_terminal() {
                return RunState::Running;
            }
            all_succeeded &= state == JobState::Succeeded;
            failed |= matches!(state, JobState::Failed | JobState::TimedOut);
            cancelled |= state == JobState::Cancelled;
        }
        if all_succeeded {
            RunState::Succeeded
        } else if cancel_requested || (cancelled && !failed) {
            RunState::Cancelled
        } else {
            RunState::Failed
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job of a step as a run shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTask {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_index: Option<u32>,
    pub state: JobState,
    pub attempt: u64,
    /// Wall-clock time of its attempts that ran.
    pub duration_ms: u64,
    /// `None` when an attempt ran on an agent with no known price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStepStatus {
    pub name: String,
    pub depends_on: Vec<String>,
    /// The step's state: PENDING, QUEUED, RUNNING (any task leased or
    /// running), or, once every task ended, the run-style outcome.
    pub state: String,
    pub tasks: u32,
    /// Tasks in a terminal state.
    pub done: u32,
    pub succeeded: u32,
    /// From the first attempt's start to the last one's end.
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub jobs: Vec<RunTask>,
}

/// `GET /v1/workflows/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRun {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub state: RunState,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default)]
    pub cancel_requested: bool,
    pub steps: Vec<RunStepStatus>,
    /// The sum of every attempt's cost; `None` when any price is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// One run in `GET /v1/workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: String,
    pub name: String,
    pub state: RunState,
    pub created_at_ms: i64,
    pub jobs: u32,
    pub done: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunList {
    pub runs: Vec<RunSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests;
