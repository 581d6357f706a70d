//! Workflow runs: creation, dependency release and failure propagation,
//! run cancel. Part of the one conformance suite (see `conformance.rs`).

use drover_proto::workflow::{WorkflowSpec, DEPENDENCY_FAILED};

use super::*;

/// A run from a workflow given as JSON (the YAML a user writes, as JSON).
pub(in crate::store) fn run_of(
    json: serde_json::Value,
    created_at_ms: i64,
) -> (RunRecord, Vec<NewJob>) {
    let wf: WorkflowSpec = serde_json::from_value(json).expect("workflow parses");
    wf.validate().expect("workflow is valid");
    let run_id = ulid::Ulid::new().to_string();
    let ex = wf.expand(&run_id, || ulid::Ulid::new().to_string());
    let run = RunRecord {
        id: run_id,
        name: wf.name.clone(),
        description: wf.description.clone(),
        created_at_ms,
        steps: ex.steps,
        cancel_requested: false,
    };
    let jobs = ex
        .jobs
        .into_iter()
        .map(|j| NewJob {
            id: j.id,
            spec: j.spec,
            workflow: Some(j.link),
        })
        .collect();
    (run, jobs)
}

pub(in crate::store) fn step(name: &str, depends_on: &[&str]) -> serde_json::Value {
    serde_json::json!({"name": name, "depends_on": depends_on, "command": ["true"]})
}

/// gen → (mul, div[2]) → sum, plus an independent `side` step.
fn calc() -> serde_json::Value {
    let mut div = step("div", &["gen"]);
    div["array"] = 2.into();
    serde_json::json!({"name": "calc", "steps": [
        step("gen", &[]),
        step("mul", &["gen"]),
        div,
        step("sum", &["mul", "div"]),
        step("side", &[]),
    ]})
}

fn ids<'a>(run: &'a RunRecord, step: &str) -> &'a [String] {
    &run.steps
        .iter()
        .find(|s| s.name == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .jobs
}

async fn state<S: Store>(store: &S, id: &str) -> JobState {
    store.get_job(id).await.unwrap().state
}

async fn states<S: Store>(store: &S, ids: &[String]) -> Vec<JobState> {
    let mut out = Vec::new();
    for id in ids {
        out.push(state(store, id).await);
    }
    out
}

/// Claims the named job (and only it) with a fresh session.
async fn lease_job<S: Store>(store: &S, job_id: &str, session_id: &str, now: i64) -> LeaseRef {
    let mut offer = session(store, session_id, now).await;
    offer.max_jobs = 64;
    let claimed = store.claim(&offer, 64, now).await.unwrap();
    let mut lease = None;
    for c in claimed {
        if c.lease.job_id == job_id {
            lease = Some(c.lease);
        } else {
            // Not this test's job: give it back on the infra budget.
            store
                .complete(&c.lease, &done(OutcomeKind::Interrupted, None), now)
                .await
                .unwrap();
        }
    }
    lease.unwrap_or_else(|| panic!("job {job_id} was not claimable"))
}

async fn run_job<S: Store>(
    store: &S,
    job_id: &str,
    session_id: &str,
    outcome: OutcomeKind,
    now: i64,
) -> Completed {
    let lease = lease_job(store, job_id, session_id, now).await;
    store.start(&lease, now, None).await.unwrap();
    let code = (outcome == OutcomeKind::Succeeded).then_some(0).or(Some(1));
    store
        .complete(&lease, &done(outcome, code), now + 1)
        .await
        .unwrap()
}

fn count_state(events: &[JobEvent], state: JobState) -> usize {
    events.iter().filter(|e| e.state == state).count()
}

