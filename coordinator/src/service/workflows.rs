//! Workflow runs (DESIGN §2, §8): create a run from a workflow spec, show it
//! with per-step progress and cost, list and cancel runs; plus the price of
//! each attempt, decided at claim time and recorded at start.

use std::collections::HashMap;

use drover_proto::model::{Job, JobState, Resources};
use drover_proto::v1;
use drover_proto::workflow::{
    RunList, RunState, RunStepStatus, RunSummary, RunTask, WorkflowRun, WorkflowSpec,
};

use super::{poisoned, Service};
use crate::cost;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{ClaimedJob, LeaseRef, NewJob, RunRecord, SessionAuth};

/// Prices remembered between claim and start; beyond this many (leases
/// that never started) the memory is dropped and starts read the job.
const MAX_REMEMBERED_RATES: usize = 100_000;
/// Finished jobs whose attempts (durations, costs) are kept for run views.
const MAX_CACHED_ATTEMPTS: usize = 100_000;

impl Service {
    /// Validates the workflow (nothing is written unless every step is
    /// good), then creates the run and its jobs in one store operation.
    pub async fn create_workflow(&self, spec: WorkflowSpec) -> ServiceResult<WorkflowRun> {
        spec.validate()?;
        let mut largest_by_pool: HashMap<String, Option<Resources>> = HashMap::new();
        let run_id = ulid::Ulid::new().to_string();
        let expansion = spec.expand(&run_id, || ulid::Ulid::new().to_string());
        // Tasks of a step differ only in env and inputs: check one per step.
        for (i, step) in spec.steps.iter().enumerate() {
            let Some(job) = expansion.jobs.iter().find(|j| j.link.step == step.name) else {
                continue;
            };
            self.check_placement(&job.spec, &mut largest_by_pool)
                .await
                .map_err(|e| match e {
                    ServiceError::Invalid(e) => {
                        ServiceError::invalid(&format!("steps[{i}].{}", e.field), e.message)
                    }
                    e => e,
                })?;
        }
        let now = self.now();
        let run = RunRecord {
            id: run_id,
            name: spec.name.clone(),
            description: spec.description.clone(),
            created_at_ms: now,
            steps: expansion.steps,
            cancel_requested: false,
        };
        let mut roots: HashMap<String, usize> = HashMap::new();
        let jobs: Vec<NewJob> = expansion
            .jobs
            .into_iter()
            .map(|j| {
                let step = run.steps.iter().find(|s| s.name == j.link.step);
                if step.is_some_and(|s| s.depends_on.is_empty()) {
                    *roots.entry(j.spec.pool.clone()).or_default() += 1;
                }
                NewJob {
                    id: j.id,
                    spec: j.spec,
                    workflow: Some(j.link),
                }
            })
            .collect();
        let count = jobs.len() as u64;
        self.store.create_run(&run, jobs, now).await?;
        self.metrics
            .jobs_submitted
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        for (pool, n) in roots {
            self.wake_pool(&pool, n);
        }
        tracing::info!(run = %run.id, name = %run.name, jobs = count, "workflow run created");
        self.run_view(run).await
    }

    pub async fn workflow(&self, run_id: &str) -> ServiceResult<WorkflowRun> {
        let run = self.store.get_run(run_id).await?;
        self.run_view(run).await
    }

