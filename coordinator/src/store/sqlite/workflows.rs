//! Workflow runs in SQLite: the `runs` table (one row per run, its steps as
//! JSON) and `job_links` (one row per workflow job: its run, step, task and
//! the number of dependency jobs it still waits for).
//!
//! Everything here runs inside the caller's transaction, so a completion and
//! the release or failure of its dependents are one atomic step.

use std::collections::{BTreeMap, HashMap};

use drover_proto::model::{FieldError, JobState};
use drover_proto::workflow::{
    dependency_count, dependency_failed_reason, dependents_first, dependents_of, RunStep,
};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    append_event, backend, cancel_tx, insert_job, json_err, load_job, page_of, parse_state, Cached,
    NewJob, Page, RunRecord, StoreError, StoreResult, SUBMITTED,
};

/// The event (and reason) of a PENDING job released to QUEUED.
const DEPENDENCIES_SUCCEEDED: &str = "dependencies succeeded";

const RUN_COLUMNS: &str = "id, name, description, created_at_ms, steps, cancel_requested";

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<(RunRecord, String)> {
    Ok((
        RunRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            description: r.get(2)?,
            created_at_ms: r.get(3)?,
            steps: Vec::new(),
            cancel_requested: r.get::<_, i64>(5)? != 0,
        },
        r.get(4)?,
    ))
}

fn finish_run((mut run, steps): (RunRecord, String)) -> StoreResult<RunRecord> {
    run.steps = serde_json::from_str(&steps).map_err(json_err)?;
    Ok(run)
}

pub(super) fn load_run(tx: &Connection, run_id: &str) -> StoreResult<RunRecord> {
    let row = tx
        .query_row_cached(
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
            [run_id],
            row_to_run,
        )
        .optional()
        .map_err(backend)?
        .ok_or_else(|| StoreError::NotFound(format!("workflow run {run_id}")))?;
    finish_run(row)
}

fn load_steps(tx: &Connection, run_id: &str) -> StoreResult<Vec<RunStep>> {
    let json: String = tx
        .prepare_cached("SELECT steps FROM runs WHERE id = ?1")
        .map_err(backend)?
        .query_row([run_id], |r| r.get(0))
        .map_err(backend)?;
    serde_json::from_str(&json).map_err(json_err)
}

fn invalid(message: String) -> StoreError {
    StoreError::Invalid(FieldError::new("jobs", message))
}

/// The reason (and PENDING event) of a job waiting for `n` dependency jobs.
fn waiting_reason(step: &RunStep, n: u32) -> String {
    format!(
        "waiting for {n} job{} of step{} {}",
        if n == 1 { "" } else { "s" },
        if step.depends_on.len() == 1 { "" } else { "s" },
        step.depends_on.join(", ")
    )
}

pub(super) fn create_run(
    tx: &Connection,
    run: &RunRecord,
    jobs: Vec<NewJob>,
    now_ms: i64,
) -> StoreResult<()> {
    let exists: Option<i64> = tx
        .query_row_cached("SELECT 1 FROM runs WHERE id = ?1", [&run.id], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    if exists.is_some() {
        return Err(StoreError::Conflict(format!(
            "workflow run {} already exists",
            run.id
        )));
    }
    tx.execute_cached(
        "INSERT INTO runs (id, name, description, created_at_ms, steps, cancel_requested) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            run.id,
            run.name,
            run.description,
            run.created_at_ms,
            serde_json::to_string(&run.steps).map_err(json_err)?,
            run.cancel_requested as i64,
        ],
    )
    .map_err(backend)?;
    // Each job must be one its step lists (checked below) and ids are
    // unique (the primary key), so equal counts mean the same jobs.
    let listed = run.job_ids().count();
    if jobs.len() != listed {
        return Err(invalid(format!(
            "workflow run {} lists {listed} jobs but {} were given",
            run.id,
            jobs.len()
        )));
    }
    for job in jobs {
        let link = job.workflow.as_ref().ok_or_else(|| {
            invalid(format!(
                "job {} of workflow run {} has no workflow link",
                job.id, run.id
            ))
        })?;
        let step = run
            .steps
            .iter()
            .find(|s| s.name == link.step && s.jobs.contains(&job.id))
            .filter(|_| link.run_id == run.id)
            .ok_or_else(|| {
                invalid(format!(
                    "job {} claims step {:?} of run {}, which does not list it",
                    job.id, link.step, link.run_id
                ))
            })?;
        let waits_for = dependency_count(&run.steps, &step.name);
        if step.depends_on.is_empty() {
            insert_job(tx, &job.id, &job.spec, JobState::Queued, SUBMITTED, now_ms)?;
        } else {
            let reason = waiting_reason(step, waits_for);
            insert_job(tx, &job.id, &job.spec, JobState::Pending, &reason, now_ms)?;
        }
        tx.prepare_cached(
            "INSERT INTO job_links (job_id, run_id, step, task_index, deps_remaining) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(backend)?
        .execute(params![
            job.id,
            run.id,
            step.name,
            link.task_index.map(i64::from),
            waits_for
        ])
        .map_err(backend)?;
    }
    Ok(())
}

pub(super) fn list_runs(
    tx: &Connection,
    after: Option<&str>,
    limit: usize,
) -> StoreResult<Page<RunRecord>> {
    // Two statements, so that a page after a cursor seeks to it.
    let after_cursor = if after.is_some() {
        "WHERE id < ?1"
    } else {
        "WHERE ?1 IS NULL"
    };
    let mut stmt = tx
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs {after_cursor} ORDER BY id DESC LIMIT ?2"
        ))
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![after, limit as i64 + 1], row_to_run)
        .map_err(backend)?;
    let mut items = Vec::new();
    for row in rows {
        items.push(finish_run(row.map_err(backend)?)?);
    }
    Ok(page_of(items, limit, |r| &r.id))
}