pub async fn workflow_run_is_created_with_roots_queued_and_the_rest_pending<S: Store>(store: S) {
    let (run, jobs) = run_of(calc(), T0);
    let all: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    store.create_run(&run, jobs.clone(), T0).await.unwrap();

    assert_eq!(store.get_run(&run.id).await.unwrap(), run);
    let got = store.get_jobs(&all).await.unwrap();
    assert_eq!(
        got.iter().map(|j| &j.id).collect::<Vec<_>>(),
        all.iter().collect::<Vec<_>>()
    );
    for job in &got {
        let link = job
            .workflow
            .as_ref()
            .expect("workflow jobs carry their link");
        assert_eq!(link.run_id, run.id);
        let expected = if ["gen", "side"].contains(&link.step.as_str()) {
            JobState::Queued
        } else {
            JobState::Pending
        };
        assert_eq!(job.state, expected, "{}", link.step);
    }
    let div = &got
        .iter()
        .filter(|j| j.workflow.as_ref().unwrap().step == "div")
        .collect::<Vec<_>>();
    let indices: Vec<_> = div
        .iter()
        .map(|j| j.workflow.as_ref().unwrap().task_index)
        .collect();
    assert_eq!(indices, [Some(0), Some(1)]);
    assert_eq!(
        store.get_job(&ids(&run, "sum")[0]).await.unwrap().workflow,
        got[4].workflow
    );
    let events = store.events(&ids(&run, "sum")[0]).await.unwrap();
    assert_eq!(count_state(&events, JobState::Pending), 1, "{events:?}");

    // Only the roots can be claimed.
    let mut offer = session(&store, "s1", T0).await;
    offer.max_jobs = 64;
    let mut claimed: Vec<String> = store
        .claim(&offer, 64, T0)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lease.job_id)
        .collect();
    claimed.sort();
    let mut roots = vec![ids(&run, "gen")[0].clone(), ids(&run, "side")[0].clone()];
    roots.sort();
    assert_eq!(claimed, roots);

    // Missing ids are skipped by get_jobs.
    let some = store
        .get_jobs(&["0".repeat(26), all[1].clone()])
        .await
        .unwrap();
    assert_eq!(some.len(), 1);

    // A second create with the same run id changes nothing.
    let (mut again, more_jobs) = run_of(calc(), T0);
    again.id = run.id.clone();
    let fresh: Vec<String> = more_jobs.iter().map(|j| j.id.clone()).collect();
    assert!(matches!(
        store.create_run(&again, more_jobs, T0).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.get_jobs(&fresh).await.unwrap().is_empty());
    assert_eq!(store.get_run(&run.id).await.unwrap(), run);
    assert!(matches!(
        store.get_run(&"9".repeat(26)).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn dependents_are_released_when_all_their_dependencies_succeeded<S: Store>(store: S) {
    let (run, jobs) = run_of(calc(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let gen = &ids(&run, "gen")[0];
    let done = run_job(&store, gen, "s1", OutcomeKind::Succeeded, T0).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(
        done.released,
        vec!["default".to_string(); 3],
        "mul and div[0..2]"
    );
    assert_eq!(
        states(&store, ids(&run, "div")).await,
        [JobState::Queued, JobState::Queued]
    );
    assert_eq!(state(&store, &ids(&run, "mul")[0]).await, JobState::Queued);
    let sum = &ids(&run, "sum")[0];
    assert_eq!(state(&store, sum).await, JobState::Pending);

    let done = run_job(
        &store,
        &ids(&run, "div")[0],
        "s2",
        OutcomeKind::Succeeded,
        T0,
    )
    .await;
    assert!(done.released.is_empty());
    run_job(
        &store,
        &ids(&run, "mul")[0],
        "s3",
        OutcomeKind::Succeeded,
        T0,
    )
    .await;
    assert_eq!(
        state(&store, sum).await,
        JobState::Pending,
        "div[1] still runs"
    );
    let done = run_job(
        &store,
        &ids(&run, "div")[1],
        "s4",
        OutcomeKind::Succeeded,
        T0,
    )
    .await;
    assert_eq!(done.released, ["default"]);
    let events = store.events(sum).await.unwrap();
    assert_eq!(count_state(&events, JobState::Queued), 1, "{events:?}");

    // The sweep finds nothing left to do and queues nothing twice.
    assert!(store.release_pending(T0 + 10).await.unwrap().is_empty());
    let events = store.events(sum).await.unwrap();
    assert_eq!(count_state(&events, JobState::Queued), 1, "{events:?}");
    run_job(&store, sum, "s5", OutcomeKind::Succeeded, T0).await;
}

pub async fn two_dependencies_finishing_together_release_the_step_exactly_once<S: Store>(store: S) {
    let store = Arc::new(store);
    for round in 0..5 {
        let (run, jobs) = run_of(
            serde_json::json!({"name": "join", "steps": [
                step("a", &[]), step("b", &[]), step("c", &["a", "b"]),
            ]}),
            T0,
        );
        store.create_run(&run, jobs, T0).await.unwrap();
        let a = lease_job(&*store, &ids(&run, "a")[0], &format!("a{round}"), T0).await;
        let b = lease_job(&*store, &ids(&run, "b")[0], &format!("b{round}"), T0).await;
        let ok = done(OutcomeKind::Succeeded, Some(0));
        let finish = |lease: LeaseRef| {
            let store = store.clone();
            let ok = ok.clone();
            tokio::spawn(async move { store.complete(&lease, &ok, T0 + 1).await.unwrap() })
        };
        let (ra, rb) = (finish(a), finish(b));
        let released = ra.await.unwrap().released.len() + rb.await.unwrap().released.len();
        // A backend that defers part of the release to the sweep may report
        // it there instead; together, exactly once.
        let swept = store.release_pending(T0 + 2).await.unwrap().len();
        assert_eq!(released + swept, 1, "round {round}");
        let c = &ids(&run, "c")[0];
        assert_eq!(state(&*store, c).await, JobState::Queued);
        let events = store.events(c).await.unwrap();
        assert_eq!(count_state(&events, JobState::Queued), 1, "{events:?}");
        let lease = lease_job(&*store, c, &format!("c{round}"), T0 + 3).await;
        assert_eq!(lease.attempt, 1);
    }
}

pub async fn a_failed_step_fails_its_dependents_transitively<S: Store>(store: S) {
    let (run, jobs) = run_of(calc(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let done = run_job(&store, &ids(&run, "gen")[0], "s1", OutcomeKind::Failed, T0).await;
    assert_eq!(done.state, JobState::Failed);
    assert!(done.released.is_empty());
    for step in ["mul", "div", "sum"] {
        for id in ids(&run, step) {
            let job = store.get_job(id).await.unwrap();
            assert_eq!(job.state, JobState::Failed, "{step}");
            let reason = job.reason.unwrap_or_default();
            assert!(reason.starts_with(DEPENDENCY_FAILED), "{step}: {reason}");
            let events = store.events(id).await.unwrap();
            assert_eq!(events.last().unwrap().state, JobState::Failed, "{events:?}");
        }
    }
    // The independent branch is untouched.
    let side = &ids(&run, "side")[0];
    assert_eq!(state(&store, side).await, JobState::Queued);
    run_job(&store, side, "s2", OutcomeKind::Succeeded, T0).await;
    assert!(store.release_pending(T0 + 10).await.unwrap().is_empty());
}

pub async fn every_way_a_dependency_ends_badly_fails_its_dependents<S: Store>(store: S) {
    let chain = || {
        serde_json::json!({"name": "chain", "steps": [
            step("first", &[]), step("second", &["first"]), step("third", &["second"]),
        ]})
    };
    // Cancelled while QUEUED.
    let (run, jobs) = run_of(chain(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    store.cancel(&ids(&run, "first")[0], T0).await.unwrap();
    for step in ["second", "third"] {
        let job = store.get_job(&ids(&run, step)[0]).await.unwrap();
        assert_eq!(job.state, JobState::Failed, "{step}");
        assert!(job.reason.unwrap().starts_with(DEPENDENCY_FAILED));
    }

    // Cancelled while RUNNING: the dependents fail once the agent reports.
    let (run, jobs) = run_of(chain(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let lease = lease_job(&store, &ids(&run, "first")[0], "r1", T0).await;
    store.start(&lease, T0, None).await.unwrap();
    store.cancel(&lease.job_id, T0).await.unwrap();
    assert_eq!(
        state(&store, &ids(&run, "second")[0]).await,
        JobState::Pending
    );
    store
        .complete(&lease, &done(OutcomeKind::Cancelled, Some(143)), T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        state(&store, &ids(&run, "third")[0]).await,
        JobState::Failed
    );

    // Timed out.
    let (run, jobs) = run_of(chain(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let done_ = run_job(
        &store,
        &ids(&run, "first")[0],
        "t1",
        OutcomeKind::TimedOut,
        T0,
    )
    .await;
    assert_eq!(done_.state, JobState::TimedOut);
    assert_eq!(
        state(&store, &ids(&run, "third")[0]).await,
        JobState::Failed
    );

    // The agent is lost with the infrastructure budget spent.
    let mut wf = chain();
    wf["steps"][0]["retry"] = serde_json::json!({"max_infra_retries": 0});
    let (run, jobs) = run_of(wf, T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    lease_job(&store, &ids(&run, "first")[0], "lost", T0).await;
    let ended = store
        .end_session("lost", "agent lost", T0 + 1)
        .await
        .unwrap();
    assert_eq!(ended.finished, [ids(&run, "first")[0].clone()]);
    assert_eq!(
        state(&store, &ids(&run, "first")[0]).await,
        JobState::Failed
    );
    for step in ["second", "third"] {
        let job = store.get_job(&ids(&run, step)[0]).await.unwrap();
        assert_eq!(job.state, JobState::Failed, "{step}");
        assert!(job.reason.unwrap().starts_with(DEPENDENCY_FAILED));
    }
}

pub async fn cancel_run_cancels_every_unfinished_step<S: Store>(store: S) {
    let (run, jobs) = run_of(calc(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let side = run_job(
        &store,
        &ids(&run, "side")[0],
        "s0",
        OutcomeKind::Succeeded,
        T0,
    )
    .await;
    assert_eq!(side.state, JobState::Succeeded);
    let gen = lease_job(&store, &ids(&run, "gen")[0], "s1", T0).await;
    store.start(&gen, T0, None).await.unwrap();

    let cancelled = store.cancel_run(&run.id, T0 + 1).await.unwrap();
    assert!(cancelled.cancel_requested);
    assert!(store.get_run(&run.id).await.unwrap().cancel_requested);
    for step in ["mul", "div", "sum"] {
        assert!(
            states(&store, ids(&run, step))
                .await
                .iter()
                .all(|s| *s == JobState::Cancelled),
            "{step} is cancelled, not failed by its dependency"
        );
    }
    assert_eq!(
        state(&store, &ids(&run, "side")[0]).await,
        JobState::Succeeded
    );
    let gen_job = store.get_job(&gen.job_id).await.unwrap();
    assert_eq!(gen_job.state, JobState::Running);
    assert!(gen_job.cancel_requested);
    store
        .complete(&gen, &done(OutcomeKind::Cancelled, Some(143)), T0 + 2)
        .await
        .unwrap();
    assert_eq!(state(&store, &gen.job_id).await, JobState::Cancelled);

    // Again: a no-op.
    let again = store.cancel_run(&run.id, T0 + 3).await.unwrap();
    assert!(again.cancel_requested);
    assert!(matches!(
        store.cancel_run(&"9".repeat(26), T0).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn retry_of_a_succeeded_workflow_job_is_refused<S: Store>(store: S) {
    let (run, jobs) = run_of(calc(), T0);
    store.create_run(&run, jobs, T0).await.unwrap();
    let gen = &ids(&run, "gen")[0];
    run_job(&store, gen, "s1", OutcomeKind::Succeeded, T0).await;
    assert!(matches!(
        store.retry(gen, T0 + 5).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(state(&store, gen).await, JobState::Succeeded);
    // A failed one may run again.
    let side = &ids(&run, "side")[0];
    run_job(&store, side, "s2", OutcomeKind::Failed, T0).await;
    assert_eq!(
        store.retry(side, T0 + 5).await.unwrap().state,
        JobState::Queued
    );
}

pub async fn runs_list_newest_first_with_a_cursor<S: Store>(store: S) {
    let mut created = Vec::new();
    for i in 0..5 {
        let (run, jobs) = run_of(
            serde_json::json!({"name": format!("r{i}"), "steps": [step("only", &[])]}),
            T0 + i,
        );
        store.create_run(&run, jobs, T0 + i).await.unwrap();
        created.push(run.id);
        // ULIDs of one millisecond are not ordered: space them.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list_runs(cursor.as_deref(), 2).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created);
}

pub async fn start_records_the_attempt_price_on_its_running_event<S: Store>(store: S) {
    let ids = submit(&store, vec![spec("priced"), spec("unpriced")], T0).await;
    let price_of = |id: &str| if id == ids[0] { Some(0.25) } else { None };
    let offer = session(&store, "s1", T0).await;
    for _ in 0..2 {
        // Jobs of one batch may be claimed in either order.
        let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
        let price = price_of(&lease.job_id);
        store.start(&lease, T0 + 1, price).await.unwrap();
        let events = store.events(&lease.job_id).await.unwrap();
        let running = events
            .iter()
            .find(|e| e.state == JobState::Running)
            .unwrap();
        assert_eq!(running.usd_per_hour, price);
        assert!(events
            .iter()
            .filter(|e| e.state != JobState::Running)
            .all(|e| e.usd_per_hour.is_none()));
    }
}
