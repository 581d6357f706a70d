//! Workflow runs (see the module docs of `store::dynamodb`): the run item
//! (`RUN#<id>` / `RUN`), workflow jobs' links and dependency counters on
//! their state items, the PENDING partition of gsi2, and everything that
//! moves dependents when a dependency ends.
//!
//! A completion settles its dependents itself (counted down in its own
//! transaction, then released with conditional writes); `release_pending`
//! is the backstop that decides from states when a coordinator died in
//! between, and finishes publishing runs whose chunked create was cut short.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use aws_sdk_dynamodb::types::{ReturnValue, TransactWriteItem, Update};
use drover_proto::model::{FieldError, Job, JobSpec, JobState};
use drover_proto::workflow::{
    dependency_count, dependency_failed_reason, dependents_first, dependents_of, RunStep,
};

use super::item::{b, get_b, get_n, get_s, key, n, req_n, req_s, s, Expr, Item};
use super::table::{LIST_INDEX, OWNER_INDEX};
use super::{
    aws_err, built, cancel_row, decode_cursor, encode_cursor, id_day, job_pk, json_err,
    now_wall_ms, DynamoStore, JobRow, Step, Transition, TxError, DAY_MS, MAX_RACES, MAX_TX_ITEMS,
};
use crate::store::{NewJob, Page, RunRecord, StoreError, StoreResult};

/// The gsi2 partition of PENDING workflow jobs (`<job id>`) and of runs
/// whose chunked create has not finished publishing (`RUN#<run id>`): the
/// sweep reads both with one query.
pub(super) const PENDING_PARTITION: &str = "PENDING";
/// Dependents a success counts down inside its own transaction (its state
/// item, a deferred LEASED event and its own event take three of the 100).
pub(super) const INLINE_DEPENDENTS: usize = 95;
/// How long the items of a chunked create outlive a coordinator that died
/// before writing the run item (they are never published).
pub(super) const UNPUBLISHED_TTL_MS: i64 = DAY_MS;
/// A run still unpublished this long after its create began is published
/// by the sweep (its coordinator died mid-create).
const PUBLISH_STALE_MS: i64 = 60_000;
/// Event and reason of a PENDING job released to QUEUED.
const DEPENDENCIES_SUCCEEDED: &str = "dependencies succeeded";

fn run_pk(id: &str) -> String {
    format!("RUN#{id}")
}

/// The listing partition (gsi3) of runs created on `day`.
fn runs_partition(day: i64) -> String {
    format!("R#{day:06}")
}

/// The day a run lists under.
fn run_day(run: &RunRecord) -> i64 {
    id_day(&run.id, run.created_at_ms)
}

/// A run item, decoded.
pub(super) struct StoredRun {
    pub run: RunRecord,
    /// When its chunked create began, while it is not yet published.
    pub unpublished_since: Option<i64>,
}

impl StoredRun {
    fn from_item(item: &Item) -> StoreResult<StoredRun> {
        Ok(StoredRun {
            run: RunRecord {
                id: req_s(item, "id")?,
                name: get_s(item, "name").unwrap_or_default().to_string(),
                description: get_s(item, "desc").unwrap_or_default().to_string(),
                created_at_ms: req_n(item, "created")?,
                steps: serde_json::from_str(&req_s(item, "steps")?).map_err(json_err)?,
                cancel_requested: get_b(item, "cancel"),
            },
            unpublished_since: get_n(item, "unpub"),
        })
    }
}

/// The terminal state a write moved a job into (from a non-terminal one).
pub(super) fn ended(row: &JobRow, next: &JobRow) -> Option<JobState> {
    (!row.state.is_terminal() && next.state.is_terminal()).then_some(next.state)
}

/// Every job of every step depending on `step`.
pub(super) fn dependents(steps: &[RunStep], step: &str) -> Vec<String> {
    dependents_of(steps, step)
        .into_iter()
        .map(str::to_string)
        .collect()
}