/// See [`super::Store::cancel_run`]: dependents first, so a PENDING step is
/// cancelled before its dependency's cancel could fail it.
pub(super) fn cancel_run(tx: &Connection, run_id: &str, now_ms: i64) -> StoreResult<RunRecord> {
    let run = load_run(tx, run_id)?;
    let states = job_states(tx, run.job_ids())?;
    if states.values().all(|s| s.is_terminal()) {
        // Finished (or cancelled before): nothing changes, not even the flag.
        return Ok(run);
    }
    tx.execute_cached(
        "UPDATE runs SET cancel_requested = 1 WHERE id = ?1",
        [run_id],
    )
    .map_err(backend)?;
    for step in dependents_first(&run.steps) {
        for job_id in &step.jobs {
            if states.get(job_id).is_some_and(|s| !s.is_terminal()) {
                // Read again: cancelling may have moved it (never a
                // dependency's, but this costs one lookup).
                let job = load_job(tx, job_id)?;
                if !job.state.is_terminal() {
                    cancel_tx(tx, &job, now_ms)?;
                }
            }
        }
    }
    Ok(RunRecord {
        cancel_requested: true,
        ..run
    })
}

/// The states of the jobs with these ids that exist.
fn job_states<'a>(
    tx: &Connection,
    ids: impl Iterator<Item = &'a str>,
) -> StoreResult<HashMap<String, JobState>> {
    let ids = serde_json::to_string(&ids.collect::<Vec<_>>()).map_err(json_err)?;
    let mut stmt = tx
        .prepare_cached(
            "SELECT jobs.id, jobs.state FROM json_each(?1) AS w JOIN jobs ON jobs.id = w.value",
        )
        .map_err(backend)?;
    let rows = stmt
        .query_map([ids], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(backend)?;
    let mut out = HashMap::new();
    for row in rows {
        let (id, state) = row.map_err(backend)?;
        out.insert(id, parse_state(&state)?);
    }
    Ok(out)
}

/// Tells a workflow job's dependents that it reached `state`, in the
/// caller's transaction: SUCCEEDED counts down every job of every step
/// depending on its step and queues those reaching zero (returning their
/// pools); FAILED, CANCELLED or TIMED_OUT fails every PENDING dependent,
/// transitively. Anything else, or a job of no workflow, does nothing
/// beyond one primary-key lookup (and none for non-terminal states).
pub(super) fn settle_dependents(
    tx: &Connection,
    job_id: &str,
    state: JobState,
    now_ms: i64,
) -> StoreResult<Vec<String>> {
    if !state.is_terminal() {
        return Ok(Vec::new());
    }
    let link: Option<(String, String)> = tx
        .prepare_cached("SELECT run_id, step FROM job_links WHERE job_id = ?1")
        .map_err(backend)?
        .query_row([job_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?;
    let Some((run_id, step)) = link else {
        return Ok(Vec::new());
    };
    let steps = load_steps(tx, &run_id)?;
    if state != JobState::Succeeded {
        fail_dependents(tx, &steps, &step, job_id, state, now_ms)?;
        return Ok(Vec::new());
    }
    let mut released = Vec::new();
    for dependent in dependents_of(&steps, &step) {
        let remaining: Option<i64> = tx
            .prepare_cached(
                "UPDATE job_links SET deps_remaining = deps_remaining - 1 \
                 WHERE job_id = ?1 AND deps_remaining > 0 RETURNING deps_remaining",
            )
            .map_err(backend)?
            .query_row([dependent], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        if remaining == Some(0) {
            released.extend(queue_pending(tx, dependent, now_ms)?);
        }
    }
    Ok(released)
}

/// PENDING → QUEUED; the job's pool, or `None` when it was not PENDING.
fn queue_pending(tx: &Connection, job_id: &str, now_ms: i64) -> StoreResult<Option<String>> {
    let row: Option<(String, i64)> = tx
        .prepare_cached(
            "UPDATE jobs SET state = 'QUEUED', updated_at_ms = ?2, reason = ?3 \
             WHERE id = ?1 AND state = 'PENDING' RETURNING pool, attempt",
        )
        .map_err(backend)?
        .query_row(params![job_id, now_ms, DEPENDENCIES_SUCCEEDED], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(backend)?;
    let Some((pool, attempt)) = row else {
        return Ok(None);
    };
    append_event(
        tx,
        job_id,
        now_ms,
        attempt as u64,
        JobState::Queued,
        None,
        DEPENDENCIES_SUCCEEDED,
    )?;
    Ok(Some(pool))
}

/// PENDING → FAILED with `reason`; false when it was not PENDING.
fn fail_pending(tx: &Connection, job_id: &str, reason: &str, now_ms: i64) -> StoreResult<bool> {
    let attempt: Option<i64> = tx
        .prepare_cached(
            "UPDATE jobs SET state = 'FAILED', updated_at_ms = ?2, finished_at_ms = ?2, \
             reason = ?3 WHERE id = ?1 AND state = 'PENDING' RETURNING attempt",
        )
        .map_err(backend)?
        .query_row(params![job_id, now_ms, reason], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    let Some(attempt) = attempt else {
        return Ok(false);
    };
    append_event(
        tx,
        job_id,
        now_ms,
        attempt as u64,
        JobState::Failed,
        None,
        reason,
    )?;
    Ok(true)
}

/// Fails every PENDING job depending on `job_id` (of `step`, which ended
/// `state`), then theirs, and so on.
fn fail_dependents(
    tx: &Connection,
    steps: &[RunStep],
    step: &str,
    job_id: &str,
    state: JobState,
    now_ms: i64,
) -> StoreResult<()> {
    let mut ended = vec![(step.to_string(), job_id.to_string(), state)];
    while let Some((step, job_id, state)) = ended.pop() {
        let reason = dependency_failed_reason(&step, &job_id, state);
        for dependent in steps.iter().filter(|s| s.depends_on.contains(&step)) {
            for id in &dependent.jobs {
                if fail_pending(tx, id, &reason, now_ms)? {
                    ended.push((dependent.name.clone(), id.clone(), JobState::Failed));
                }
            }
        }
    }
    Ok(())
}

/// See [`super::Store::release_pending`]. One indexed query when nothing is
/// PENDING; otherwise one query of the dependencies' states per waiting step.
pub(super) fn release_pending(tx: &Connection, now_ms: i64) -> StoreResult<Vec<String>> {
    // run → step → its PENDING jobs.
    let mut waiting: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT jobs.id, l.run_id, l.step FROM jobs INDEXED BY jobs_pending \
                 JOIN job_links l ON l.job_id = jobs.id WHERE jobs.state = 'PENDING'",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(backend)?;
        for row in rows {
            let (job_id, run_id, step) = row.map_err(backend)?;
            waiting
                .entry(run_id)
                .or_default()
                .entry(step)
                .or_default()
                .push(job_id);
        }
    }
    let mut released = Vec::new();
    for (run_id, by_step) in waiting {
        let steps = load_steps(tx, &run_id)?;
        for (step_name, job_ids) in by_step {
            let Some(step) = steps.iter().find(|s| s.name == step_name) else {
                continue;
            };
            let deps: Vec<(&str, &str)> = step
                .depends_on
                .iter()
                .filter_map(|d| steps.iter().find(|s| &s.name == d))
                .flat_map(|s| s.jobs.iter().map(|j| (s.name.as_str(), j.as_str())))
                .collect();
            // Read now, not before the loop: an earlier step of this sweep
            // may have failed some of them.
            let states = job_states(tx, deps.iter().map(|(_, id)| *id))?;
            let failed = deps.iter().find_map(|(s, id)| {
                states
                    .get(*id)
                    .filter(|st| {
                        matches!(
                            st,
                            JobState::Failed | JobState::Cancelled | JobState::TimedOut
                        )
                    })
                    .map(|st| (*s, *id, *st))
            });
            if let Some((dep_step, dep_id, dep_state)) = failed {
                let reason = dependency_failed_reason(dep_step, dep_id, dep_state);
                for id in &job_ids {
                    if fail_pending(tx, id, &reason, now_ms)? {
                        fail_dependents(tx, &steps, &step_name, id, JobState::Failed, now_ms)?;
                    }
                }
            } else if deps
                .iter()
                .all(|(_, id)| states.get(*id) == Some(&JobState::Succeeded))
            {
                for id in &job_ids {
                    tx.prepare_cached("UPDATE job_links SET deps_remaining = 0 WHERE job_id = ?1")
                        .map_err(backend)?
                        .execute([id])
                        .map_err(backend)?;
                    released.extend(queue_pending(tx, id, now_ms)?);
                }
            }
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{JobSpec, RetryPolicy};
    use drover_proto::workflow::{WorkflowLink, DEPENDENCY_FAILED};

    use super::super::SqliteStore;
    use crate::store::{
        ClaimOffer, Completion, JobFilter, LeaseRef, NewJob, NewSession, OutcomeKind, RunRecord,
        Store, StoreError,
    };
    use drover_proto::model::{JobState, Resources};
    use drover_proto::workflow::RunStep;

    const T0: i64 = 1_700_000_000_000;

    /// A run of `(step, depends_on, tasks)`; every job gets `retry`.
    fn run_of(steps: &[(&str, &[&str], u32)], retry: RetryPolicy) -> (RunRecord, Vec<NewJob>) {
        let run_id = ulid::Ulid::new().to_string();
        let mut run_steps = Vec::new();
        let mut jobs = Vec::new();
        for (name, deps, tasks) in steps {
            let ids: Vec<String> = (0..*tasks).map(|_| ulid::Ulid::new().to_string()).collect();
            for (i, id) in ids.iter().enumerate() {
                let mut spec = JobSpec::command(["true"]);
                spec.name = format!("wf/{name}");
                spec.retry = retry.clone();
                jobs.push(NewJob {
                    id: id.clone(),
                    spec,
                    workflow: Some(WorkflowLink {
                        run_id: run_id.clone(),
                        step: name.to_string(),
                        task_index: (*tasks > 1).then_some(i as u32),
                    }),
                });
            }
            run_steps.push(RunStep {
                name: name.to_string(),
                depends_on: deps.iter().map(|d| d.to_string()).collect(),
                array: (*tasks > 1).then_some(*tasks),
                jobs: ids,
            });
        }
        let run = RunRecord {
            id: run_id,
            name: "wf".into(),
            description: String::new(),
            created_at_ms: T0,
            steps: run_steps,
            cancel_requested: false,
        };
        (run, jobs)
    }

    fn chain() -> (RunRecord, Vec<NewJob>) {
        run_of(
            &[("a", &[], 1), ("b", &["a"], 1), ("c", &["b"], 1)],
            RetryPolicy::default(),
        )
    }

    fn job(run: &RunRecord, step: &str) -> String {
        run.steps.iter().find(|s| s.name == step).unwrap().jobs[0].clone()
    }

    async fn state(store: &SqliteStore, id: &str) -> JobState {
        store.get_job(id).await.unwrap().state
    }

    /// Sets a job's state behind the store's back: a completion whose
    /// dependency bookkeeping never happened.
    fn force_state(store: &SqliteStore, id: &str, state: JobState) {
        let id = id.to_string();
        store.with_conn(move |conn| {
            conn.execute(
                "UPDATE jobs SET state = ?2 WHERE id = ?1",
                [id.as_str(), state.as_str()],
            )
            .unwrap();
        })
    }

    fn query_plan(store: &SqliteStore, sql: &str) -> String {
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        store.with_conn(move |conn| {
            let mut stmt = conn.prepare(&sql).unwrap();
            let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        })
    }

    async fn session(store: &SqliteStore, id: &str, now: i64) -> ClaimOffer {
        store
            .create_session(
                &NewSession {
                    session_id: id.into(),
                    token_hash: "h".into(),
                    agent_id: format!("agent-{id}"),
                    pool: "default".into(),
                    hostname: "host".into(),
                    labels: Default::default(),
                    capacity: Resources::default(),
                    runtime: "process".into(),
                    version: "test".into(),
                    health_addr: String::new(),
                    ttl_ms: 60_000,
                },
                now,
            )
            .await
            .unwrap();
        ClaimOffer {
            session_id: id.into(),
            agent_id: format!("agent-{id}"),
            pool: "default".into(),
            labels: Default::default(),
            free: Resources {
                cpu_millis: 64_000,
                memory_mib: 1 << 20,
                gpus: 8,
                disk_gib: 1000,
                gpu_model: None,
            },
            max_jobs: 1,
        }
    }

    async fn lease(store: &SqliteStore, session_id: &str, now: i64) -> LeaseRef {
        let offer = session(store, session_id, now).await;
        let mut claimed = store.claim(&offer, 64, now).await.unwrap();
        assert_eq!(claimed.len(), 1);
        claimed.remove(0).lease
    }

    async fn assert_dependency_failed(store: &SqliteStore, id: &str, names: &str) {
        let job = store.get_job(id).await.unwrap();
        assert_eq!(job.state, JobState::Failed);
        let reason = job.reason.unwrap();
        assert!(reason.starts_with(DEPENDENCY_FAILED), "{reason}");
        assert!(reason.contains(names), "{reason} should name {names}");
        assert!(job.finished_at_ms.is_some());
        let events = store.events(id).await.unwrap();
        let last = events.last().unwrap();
        assert_eq!((last.state, &last.reason), (JobState::Failed, &reason));
    }

    #[tokio::test]
    async fn pending_jobs_say_what_they_wait_for() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = run_of(
            &[("a", &[], 1), ("b", &[], 3), ("c", &["a", "b"], 2)],
            RetryPolicy::default(),
        );
        store.create_run(&run, jobs, T0).await.unwrap();
        let c = store.get_job(&job(&run, "c")).await.unwrap();
        assert_eq!(c.state, JobState::Pending);
        assert_eq!(
            c.reason.as_deref(),
            Some("waiting for 4 jobs of steps a, b")
        );
        assert_eq!(c.workflow.unwrap().task_index, Some(0));
        let events = store.events(&c.id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].state, JobState::Pending);
        assert_eq!(events[0].reason, "waiting for 4 jobs of steps a, b");
        let a = store.get_job(&job(&run, "a")).await.unwrap();
        assert_eq!((a.state, a.reason), (JobState::Queued, None));
        assert_eq!(store.events(&a.id).await.unwrap()[0].reason, "submitted");
        // PENDING jobs are neither listed as queued nor counted as demand.
        assert_eq!(store.queued_needs("default", 100).await.unwrap().len(), 4);
        let pending = store
            .list_jobs(
                &JobFilter {
                    state: Some(JobState::Pending),
                    ..JobFilter::default()
                },
                None,
                100,
            )
            .await
            .unwrap();
        assert_eq!(pending.items.len(), 2);
        assert!(pending.items.iter().all(|j| j.workflow.is_some()));
    }

    #[tokio::test]
    async fn plain_jobs_have_no_link() {
        let store = SqliteStore::in_memory().unwrap();
        let ids = store
            .submit(
                vec![NewJob {
                    id: ulid::Ulid::new().to_string(),
                    spec: JobSpec::command(["true"]),
                    workflow: None,
                }],
                T0,
            )
            .await
            .unwrap();
        assert_eq!(store.get_job(&ids[0].id).await.unwrap().workflow, None);
        let listed = store
            .list_jobs(&JobFilter::default(), None, 10)
            .await
            .unwrap();
        assert_eq!(listed.items[0].workflow, None);
        let links: i64 = store.with_conn(|conn| {
            conn.query_row("SELECT COUNT(*) FROM job_links", [], |r| r.get(0))
                .unwrap()
        });
        assert_eq!(links, 0);
        assert!(store.get_jobs(&[]).await.unwrap().is_empty());
        let twice = store
            .get_jobs(&[ids[0].id.clone(), ids[0].id.clone()])
            .await
            .unwrap();
        assert_eq!(twice.len(), 2);
    }

    #[tokio::test]
    async fn a_run_with_a_job_its_steps_do_not_list_writes_nothing() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, mut jobs) = chain();
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        jobs[2].workflow.as_mut().unwrap().step = "a".into();
        assert!(matches!(
            store.create_run(&run, jobs.clone(), T0).await,
            Err(StoreError::Invalid(_))
        ));
        jobs[2].workflow = None;
        assert!(matches!(
            store.create_run(&run, jobs.clone(), T0).await,
            Err(StoreError::Invalid(_))
        ));
        jobs.pop();
        assert!(matches!(
            store.create_run(&run, jobs, T0).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.get_run(&run.id).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.get_jobs(&ids).await.unwrap().is_empty());
        assert!(store.list_runs(None, 10).await.unwrap().items.is_empty());
        assert!(matches!(
            store.list_runs(Some("not a cursor!"), 10).await,
            Err(StoreError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn sweep_releases_what_an_interrupted_completion_left_pending() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = run_of(
            &[("a", &[], 2), ("b", &["a"], 1), ("c", &["b"], 1)],
            RetryPolicy::default(),
        );
        store.create_run(&run, jobs, T0).await.unwrap();
        let a = &run.steps[0].jobs;
        force_state(&store, &a[0], JobState::Succeeded);
        assert!(store.release_pending(T0 + 1).await.unwrap().is_empty());
        assert_eq!(state(&store, &job(&run, "b")).await, JobState::Pending);
        force_state(&store, &a[1], JobState::Succeeded);
        assert_eq!(store.release_pending(T0 + 2).await.unwrap(), ["default"]);
        let b = store.get_job(&job(&run, "b")).await.unwrap();
        assert_eq!(b.state, JobState::Queued);
        assert_eq!(b.reason.as_deref(), Some("dependencies succeeded"));
        let events = store.events(&b.id).await.unwrap();
        assert_eq!(events.last().unwrap().state, JobState::Queued);
        assert_eq!(state(&store, &job(&run, "c")).await, JobState::Pending);
        assert!(store.release_pending(T0 + 3).await.unwrap().is_empty());

        // b then completes normally: the counter the sweep reset still
        // releases c exactly once.
        let lease = lease(&store, "s1", T0 + 4).await;
        assert_eq!(lease.job_id, b.id);
        let done = store
            .complete(
                &lease,
                &Completion {
                    outcome: OutcomeKind::Succeeded,
                    exit_code: Some(0),
                    reason: "ok".into(),
                },
                T0 + 5,
            )
            .await
            .unwrap();
        assert_eq!(done.released, ["default"]);
        assert!(store.release_pending(T0 + 6).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sweep_fails_the_dependents_of_a_failed_dependency_transitively() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = chain();
        store.create_run(&run, jobs, T0).await.unwrap();
        force_state(&store, &job(&run, "a"), JobState::TimedOut);
        assert!(store.release_pending(T0 + 1).await.unwrap().is_empty());
        let a = job(&run, "a");
        let b = job(&run, "b");
        assert_dependency_failed(&store, &b, &format!("step a (job {a}) ended TIMED_OUT")).await;
        assert_dependency_failed(
            &store,
            &job(&run, "c"),
            &format!("step b (job {b}) ended FAILED"),
        )
        .await;
        let events = store.events(&b).await.unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(store.release_pending(T0 + 2).await.unwrap().is_empty());
        assert_eq!(store.events(&b).await.unwrap().len(), 2);
    }

    #[test]
    fn the_sweep_and_get_jobs_use_indexes() {
        let store = SqliteStore::in_memory().unwrap();
        let plan = query_plan(
            &store,
            "SELECT jobs.id, l.run_id, l.step FROM jobs INDEXED BY jobs_pending \
             JOIN job_links l ON l.job_id = jobs.id WHERE jobs.state = 'PENDING'",
        );
        assert!(plan.contains("jobs_pending"), "{plan}");
        assert!(!plan.contains("SCAN l"), "{plan}");
        let plan = query_plan(
            &store,
            &format!(
                "SELECT {} FROM json_each('[\"x\"]') AS w JOIN jobs ON jobs.id = w.value \
                 LEFT JOIN job_links l ON l.job_id = jobs.id ORDER BY w.key",
                super::super::JOB_COLUMNS
            ),
        );
        assert!(!plan.contains("SCAN jobs"), "{plan}");
        assert!(!plan.contains("SCAN l"), "{plan}");
    }

    #[tokio::test]
    async fn cancelling_a_pending_step_fails_its_dependents() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = chain();
        store.create_run(&run, jobs, T0).await.unwrap();
        let b = job(&run, "b");
        assert_eq!(
            store.cancel(&b, T0).await.unwrap().state,
            JobState::Cancelled
        );
        assert_dependency_failed(
            &store,
            &job(&run, "c"),
            &format!("(job {b}) ended CANCELLED"),
        )
        .await;
        // a still runs; its success releases nothing.
        let lease = lease(&store, "s1", T0).await;
        let done = store
            .complete(
                &lease,
                &Completion {
                    outcome: OutcomeKind::Succeeded,
                    exit_code: Some(0),
                    reason: "ok".into(),
                },
                T0 + 1,
            )
            .await
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert!(done.released.is_empty());
        assert_eq!(state(&store, &b).await, JobState::Cancelled);
    }

    #[tokio::test]
    async fn a_spent_infra_budget_in_heartbeat_and_reaper_fails_dependents() {
        let no_infra = RetryPolicy {
            max_infra_retries: 0,
            ..RetryPolicy::default()
        };
        // Heartbeat: a lease never reported by its agent.
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = run_of(&[("a", &[], 1), ("b", &["a"], 1)], no_infra.clone());
        store.create_run(&run, jobs, T0).await.unwrap();
        let held = lease(&store, "s1", T0).await;
        for (i, now) in [T0 + 20_000, T0 + 40_000].into_iter().enumerate() {
            let answer = store.heartbeat("s1", &[], false, now).await.unwrap();
            assert_eq!(answer.requeued_unreported.len(), i, "heartbeat {i}");
        }
        assert_eq!(state(&store, &held.job_id).await, JobState::Failed);
        assert_dependency_failed(&store, &job(&run, "b"), "ended FAILED").await;

        // Reaper: leased and never started.
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = run_of(&[("a", &[], 1), ("b", &["a"], 1)], no_infra);
        store.create_run(&run, jobs, T0).await.unwrap();
        let held = lease(&store, "s1", T0).await;
        let reaped = store.reap_jobs(0, 1_000, T0 + 5_000).await.unwrap();
        assert_eq!(reaped.not_started, std::slice::from_ref(&held));
        assert_eq!(state(&store, &held.job_id).await, JobState::Failed);
        assert_dependency_failed(&store, &job(&run, "b"), "ended FAILED").await;

        // Reaper: running past its timeout, no attempts left.
        let store = SqliteStore::in_memory().unwrap();
        let (run, mut jobs) = run_of(
            &[("a", &[], 1), ("b", &["a"], 1)],
            RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
        );
        jobs[0].spec.timeout_secs = 1;
        store.create_run(&run, jobs, T0).await.unwrap();
        let held = lease(&store, "s1", T0).await;
        store.start(&held, T0, Some(1.5)).await.unwrap();
        let reaped = store.reap_jobs(0, 1_000, T0 + 5_000).await.unwrap();
        assert_eq!(reaped.timed_out, std::slice::from_ref(&held));
        assert_eq!(state(&store, &held.job_id).await, JobState::TimedOut);
        assert_dependency_failed(&store, &job(&run, "b"), "ended TIMED_OUT").await;
    }

    #[tokio::test]
    async fn cancelling_a_finished_run_changes_nothing() {
        let store = SqliteStore::in_memory().unwrap();
        let (run, jobs) = run_of(&[("a", &[], 1), ("b", &["a"], 1)], RetryPolicy::default());
        store.create_run(&run, jobs, T0).await.unwrap();
        store.cancel(&job(&run, "a"), T0).await.unwrap();
        // a CANCELLED, b FAILED: the run is over.
        let events = store.events(&job(&run, "b")).await.unwrap().len();
        let again = store.cancel_run(&run.id, T0 + 1).await.unwrap();
        assert!(!again.cancel_requested);
        assert_eq!(store.get_run(&run.id).await.unwrap(), run);
        assert_eq!(store.events(&job(&run, "b")).await.unwrap().len(), events);
    }
}