    pub async fn workflows(
        &self,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> ServiceResult<RunList> {
        let limit = limit.unwrap_or(20);
        if !(1..=200).contains(&limit) {
            return Err(ServiceError::invalid("limit", "must be between 1 and 200"));
        }
        let page = self.store.list_runs(cursor, limit).await?;
        let mut runs = Vec::with_capacity(page.items.len());
        for run in page.items {
            let ids: Vec<String> = run.job_ids().map(str::to_string).collect();
            let jobs = self.store.get_jobs(&ids).await?;
            runs.push(RunSummary {
                state: RunState::of(jobs.iter().map(|j| j.state), run.cancel_requested),
                jobs: ids.len() as u32,
                done: jobs.iter().filter(|j| j.state.is_terminal()).count() as u32,
                id: run.id,
                name: run.name,
                created_at_ms: run.created_at_ms,
            });
        }
        Ok(RunList {
            runs,
            next_cursor: page.next_cursor,
        })
    }

    /// Cancels every unfinished step; running jobs are stopped by their
    /// agents (told at once on their command streams).
    pub async fn cancel_workflow(&self, run_id: &str) -> ServiceResult<WorkflowRun> {
        let run = self.store.cancel_run(run_id, self.now()).await?;
        let ids: Vec<String> = run.job_ids().map(str::to_string).collect();
        for job in self.store.get_jobs(&ids).await? {
            self.tell_agent_to_cancel(&job);
        }
        self.bump_logs();
        self.run_view(run).await
    }

    /// Pushes a cancel to the agent holding `job`, if it holds it.
    pub(super) fn tell_agent_to_cancel(&self, job: &Job) {
        if let (true, Some(session)) = (job.cancel_requested, &job.session_id) {
            if matches!(job.state, JobState::Leased | JobState::Running) {
                self.push(
                    session,
                    v1::command::Command::Cancel(v1::LeaseRef {
                        job_id: job.id.clone(),
                        attempt: job.attempt,
                        session_id: session.clone(),
                    }),
                );
            }
        }
    }

    /// The reaper's pass over PENDING workflow jobs (the backstop of
    /// dependency release). Returns how many it released.
    pub async fn release_pending(&self) -> ServiceResult<usize> {
        let released = self.store.release_pending(self.now()).await?;
        self.wake_released(&released);
        Ok(released.len())
    }

    async fn run_view(&self, run: RunRecord) -> ServiceResult<WorkflowRun> {
        let now = self.now();
        let ids: Vec<String> = run.job_ids().map(str::to_string).collect();
        let jobs: HashMap<String, Job> = self
            .store
            .get_jobs(&ids)
            .await?
            .into_iter()
            .map(|j| (j.id.clone(), j))
            .collect();
        let mut steps = Vec::with_capacity(run.steps.len());
        let mut total: Option<f64> = Some(0.0);
        let mut finished_at_ms: Option<i64> = None;
        for step in &run.steps {
            let mut tasks = Vec::with_capacity(step.jobs.len());
            let mut first_start: Option<i64> = None;
            let mut last_end: Option<i64> = None;
            let mut step_cost: Option<f64> = Some(0.0);
            for (index, id) in step.jobs.iter().enumerate() {
                let Some(job) = jobs.get(id) else {
                    return Err(ServiceError::NotFound(format!(
                        "job {id} of run {} (step {}) is gone: finished jobs are kept for the store's retention period",
                        run.id, step.name
                    )));
                };
                let attempts = self.attempts_of(job, now).await?;
                for a in &attempts {
                    first_start =
                        Some(first_start.map_or(a.started_at_ms, |f| f.min(a.started_at_ms)));
                    let end = a.ended_at_ms.unwrap_or(now);
                    last_end = Some(last_end.map_or(end, |l| l.max(end)));
                }
                let usd = attempts.iter().map(|a| a.usd).sum::<Option<f64>>();
                step_cost = step_cost.zip(usd).map(|(a, b)| a + b);
                if let Some(at) = job.finished_at_ms {
                    finished_at_ms = Some(finished_at_ms.map_or(at, |f| f.max(at)));
                }
                tasks.push(RunTask {
                    job_id: id.clone(),
                    task_index: step.array.map(|_| index as u32),
                    state: job.state,
                    attempt: job.attempt,
                    duration_ms: attempts.iter().map(|a| a.duration_ms).sum(),
                    cost_usd: usd,
                    exit_code: job.exit_code,
                    reason: job.reason.clone(),
                });
            }
            total = total.zip(step_cost).map(|(a, b)| a + b);
            steps.push(RunStepStatus {
                name: step.name.clone(),
                depends_on: step.depends_on.clone(),
                state: step_state(
                    &tasks.iter().map(|t| t.state).collect::<Vec<_>>(),
                    run.cancel_requested,
                ),
                tasks: tasks.len() as u32,
                done: tasks.iter().filter(|t| t.state.is_terminal()).count() as u32,
                succeeded: tasks
                    .iter()
                    .filter(|t| t.state == JobState::Succeeded)
                    .count() as u32,
                duration_ms: first_start
                    .zip(last_end)
                    .map_or(0, |(s, e)| (e - s).max(0) as u64),
                cost_usd: step_cost,
                jobs: tasks,
            });
        }
        let state = RunState::of(jobs.values().map(|j| j.state), run.cancel_requested);
        Ok(WorkflowRun {
            id: run.id,
            name: run.name,
            description: run.description,
            state,
            created_at_ms: run.created_at_ms,
            finished_at_ms: finished_at_ms.filter(|_| state.is_terminal()),
            cancel_requested: run.cancel_requested,
            steps,
            cost_usd: total,
        })
    }

    /// A job's attempts with their durations and costs. A finished job's
    /// never change: they are kept (keyed by its last update, which a retry
    /// moves), so following a large run does not re-read every job's events
    /// on every poll.
    async fn attempts_of(&self, job: &Job, now: i64) -> ServiceResult<Vec<cost::AttemptCost>> {
        if job.attempt == 0 {
            return Ok(Vec::new());
        }
        let key = (job.id.clone(), job.updated_at_ms);
        if job.state.is_terminal() {
            if let Some(hit) = self.finished_attempts.lock().map_err(poisoned)?.get(&key) {
                return Ok(hit.clone());
            }
        }
        let attempts = cost::attempt_costs(&self.store.events(&job.id).await?, now);
        if job.state.is_terminal() {
            let mut cache = self.finished_attempts.lock().map_err(poisoned)?;
            if cache.len() >= MAX_CACHED_ATTEMPTS {
                cache.clear();
            }
            cache.insert(key, attempts.clone());
        }
        Ok(attempts)
    }

    /// Prices the fresh leases of a claim for their start.
    pub(super) fn remember_rates(&self, session: &SessionAuth, claimed: &[ClaimedJob]) {
        let Ok(mut rates) = self.rates.lock() else {
            return;
        };
        if rates.len() >= MAX_REMEMBERED_RATES {
            rates.clear();
        }
        for job in claimed {
            let rate = self
                .config
                .prices
                .rate(&session.labels, &job.spec.resources);
            rates.insert((job.lease.job_id.clone(), job.lease.attempt), rate);
        }
    }

    /// The price remembered for a lease at its claim: `None` when this
    /// coordinator did not see the claim, `Some(None)` for an unknown price.
    pub(super) fn take_rate(&self, lease: &LeaseRef) -> Option<Option<f64>> {
        self.rates
            .lock()
            .map_err(poisoned)
            .ok()?
            .remove(&(lease.job_id.clone(), lease.attempt))
    }
}

/// A step's state for people: the run-style outcome once every task ended,
/// else the most advanced state any task is in.
fn step_state(states: &[JobState], cancel_requested: bool) -> String {
    if states.iter().all(|s| s.is_terminal()) {
        return RunState::of(states.iter().copied(), cancel_requested).to_string();
    }
    let state = if states
        .iter()
        .any(|s| matches!(s, JobState::Running | JobState::Leased))
    {
        JobState::Running
    } else if states.contains(&JobState::Queued) {
        JobState::Queued
    } else {
        JobState::Pending
    };
    state.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_shows_its_most_advanced_task_until_all_ended() {
        use JobState::*;
        let s = |states: &[JobState]| step_state(states, false);
        assert_eq!(s(&[Pending, Pending]), "PENDING");
        assert_eq!(s(&[Pending, Queued]), "QUEUED");
        assert_eq!(s(&[Succeeded, Leased, Queued]), "RUNNING");
        assert_eq!(s(&[Succeeded, Succeeded]), "SUCCEEDED");
        assert_eq!(s(&[Succeeded, Failed]), "FAILED");
        assert_eq!(step_state(&[Cancelled], true), "CANCELLED");
    }
}