fn ended_badly(state: JobState) -> bool {
    matches!(
        state,
        JobState::Failed | JobState::Cancelled | JobState::TimedOut
    )
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

/// PENDING → QUEUED at the back of its priority (its dependencies all
/// succeeded); nothing for any other state.
fn release_row(row: &mut JobRow, now_ms: i64) -> Option<Transition> {
    if row.state != JobState::Pending {
        return None;
    }
    row.state = JobState::Queued;
    row.deps = 0;
    row.not_before_ms = 0;
    row.enqueued_at_ms = now_ms;
    row.updated_at_ms = now_ms;
    row.reason = Some(DEPENDENCIES_SUCCEEDED.into());
    Some(Transition::event(
        JobState::Queued,
        None,
        DEPENDENCIES_SUCCEEDED.into(),
    ))
}

/// PENDING → FAILED with `reason`; nothing for any other state.
fn fail_row(row: &mut JobRow, reason: &str, now_ms: i64) -> Option<Transition> {
    if row.state != JobState::Pending {
        return None;
    }
    row.state = JobState::Failed;
    row.updated_at_ms = now_ms;
    row.finished_at_ms = Some(now_ms);
    row.reason = Some(reason.to_string());
    Some(Transition::event(
        JobState::Failed,
        None,
        reason.to_string(),
    ))
}

fn invalid(message: String) -> StoreError {
    StoreError::Invalid(FieldError::new("jobs", message))
}

fn run_exists(run_id: &str) -> StoreError {
    StoreError::Conflict(format!("workflow run {run_id} already exists"))
}

fn cancelled_on_condition(reasons: &[Option<String>]) -> impl Iterator<Item = usize> + '_ {
    reasons
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_deref() == Some("ConditionalCheckFailed"))
        .map(|(i, _)| i)
}

/// A job to insert with its spec and first event.
type NewRow<'a> = (JobRow, &'a JobSpec, (JobState, Option<String>, String));

/// Jobs written by one transaction (before, after) and its items.
type Chunk = (Vec<(JobRow, JobRow)>, Vec<TransactWriteItem>);

impl DynamoStore {
    // ---- runs ----

    /// The run item. A published run lists under gsi3; an unpublished one
    /// (a chunked create under way) carries the marker the sweep finds.
    fn run_item(&self, run: &RunRecord, now_ms: i64, published: bool) -> StoreResult<Item> {
        let mut item = key(run_pk(&run.id), "RUN");
        for (k, v) in [
            ("id", s(&run.id)),
            ("name", s(&run.name)),
            ("desc", s(&run.description)),
            ("created", n(run.created_at_ms)),
            (
                "steps",
                s(serde_json::to_string(&run.steps).map_err(json_err)?),
            ),
            ("cancel", b(run.cancel_requested)),
            (super::TTL_ATTRIBUTE, self.horizon_ttl(now_ms)),
        ] {
            item.insert(k.to_string(), v);
        }
        if published {
            item.insert("gsi3pk".into(), s(runs_partition(run_day(run))));
            item.insert("gsi3sk".into(), s(&run.id));
        } else {
            item.insert("gsi2pk".into(), s(PENDING_PARTITION));
            item.insert("gsi2sk".into(), s(run_pk(&run.id)));
            item.insert("unpub".into(), n(now_ms));
        }
        Ok(item)
    }

    /// The run item, read consistently.
    pub(super) async fn load_run(&self, run_id: &str) -> StoreResult<Option<StoredRun>> {
        self.get(run_pk(run_id), "RUN")
            .await?
            .map(|item| StoredRun::from_item(&item))
            .transpose()
    }

    pub(super) async fn get_run_impl(&self, run_id: &str) -> StoreResult<RunRecord> {
        match self.load_run(run_id).await? {
            Some(stored) if stored.unpublished_since.is_none() => Ok(stored.run),
            _ => Err(StoreError::NotFound(format!("workflow run {run_id}"))),
        }
    }

    /// The state rows of a run's jobs with their first events: roots
    /// QUEUED, the others PENDING with their dependency counter.
    fn run_rows<'a>(
        &self,
        run: &RunRecord,
        jobs: &'a [NewJob],
        now_ms: i64,
        published: bool,
    ) -> StoreResult<Vec<NewRow<'a>>> {
        let step_of: HashMap<&str, &RunStep> = run
            .steps
            .iter()
            .flat_map(|s| s.jobs.iter().map(move |j| (j.as_str(), s)))
            .collect();
        jobs.iter()
            .map(|job| {
                let link = job.workflow.as_ref().ok_or_else(|| {
                    invalid(format!(
                        "job {} of workflow run {} has no workflow link",
                        job.id, run.id
                    ))
                })?;
                let step = step_of
                    .get(job.id.as_str())
                    .filter(|s| s.name == link.step && link.run_id == run.id)
                    .ok_or_else(|| {
                        invalid(format!(
                            "job {} claims step {:?} of run {}, which does not list it",
                            job.id, link.step, link.run_id
                        ))
                    })?;
                let mut row = self.new_row(job, now_ms);
                row.unpublished_at_ms = (!published).then_some(now_ms);
                if step.depends_on.is_empty() {
                    return Ok((row, &job.spec, (JobState::Queued, None, "submitted".into())));
                }
                let waits_for = dependency_count(&run.steps, &step.name);
                let reason = waiting_reason(step, waits_for);
                row.state = JobState::Pending;
                row.deps = waits_for as i64;
                row.reason = Some(reason.clone());
                Ok((row, &job.spec, (JobState::Pending, None, reason)))
            })
            .collect()
    }

    pub(super) async fn create_run_impl(
        &self,
        run: &RunRecord,
        jobs: Vec<NewJob>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let items_needed = 1 + jobs
            .iter()
            .map(|j| 3 + j.spec.idempotency_key.is_some() as usize)
            .sum::<usize>();
        // Validate before writing anything (an existing run wins: Conflict).
        if let Err(e) = self.run_rows(run, &jobs, now_ms, true) {
            if self.get(run_pk(&run.id), "RUN").await?.is_some() {
                return Err(run_exists(&run.id));
            }
            return Err(e);
        }
        if items_needed > MAX_TX_ITEMS {
            if self.get(run_pk(&run.id), "RUN").await?.is_some() {
                return Err(run_exists(&run.id));
            }
            self.stage_jobs(run, &jobs, now_ms).await?;
            self.commit_run(run, now_ms).await?;
            return self.publish_run(run).await;
        }
        // Everything in one transaction.
        self.note_run(run, &jobs, now_ms).await?;
        let mut not_there = Expr::new();
        not_there.when_absent("pk");
        let mut items = vec![self.put(self.run_item(run, now_ms, true)?, Some(not_there))?];
        for (row, spec, event) in self.run_rows(run, &jobs, now_ms, true)? {
            items.extend(self.job_items(&row, spec, event, now_ms)?);
        }
        for _ in 0..MAX_RACES {
            match self.transact(items.clone()).await {
                Ok(()) => return Ok(()),
                Err(TxError::Other(e)) => return Err(e),
                Err(TxError::Cancelled(reasons)) => match cancelled_on_condition(&reasons).next() {
                    Some(0) => return Err(run_exists(&run.id)),
                    Some(_) => {
                        return Err(StoreError::Conflict(format!(
                            "a job id (or idempotency key) of workflow run {} exists already",
                            run.id
                        )))
                    }
                    // Contention with another transaction: again.
                    None => continue,
                },
            }
        }
        Err(StoreError::Backend(format!(
            "creating workflow run {} kept conflicting with other writes; try again",
            run.id
        )))
    }

    /// What a run's create records first: its pools and the listing
    /// horizons of jobs and runs (each once per process).
    async fn note_run(&self, run: &RunRecord, jobs: &[NewJob], now_ms: i64) -> StoreResult<()> {
        self.note_pools(jobs.iter().map(|j| j.spec.pool.as_str()))
            .await?;
        if let Some(day) = jobs.iter().map(|j| id_day(&j.id, now_ms)).min() {
            self.mark_listing(day).await?;
        }
        self.mark_first_day("RUNS", &self.runs_marked, run_day(run))
            .await
    }

    /// Chunked create, first phase: every job (state, spec, first event)
    /// without index keys and with a short expiry, in transactions of up
    /// to 100 items. Invisible until `publish_run`.
    pub(super) async fn stage_jobs(
        &self,
        run: &RunRecord,
        jobs: &[NewJob],
        now_ms: i64,
    ) -> StoreResult<()> {
        self.note_run(run, jobs, now_ms).await?;
        let mut chunks: Vec<Vec<TransactWriteItem>> = Vec::new();
        for (row, spec, event) in self.run_rows(run, jobs, now_ms, false)? {
            let items = self.job_items(&row, spec, event, now_ms)?;
            match chunks.last_mut() {
                Some(chunk) if chunk.len() + items.len() <= MAX_TX_ITEMS => chunk.extend(items),
                _ => chunks.push(items),
            }
        }
        for chunk in chunks {
            let mut written = false;
            for _ in 0..MAX_RACES {
                match self.transact(chunk.clone()).await {
                    Ok(()) => {
                        written = true;
                        break;
                    }
                    Err(TxError::Other(e)) => return Err(e),
                    Err(TxError::Cancelled(reasons)) => {
                        if cancelled_on_condition(&reasons).next().is_some() {
                            return Err(StoreError::Conflict(format!(
                                "a job id (or idempotency key) of workflow run {} exists already",
                                run.id
                            )));
                        }
                    }
                }
            }
            if !written {
                return Err(StoreError::Backend(format!(
                    "creating workflow run {} kept conflicting with other writes; try again",
                    run.id
                )));
            }
        }
        Ok(())
    }

    /// Chunked create, the commit point: the run item, carrying the
    /// unpublished marker. From here on the run will exist: its creator or,
    /// should it die, the sweep publishes it.
    pub(super) async fn commit_run(&self, run: &RunRecord, now_ms: i64) -> StoreResult<()> {
        let written = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(self.run_item(run, now_ms, false)?))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", "pk")
            .send()
            .await;
        match written {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(run_exists(&run.id))
            }
            Err(e) => Err(aws_err("PutItem", e)),
        }
    }

    /// Chunked create, last phase (idempotent): gives every job its index
    /// keys for its state and drops its expiry, dependents before their
    /// dependencies (so no root can be claimed, and finish, before the jobs
    /// waiting for it are in place), then swaps the run's marker for its
    /// listing keys.
    pub(super) async fn publish_run(&self, run: &RunRecord) -> StoreResult<()> {
        let ids: Vec<String> = dependents_first(&run.steps)
            .into_iter()
            .flat_map(|s| s.jobs.iter().cloned())
            .collect();
        self.mutate_many(&ids, |row| {
            Ok(row.unpublished_at_ms.take().map(|_| Transition::silent()))
        })
        .await?;
        let mut expr = Expr::new();
        expr.set("gsi3pk", s(runs_partition(run_day(run))))
            .set("gsi3sk", s(&run.id))
            .remove("gsi2pk")
            .remove("gsi2sk")
            .remove("unpub")
            .when_present("pk");
        self.update_item(key(run_pk(&run.id), "RUN"), &expr, ReturnValue::None)
            .await?;
        Ok(())
    }

    pub(super) async fn list_runs_impl(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> StoreResult<Page<RunRecord>> {
        let limit = limit.clamp(1, 1000);
        let (mut day, mut before) = match cursor {
            Some(c) => {
                let (day, id) = decode_cursor(c)?;
                (day, Some(id))
            }
            None => (now_wall_ms().div_euclid(DAY_MS) + 1, None),
        };
        let Some(first_day) = self
            .get("META".into(), "RUNS")
            .await?
            .and_then(|i| get_n::<i64>(&i, "first_day"))
        else {
            return Ok(Page {
                items: Vec::new(),
                next_cursor: None,
            });
        };
        let mut found: Vec<(i64, RunRecord)> = Vec::new();
        while day >= first_day && found.len() <= limit {
            let below = before.take().unwrap_or_else(|| "\u{7f}".to_string());
            let mut expr = Expr::new();
            let cond = format!(
                "{} = {} AND {} < {}",
                expr.name("gsi3pk"),
                expr.value(s(runs_partition(day))),
                expr.name("gsi3sk"),
                expr.value(s(below))
            );
            let mut start = None;
            loop {
                let resp = self
                    .client
                    .query()
                    .table_name(&*self.table)
                    .index_name(LIST_INDEX)
                    .key_condition_expression(&cond)
                    .set_expression_attribute_names(expr.names())
                    .set_expression_attribute_values(expr.values())
                    .scan_index_forward(false)
                    .limit((limit + 1 - found.len()).min(100) as i32)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|e| aws_err("Query", e))?;
                let ids: Vec<String> = resp
                    .items
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|i| get_s(i, "gsi3sk").map(str::to_string))
                    .collect();
                let keys = ids.iter().map(|id| key(run_pk(id), "RUN")).collect();
                let mut runs: HashMap<String, StoredRun> = HashMap::new();
                for item in self.batch_get(keys, true).await? {
                    let stored = StoredRun::from_item(&item)?;
                    runs.insert(stored.run.id.clone(), stored);
                }
                for id in &ids {
                    if found.len() > limit {
                        break;
                    }
                    if let Some(stored) = runs.remove(id) {
                        if stored.unpublished_since.is_none() {
                            found.push((day, stored.run));
                        }
                    }
                }
                match resp.last_evaluated_key {
                    Some(k) if !k.is_empty() && found.len() <= limit => start = Some(k),
                    _ => break,
                }
            }
            day -= 1;
        }
        let next_cursor = if found.len() > limit {
            found.truncate(limit);
            found.last().map(|(day, run)| encode_cursor(*day, &run.id))
        } else {
            None
        };
        Ok(Page {
            items: found.into_iter().map(|(_, r)| r).collect(),
            next_cursor,
        })
    }

    pub(super) async fn cancel_run_impl(
        &self,
        run_id: &str,
        now_ms: i64,
    ) -> StoreResult<RunRecord> {
        let run = self.get_run_impl(run_id).await?;
        let ids: Vec<String> = run.job_ids().map(str::to_string).collect();
        let rows = self.load_rows(&ids).await?;
        if rows.values().all(|r| r.state.is_terminal()) {
            // Finished (or cancelled before): nothing changes.
            return Ok(run);
        }
        let mut expr = Expr::new();
        expr.set("cancel", b(true)).when_present("pk");
        self.update_item(key(run_pk(run_id), "RUN"), &expr, ReturnValue::None)
            .await?;
        // Dependents first: a PENDING step is cancelled before its
        // dependency's cancel could fail it (so nothing is left to fail).
        for step in dependents_first(&run.steps) {
            let open: Vec<JobRow> = step
                .jobs
                .iter()
                .filter_map(|id| rows.get(id))
                .filter(|r| !r.state.is_terminal())
                .cloned()
                .collect();
            self.mutate_rows(open, |row| {
                if row.state.is_terminal() {
                    return Ok(None);
                }
                Ok(match cancel_row(row, now_ms)? {
                    Step::Keep(()) => None,
                    Step::Write((), t) => Some(t),
                })
            })
            .await?;
        }
        Ok(RunRecord {
            cancel_requested: true,
            ..run
        })
    }

    pub(super) async fn get_jobs_impl(&self, job_ids: &[String]) -> StoreResult<Vec<Job>> {
        let keys = job_ids
            .iter()
            .flat_map(|id| [key(job_pk(id), "STATE"), key(job_pk(id), "SPEC")])
            .collect();
        let mut rows: HashMap<String, JobRow> = HashMap::new();
        let mut specs: HashMap<String, String> = HashMap::new();
        for item in self.batch_get(keys, true).await? {
            match get_s(&item, "sk") {
                Some("STATE") => {
                    let row = JobRow::from_item(&item)?;
                    rows.insert(row.id.clone(), row);
                }
                Some("SPEC") => {
                    specs.insert(req_s(&item, "id")?, req_s(&item, "spec")?);
                }
                _ => {}
            }
        }
        let mut jobs = Vec::with_capacity(job_ids.len());
        for id in job_ids {
            let Some(row) = rows.get(id).filter(|r| r.unpublished_at_ms.is_none()) else {
                continue;
            };
            let spec = specs.get(id).ok_or_else(|| {
                StoreError::Backend(format!("job {id} has no spec item (expired?)"))
            })?;
            jobs.push(row.to_job(serde_json::from_str(spec).map_err(json_err)?));
        }
        Ok(jobs)
    }

    // ---- many jobs at once ----

    /// `mutate` for many jobs: reads them in one consistent `BatchGetItem`
    /// (per 100) and hands them to [`Self::mutate_rows`], in order.
    pub(super) async fn mutate_many<F>(
        &self,
        ids: &[String],
        f: F,
    ) -> StoreResult<Vec<(JobRow, JobRow)>>
    where
        F: FnMut(&mut JobRow) -> StoreResult<Option<Transition>>,
    {
        let mut rows = self.load_rows(ids).await?;
        let ordered = ids.iter().filter_map(|id| rows.remove(id)).collect();
        self.mutate_rows(ordered, f).await
    }

    /// Decides each row with `f` (`None`: leave it) and writes the changed
    /// ones, in order, in transactions of up to 100 items (state + event
    /// per job), each state item conditioned on the version `f` saw. The
    /// jobs of a transaction that lost a race are read again (consistently)
    /// and decided again. Rows may come from an eventually consistent read:
    /// a stale one only loses its race. Returns (before, after) of every job
    /// written. Dependents are not settled here: callers do that.
    pub(super) async fn mutate_rows<F>(
        &self,
        mut rows: Vec<JobRow>,
        mut f: F,
    ) -> StoreResult<Vec<(JobRow, JobRow)>>
    where
        F: FnMut(&mut JobRow) -> StoreResult<Option<Transition>>,
    {
        let mut written = Vec::new();
        for _ in 0..MAX_RACES {
            let mut chunks: Vec<Chunk> = Vec::new();
            for row in rows {
                let mut next = row.clone();
                let Some(transition) = f(&mut next)? else {
                    continue;
                };
                next.version = row.version + 1;
                let items = self.transition_items(&row, &mut next, transition)?;
                match chunks.last_mut() {
                    Some((jobs, chunk)) if chunk.len() + items.len() <= MAX_TX_ITEMS => {
                        jobs.push((row, next));
                        chunk.extend(items);
                    }
                    _ => chunks.push((vec![(row, next)], items)),
                }
            }
            let mut lost: Vec<String> = Vec::new();
            for (jobs, items) in chunks {
                match self.transact(items).await {
                    Ok(()) => written.extend(jobs),
                    Err(TxError::Cancelled(_)) => lost.extend(jobs.into_iter().map(|(r, _)| r.id)),
                    Err(TxError::Other(e)) => return Err(e),
                }
            }
            if lost.is_empty() {
                return Ok(written);
            }
            let mut fresh = self.load_rows(&lost).await?;
            rows = lost.iter().filter_map(|id| fresh.remove(id)).collect();
        }
        Err(StoreError::Backend(format!(
            "updating {} jobs: gave up after {MAX_RACES} concurrent updates",
            rows.len()
        )))
    }

    // ---- dependents ----

    /// The decrement of a dependent's counter, unconditional but for the
    /// item's existence (an expired dependent must not be recreated); bumps
    /// its version so no read-decide-write overwrites the count.
    pub(super) fn count_down_item(&self, job_id: &str) -> StoreResult<TransactWriteItem> {
        let mut expr = Expr::new();
        let deps = expr.name("deps");
        let zero = expr.value(n(0));
        let one = expr.value(n(1));
        expr.set_raw("deps", format!("if_not_exists({deps}, {zero}) - {one}"));
        let ver = expr.name("ver");
        expr.set_raw("ver", format!("{ver} + {one}"));
        expr.when_present("pk");
        let update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(job_pk(job_id), "STATE")))
            .update_expression(expr.update_expression())
            .set_condition_expression(expr.condition())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values());
        Ok(TransactWriteItem::builder()
            .update(built(update.build())?)
            .build())
    }

    /// Counts dependents down outside a completion (more than fit in it):
    /// transactions of up to 100 decrements, so each is atomic and the
    /// SDK's retries of one are idempotent (its client request token).
    async fn count_down(&self, ids: &[String]) -> StoreResult<()> {
        for chunk in ids.chunks(MAX_TX_ITEMS) {
            let mut todo: Vec<&String> = chunk.iter().collect();
            for _ in 0..MAX_RACES {
                if todo.is_empty() {
                    break;
                }
                let items = todo
                    .iter()
                    .map(|id| self.count_down_item(id))
                    .collect::<StoreResult<Vec<_>>>()?;
                match self.transact(items).await {
                    Ok(()) => todo.clear(),
                    Err(TxError::Other(e)) => return Err(e),
                    Err(TxError::Cancelled(reasons)) => {
                        let gone: HashSet<usize> = cancelled_on_condition(&reasons).collect();
                        todo = todo
                            .into_iter()
                            .enumerate()
                            .filter(|(i, _)| !gone.contains(i))
                            .map(|(_, id)| id)
                            .collect();
                    }
                }
            }
            if !todo.is_empty() {
                return Err(StoreError::Backend(
                    "counting dependents down kept conflicting with other writes".into(),
                ));
            }
        }
        Ok(())
    }

    /// What a workflow job's write (`row` → `next`, committed) means for
    /// its dependents: on SUCCEEDED, the decrements that did not fit in the
    /// completion's transaction (`uncounted`), then the release of every
    /// dependent whose counter reached zero; on FAILED, CANCELLED or
    /// TIMED_OUT, the failure of every PENDING dependent, transitively.
    /// Returns the released jobs' pools. Errors are logged, not returned:
    /// the transition itself is written, and the sweep finishes the rest.
    pub(super) async fn settle(
        &self,
        row: &JobRow,
        next: &JobRow,
        run: Option<RunRecord>,
        counted: Vec<String>,
        uncounted: Vec<String>,
    ) -> Vec<String> {
        let (Some(link), Some(state)) = (&next.workflow, ended(row, next)) else {
            return Vec::new();
        };
        let now_ms = next.updated_at_ms;
        let result = async {
            if state == JobState::Succeeded {
                self.count_down(&uncounted).await?;
                let mut dependents = counted;
                dependents.extend(uncounted);
                return self.release_counted(&dependents, now_ms).await;
            }
            if !ended_badly(state) {
                return Ok(Vec::new());
            }
            let run = match run {
                Some(run) => Some(run),
                None => self.load_run(&link.run_id).await?.map(|r| r.run),
            };
            if let Some(run) = run {
                let first = (link.step.clone(), next.id.clone(), state);
                self.fail_dependents(&run.steps, vec![first], now_ms)
                    .await?;
            }
            Ok(Vec::new())
        }
        .await;
        result.unwrap_or_else(|e: StoreError| {
            tracing::warn!(
                job = %next.id,
                run = %link.run_id,
                "settling the dependents of a workflow job (the sweep will finish): {e}"
            );
            Vec::new()
        })
    }

    /// Releases the dependents (read consistently) whose counter reached
    /// zero and are still PENDING. The version-conditioned write makes the
    /// release exactly-once when two dependencies finish at once.
    async fn release_counted(&self, ids: &[String], now_ms: i64) -> StoreResult<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = self.load_rows(ids).await?;
        let ready: Vec<JobRow> = ids
            .iter()
            .filter_map(|id| rows.remove(id))
            .filter(|r| r.state == JobState::Pending && r.deps <= 0)
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        let written = self
            .mutate_rows(ready, |row| {
                Ok(if row.deps <= 0 {
                    release_row(row, now_ms)
                } else {
                    None
                })
            })
            .await?;
        Ok(written.into_iter().map(|(_, r)| r.pool).collect())
    }

    /// Fails every PENDING job of every step depending on an `ended` step
    /// (one of whose jobs ended badly), then of the steps depending on
    /// those, and so on.
    pub(super) async fn fail_dependents(
        &self,
        steps: &[RunStep],
        mut ended: Vec<(String, String, JobState)>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut visited: HashSet<String> = HashSet::new();
        while let Some((step, job_id, state)) = ended.pop() {
            let reason = dependency_failed_reason(&step, &job_id, state);
            for dependent in steps.iter().filter(|s| s.depends_on.contains(&step)) {
                // A PENDING job never comes back: one visit per step does.
                if !visited.insert(dependent.name.clone()) {
                    continue;
                }
                let failed = self
                    .mutate_many(&dependent.jobs, |row| Ok(fail_row(row, &reason, now_ms)))
                    .await?;
                if let Some((_, first)) = failed.first() {
                    ended.push((dependent.name.clone(), first.id.clone(), JobState::Failed));
                }
            }
        }
        Ok(())
    }

    // ---- the sweep ----

    pub(super) async fn release_pending_impl(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        let keys = self
            .query_index(OWNER_INDEX, "gsi2pk", PENDING_PARTITION.into(), None)
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut job_ids = Vec::new();
        for k in &keys {
            let Some(sk) = get_s(k, "gsi2sk") else {
                continue;
            };
            match sk.strip_prefix("RUN#") {
                Some(run_id) => {
                    if let Err(e) = self.finish_publishing(run_id, now_ms).await {
                        tracing::warn!(run = %run_id, "publishing an interrupted workflow run: {e}");
                    }
                }
                None => job_ids.push(sk.to_string()),
            }
        }
        // Run and step never change: an eventually consistent read will do
        // to group them (every write below is conditioned on a version).
        let keys = job_ids.iter().map(|id| key(job_pk(id), "STATE")).collect();
        let mut waiting: BTreeMap<String, BTreeMap<String, Vec<JobRow>>> = BTreeMap::new();
        for item in self.batch_get(keys, false).await? {
            let row = JobRow::from_item(&item)?;
            if row.state != JobState::Pending || row.unpublished_at_ms.is_some() {
                continue;
            }
            if let Some(link) = row.workflow.clone() {
                waiting
                    .entry(link.run_id)
                    .or_default()
                    .entry(link.step)
                    .or_default()
                    .push(row);
            }
        }
        let mut released = Vec::new();
        for (run_id, by_step) in waiting {
            match self.sweep_run(&run_id, by_step, now_ms).await {
                Ok(pools) => released.extend(pools),
                Err(e) => tracing::warn!(run = %run_id, "releasing PENDING jobs: {e}"),
            }
        }
        Ok(released)
    }

    /// Publishes a run whose create began over a minute ago.
    async fn finish_publishing(&self, run_id: &str, now_ms: i64) -> StoreResult<()> {
        let Some(stored) = self.load_run(run_id).await? else {
            return Ok(());
        };
        match stored.unpublished_since {
            Some(since) if now_ms - since >= PUBLISH_STALE_MS => {
                tracing::info!(run = %run_id, "publishing a workflow run whose create was interrupted");
                self.publish_run(&stored.run).await
            }
            _ => Ok(()),
        }
    }

    /// Decides a run's PENDING jobs, step by step, from the states of
    /// their dependencies (read consistently): all SUCCEEDED → QUEUED; one
    /// FAILED, CANCELLED or TIMED_OUT → FAILED, transitively.
    async fn sweep_run(
        &self,
        run_id: &str,
        by_step: BTreeMap<String, Vec<JobRow>>,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        let Some(stored) = self.load_run(run_id).await? else {
            return Ok(Vec::new());
        };
        let steps = &stored.run.steps;
        let step = |name: &str| steps.iter().find(|s| s.name == name);
        let dependencies = |name: &str| -> Vec<(&str, &str)> {
            step(name)
                .into_iter()
                .flat_map(|s| s.depends_on.iter())
                .filter_map(|d| step(d))
                .flat_map(|d| d.jobs.iter().map(move |j| (d.name.as_str(), j.as_str())))
                .collect()
        };
        let all: BTreeSet<String> = by_step
            .keys()
            .flat_map(|name| dependencies(name))
            .map(|(_, id)| id.to_string())
            .collect();
        let all: Vec<String> = all.into_iter().collect();
        let states: HashMap<String, JobState> = self
            .load_rows(&all)
            .await?
            .into_iter()
            .map(|(id, r)| (id, r.state))
            .collect();
        let mut released = Vec::new();
        for (name, rows) in by_step {
            let deps = dependencies(&name);
            let bad = deps.iter().find_map(|(s, id)| {
                states
                    .get(*id)
                    .filter(|st| ended_badly(**st))
                    .map(|st| (*s, *id, *st))
            });
            if let Some((dep_step, dep_id, dep_state)) = bad {
                let reason = dependency_failed_reason(dep_step, dep_id, dep_state);
                let failed = self
                    .mutate_rows(rows, |row| Ok(fail_row(row, &reason, now_ms)))
                    .await?;
                if let Some((_, first)) = failed.first() {
                    let ended = vec![(name.clone(), first.id.clone(), JobState::Failed)];
                    self.fail_dependents(steps, ended, now_ms).await?;
                }
            } else if deps
                .iter()
                .all(|(_, id)| states.get(*id) == Some(&JobState::Succeeded))
            {
                let written = self
                    .mutate_rows(rows, |row| Ok(release_row(row, now_ms)))
                    .await?;
                released.extend(written.into_iter().map(|(_, r)| r.pool));
            }
        }
        Ok(released)
    }
}
