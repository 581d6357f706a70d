//! The one behavioural suite every [`Store`] backend must pass. Each test is a
//! generic function; `store_conformance!` expands them for a backend.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use drover_proto::model::{JobSpec, JobState, Resources, RetryPolicy};

use super::*;

pub(in crate::store) mod workflows;
use workflows::*;

const T0: i64 = 1_700_000_000_000;
const TTL: u64 = 60_000;

fn spec(name: &str) -> JobSpec {
    let mut spec = JobSpec::command(["true"]);
    spec.name = name.to_string();
    spec
}

fn big() -> Resources {
    Resources {
        cpu_millis: 64_000,
        memory_mib: 1 << 20,
        gpus: 8,
        disk_gib: 1000,
        gpu_model: None,
    }
}

async fn submit<S: Store>(store: &S, specs: Vec<JobSpec>, now: i64) -> Vec<String> {
    let jobs = specs
        .into_iter()
        .map(|spec| NewJob {
            id: ulid::Ulid::new().to_string(),
            spec,
            workflow: None,
        })
        .collect();
    store
        .submit(jobs, now)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect()
}

async fn session<S: Store>(store: &S, id: &str, now: i64) -> ClaimOffer {
    session_with(store, id, BTreeMap::new(), now).await
}

async fn session_with<S: Store>(
    store: &S,
    id: &str,
    labels: BTreeMap<String, String>,
    now: i64,
) -> ClaimOffer {
    store
        .create_session(
            &NewSession {
                session_id: id.to_string(),
                token_hash: "h".into(),
                agent_id: format!("agent-{id}"),
                pool: "default".into(),
                hostname: "host".into(),
                labels: labels.clone(),
                capacity: big(),
                runtime: "process".into(),
                version: "test".into(),
                health_addr: String::new(),
                ttl_ms: TTL,
            },
            now,
        )
        .await
        .unwrap();
    ClaimOffer {
        session_id: id.to_string(),
        agent_id: format!("agent-{id}"),
        pool: "default".into(),
        labels,
        free: big(),
        max_jobs: 1,
    }
}

fn done(outcome: OutcomeKind, exit_code: Option<i32>) -> Completion {
    Completion {
        outcome,
        exit_code,
        reason: format!("{outcome:?}"),
    }
}

async fn claim_one<S: Store>(store: &S, offer: &ClaimOffer, now: i64) -> Option<ClaimedJob> {
    store
        .claim(offer, 64, now)
        .await
        .unwrap()
        .into_iter()
        .next()
}

pub async fn claim_is_exclusive_under_concurrency<S: Store>(store: S) {
    let store = Arc::new(store);
    let ids = submit(
        &*store,
        (0..300).map(|i| spec(&format!("j{i}"))).collect(),
        T0,
    )
    .await;
    let mut claimers = Vec::new();
    for c in 0..16 {
        let store = store.clone();
        claimers.push(tokio::spawn(async move {
            let mut offer = session(&*store, &format!("s{c}"), T0).await;
            offer.max_jobs = 3;
            let mut got = Vec::new();
            loop {
                let claimed = store.claim(&offer, 64, T0).await.unwrap();
                if claimed.is_empty() {
                    return got;
                }
                got.extend(claimed.into_iter().map(|c| c.lease.job_id));
            }
        }));
    }
    let mut all = Vec::new();
    for claimer in claimers {
        all.extend(claimer.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), unique.len(), "a job was leased twice");
    assert_eq!(unique.len(), ids.len(), "every job is leased once");
}

pub async fn stale_attempt_and_foreign_session_are_fenced<S: Store>(store: S) {
    submit(&store, vec![spec("a")], T0).await;
    let offer = session(&store, "s1", T0).await;
    session(&store, "s2", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    let stale = LeaseRef {
        attempt: lease.attempt + 1,
        ..lease.clone()
    };
    let foreign = LeaseRef {
        session_id: "s2".into(),
        ..lease.clone()
    };
    for bad in [&stale, &foreign] {
        assert!(matches!(
            store.start(bad, T0, None).await,
            Err(StoreError::LeaseLost { .. })
        ));
        assert!(matches!(
            store.check_lease(bad).await,
            Err(StoreError::LeaseLost { .. })
        ));
        assert!(matches!(
            store
                .complete(bad, &done(OutcomeKind::Succeeded, Some(0)), T0)
                .await,
            Err(StoreError::LeaseLost { .. })
        ));
    }
    store.start(&lease, T0, None).await.unwrap();
    // The agent lost the session; the job went to another attempt.
    store.end_session("s1", "test", T0 + 1).await.unwrap();
    let offer2 = session(&store, "s3", T0 + 2).await;
    let second = claim_one(&store, &offer2, T0 + 2).await.unwrap().lease;
    assert_eq!(second.attempt, lease.attempt + 1);
    // A late complete from the first attempt is rejected and changes nothing.
    assert!(matches!(
        store
            .complete(&lease, &done(OutcomeKind::Succeeded, Some(0)), T0 + 3)
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(
        store.get_job(&lease.job_id).await.unwrap().state,
        JobState::Leased
    );
}

pub async fn claims_in_priority_then_fifo_order<S: Store>(store: S) {
    let mut specs = Vec::new();
    for (name, priority) in [
        ("low1", 0),
        ("high1", 10),
        ("low2", 0),
        ("high2", 10),
        ("mid", 5),
    ] {
        let mut s = spec(name);
        s.priority = priority;
        specs.push(s);
    }
    // Submit one by one so FIFO order is the submit order.
    for s in specs {
        submit(&store, vec![s], T0).await;
    }
    let offer = session(&store, "s1", T0).await;
    let mut order = Vec::new();
    while let Some(c) = claim_one(&store, &offer, T0).await {
        order.push(c.spec.name);
    }
    assert_eq!(order, ["high1", "high2", "mid", "low1", "low2"]);
}

pub async fn claim_skips_jobs_that_do_not_fit<S: Store>(store: S) {
    let mut large = spec("large");
    large.resources.memory_mib = 4096;
    large.priority = 10;
    submit(&store, vec![large, spec("small")], T0).await;
    let mut offer = session(&store, "s1", T0).await;
    offer.free = Resources {
        cpu_millis: 1000,
        memory_mib: 1024,
        gpus: 0,
        disk_gib: 10,
        gpu_model: None,
    };
    offer.max_jobs = 5;
    let claimed = store.claim(&offer, 64, T0).await.unwrap();
    let names: Vec<_> = claimed.iter().map(|c| c.spec.name.as_str()).collect();
    assert_eq!(
        names,
        ["small"],
        "the small job behind the large one is claimed"
    );
    let queued = store
        .list_jobs(
            &JobFilter {
                state: Some(JobState::Queued),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(queued.items.len(), 1);
    assert_eq!(queued.items[0].spec.name, "large");
}

/// A claim looks past jobs that do not fit, up to `scan_limit` candidates
/// (DynamoDB reads the head in pages sized to the claim: this needs several).
pub async fn claim_looks_past_unfit_jobs_up_to_the_scan_limit<S: Store>(store: S) {
    let large: Vec<JobSpec> = (0..20)
        .map(|i| {
            let mut s = spec(&format!("large{i}"));
            s.resources.memory_mib = 4096;
            s.priority = 10;
            s
        })
        .collect();
    submit(&store, large, T0).await;
    submit(&store, vec![spec("small")], T0).await;
    let mut offer = session(&store, "s1", T0).await;
    offer.free.memory_mib = 1024;
    offer.max_jobs = 1;
    assert!(
        store.claim(&offer, 20, T0).await.unwrap().is_empty(),
        "the small job is the 21st candidate: beyond a scan limit of 20"
    );
    let claimed = store.claim(&offer, 21, T0).await.unwrap();
    let names: Vec<_> = claimed.iter().map(|c| c.spec.name.as_str()).collect();
    assert_eq!(names, ["small"], "found within a scan limit of 21");
}

pub async fn claim_respects_free_resources_across_jobs<S: Store>(store: S) {
    let jobs: Vec<_> = (0..4)
        .map(|i| {
            let mut s = spec(&format!("j{i}"));
            s.resources.cpu_millis = 600;
            s
        })
        .collect();
    submit(&store, jobs, T0).await;
    let mut offer = session(&store, "s1", T0).await;
    offer.free = Resources {
        cpu_millis: 2000,
        memory_mib: 10_000,
        gpus: 0,
        disk_gib: 0,
        gpu_model: None,
    };
    offer.max_jobs = 10;
    assert_eq!(
        store.claim(&offer, 64, T0).await.unwrap().len(),
        3,
        "3 × 600m fit in 2000m"
    );
}

pub async fn claim_matches_constraints_to_labels<S: Store>(store: S) {
    let mut gpu_only = spec("needs-a10g");
    gpu_only
        .constraints
        .insert("instance_type".into(), "g5.xlarge".into());
    submit(&store, vec![gpu_only], T0).await;
    let plain = session(&store, "plain", T0).await;
    assert!(claim_one(&store, &plain, T0).await.is_none());
    let labels = BTreeMap::from([("instance_type".to_string(), "g5.xlarge".to_string())]);
    let gpu = session_with(&store, "gpu", labels, T0).await;
    assert_eq!(
        claim_one(&store, &gpu, T0).await.unwrap().spec.name,
        "needs-a10g"
    );
}

pub async fn ended_session_requeues_on_the_infra_budget<S: Store>(store: S) {
    let mut s = spec("a");
    s.retry = RetryPolicy {
        max_attempts: 1,
        max_infra_retries: 1,
        ..RetryPolicy::default()
    };
    let id = submit(&store, vec![s], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    store.start(&lease, T0, None).await.unwrap();
    let ended = store.end_session("s1", "agent lost", T0 + 1).await.unwrap();
    assert_eq!(ended.requeued, vec![id.clone()]);
    let job = store.get_job(&id).await.unwrap();
    assert_eq!(
        (job.state, job.failures, job.infra_retries),
        (JobState::Queued, 0, 1)
    );
    // Ending again is harmless.
    store.end_session("s1", "agent lost", T0 + 2).await.unwrap();
    // The second loss exhausts max_infra_retries = 1.
    let offer2 = session(&store, "s2", T0 + 3).await;
    let lease2 = claim_one(&store, &offer2, T0 + 3).await.unwrap().lease;
    assert_eq!(lease2.attempt, 2);
    let ended = store.end_session("s2", "agent lost", T0 + 4).await.unwrap();
    assert_eq!(ended.finished, vec![id.clone()]);
    let job = store.get_job(&id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job
        .reason
        .unwrap()
        .contains("infrastructure retries exhausted"));
}

pub async fn failures_retry_with_backoff_until_max_attempts<S: Store>(store: S) {
    let mut s = spec("flaky");
    s.retry = RetryPolicy {
        max_attempts: 2,
        backoff_secs: 10,
        ..RetryPolicy::default()
    };
    let id = submit(&store, vec![s], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    let state = store
        .complete(&lease, &done(OutcomeKind::Failed, Some(1)), T0)
        .await
        .unwrap()
        .state;
    assert_eq!(state, JobState::Queued);
    let job = store.get_job(&id).await.unwrap();
    assert_eq!(job.failures, 1);
    assert_eq!(job.not_before_ms, Some(T0 + 10_000));
    assert!(
        claim_one(&store, &offer, T0 + 9_999).await.is_none(),
        "backoff holds the job"
    );
    let lease = claim_one(&store, &offer, T0 + 10_000).await.unwrap().lease;
    assert_eq!(lease.attempt, 2);
    let state = store
        .complete(&lease, &done(OutcomeKind::Failed, Some(1)), T0 + 10_001)
        .await
        .unwrap()
        .state;
    assert_eq!(state, JobState::Failed);
    let job = store.get_job(&id).await.unwrap();
    assert_eq!((job.failures, job.exit_code), (2, Some(1)));
}

pub async fn only_listed_exit_codes_are_retried<S: Store>(store: S) {
    let mut s = spec("picky");
    s.retry = RetryPolicy {
        max_attempts: 5,
        retry_on_exit_codes: vec![75],
        backoff_secs: 0,
        ..RetryPolicy::default()
    };
    let id = submit(&store, vec![s], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    assert_eq!(
        store
            .complete(&lease, &done(OutcomeKind::Failed, Some(75)), T0)
            .await
            .unwrap()
            .state,
        JobState::Queued
    );
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    assert_eq!(
        store
            .complete(&lease, &done(OutcomeKind::Failed, Some(2)), T0)
            .await
            .unwrap()
            .state,
        JobState::Failed
    );
    assert_eq!(store.get_job(&id).await.unwrap().failures, 2);
}

pub async fn interruptions_do_not_spend_attempts<S: Store>(store: S) {
    let mut s = spec("spot");
    s.retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    let id = submit(&store, vec![s], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    let state = store
        .complete(&lease, &done(OutcomeKind::Interrupted, None), T0)
        .await
        .unwrap()
        .state;
    assert_eq!(state, JobState::Queued);
    let job = store.get_job(&id).await.unwrap();
    assert_eq!((job.failures, job.infra_retries), (0, 1));
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    store
        .complete(&lease, &done(OutcomeKind::Succeeded, Some(0)), T0)
        .await
        .unwrap();
    assert_eq!(store.get_job(&id).await.unwrap().state, JobState::Succeeded);
}

pub async fn idempotency_key_returns_the_existing_job<S: Store>(store: S) {
    let mut s = spec("once");
    s.idempotency_key = Some("deploy-42".into());
    let first = store
        .submit(
            vec![NewJob {
                id: ulid::Ulid::new().to_string(),
                spec: s.clone(),
                workflow: None,
            }],
            T0,
        )
        .await
        .unwrap();
    let second = store
        .submit(
            vec![NewJob {
                id: ulid::Ulid::new().to_string(),
                spec: s,
                workflow: None,
            }],
            T0,
        )
        .await
        .unwrap();
    assert!(first[0].created);
    assert!(!second[0].created);
    assert_eq!(first[0].id, second[0].id);
    let all = store
        .list_jobs(&JobFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1);
}

pub async fn cancel_works_in_every_state<S: Store>(store: S) {
    let ids = submit(
        &store,
        vec![
            spec("queued"),
            spec("leased"),
            spec("running"),
            spec("done"),
        ],
        T0,
    )
    .await;
    // QUEUED → CANCELLED at once.
    let job = store.cancel(&ids[0], T0).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(
        store.cancel(&ids[0], T0).await.unwrap().state,
        JobState::Cancelled,
        "cancel twice is fine"
    );
    let mut offer = session(&store, "s1", T0).await;
    offer.max_jobs = 3;
    let leases: Vec<_> = store
        .claim(&offer, 64, T0)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lease)
        .collect();
    let by_job = |id: &str| leases.iter().find(|l| l.job_id == id).unwrap().clone();
    let (leased, running, finished) = (by_job(&ids[1]), by_job(&ids[2]), by_job(&ids[3]));
    store.start(&running, T0, None).await.unwrap();
    store
        .complete(&finished, &done(OutcomeKind::Succeeded, Some(0)), T0)
        .await
        .unwrap();
    // LEASED and RUNNING: recorded, and the heartbeat tells the agent.
    for lease in [&leased, &running] {
        let job = store.cancel(&lease.job_id, T0).await.unwrap();
        assert!(job.cancel_requested);
        assert!(!job.state.is_terminal());
    }
    let answer = store
        .heartbeat("s1", &[leased.clone(), running.clone()], false, T0)
        .await
        .unwrap();
    let mut told: Vec<_> = answer.cancel.iter().map(|l| l.job_id.clone()).collect();
    told.sort();
    let mut expected = vec![leased.job_id.clone(), running.job_id.clone()];
    expected.sort();
    assert_eq!(told, expected);
    // The agent stops one; the other is interrupted by a drain: a requeue
    // must not resurrect a cancelled job.
    assert_eq!(
        store
            .complete(&running, &done(OutcomeKind::Cancelled, Some(143)), T0)
            .await
            .unwrap()
            .state,
        JobState::Cancelled
    );
    assert_eq!(
        store
            .complete(&leased, &done(OutcomeKind::Interrupted, None), T0)
            .await
            .unwrap()
            .state,
        JobState::Cancelled
    );
    // Finished jobs cannot be cancelled.
    assert!(matches!(
        store.cancel(&ids[3], T0).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.cancel("01NOSUCHJOB", T0).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn cancelled_job_held_by_a_dead_session_stays_cancelled<S: Store>(store: S) {
    let id = submit(&store, vec![spec("a")], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    claim_one(&store, &offer, T0).await.unwrap();
    store.cancel(&id, T0).await.unwrap();
    store.end_session("s1", "agent lost", T0 + 1).await.unwrap();
    assert_eq!(store.get_job(&id).await.unwrap().state, JobState::Cancelled);
}

pub async fn every_transition_appends_an_event<S: Store>(store: S) {
    let mut s = spec("a");
    s.retry.max_attempts = 2;
    s.retry.backoff_secs = 0;
    let id = submit(&store, vec![s], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    store.start(&lease, T0 + 1, None).await.unwrap();
    store
        .complete(&lease, &done(OutcomeKind::Failed, Some(3)), T0 + 2)
        .await
        .unwrap();
    let lease = claim_one(&store, &offer, T0 + 3).await.unwrap().lease;
    store.start(&lease, T0 + 4, None).await.unwrap();
    store
        .complete(&lease, &done(OutcomeKind::Succeeded, Some(0)), T0 + 5)
        .await
        .unwrap();
    let events = store.events(&id).await.unwrap();
    let states: Vec<_> = events.iter().map(|e| (e.state, e.attempt)).collect();
    assert_eq!(
        states,
        [
            (JobState::Queued, 0),
            (JobState::Leased, 1),
            (JobState::Running, 1),
            (JobState::Queued, 1),
            (JobState::Leased, 2),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    assert!(events
        .windows(2)
        .all(|w| w[0].seq < w[1].seq && w[0].at_ms <= w[1].at_ms));
    assert_eq!(events[1].agent_id.as_deref(), Some("agent-s1"));
}

pub async fn list_filters_and_pages_with_a_cursor<S: Store>(store: S) {
    let mut specs = Vec::new();
    for i in 0..7 {
        let mut s = spec(if i % 2 == 0 { "even" } else { "odd" });
        s.pool = if i < 5 {
            "default".into()
        } else {
            "gpu".into()
        };
        specs.push(s);
    }
    for s in specs {
        submit(&store, vec![s], T0).await;
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_jobs(&JobFilter::default(), cursor.as_deref(), 3)
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.into_iter().map(|j| j.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, no repeats across pages");
    let gpu = JobFilter {
        pool: Some("gpu".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_jobs(&gpu, None, 10).await.unwrap().items.len(),
        2
    );
    let odd = JobFilter {
        name: Some("odd".into()),
        ..Default::default()
    };
    assert_eq!(
        store.list_jobs(&odd, None, 10).await.unwrap().items.len(),
        3
    );
    let running = JobFilter {
        state: Some(JobState::Running),
        ..Default::default()
    };
    assert!(store
        .list_jobs(&running, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(matches!(
        store
            .list_jobs(&JobFilter::default(), Some("!!not-a-cursor"), 10)
            .await,
        Err(StoreError::Invalid(_))
    ));
}

pub async fn complete_is_idempotent_and_recorded_once<S: Store>(store: S) {
    let id = submit(&store, vec![spec("a")], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    let ok = done(OutcomeKind::Succeeded, Some(0));
    assert_eq!(
        store.complete(&lease, &ok, T0).await.unwrap().state,
        JobState::Succeeded
    );
    assert_eq!(
        store.complete(&lease, &ok, T0 + 5).await.unwrap().state,
        JobState::Succeeded
    );
    assert!(matches!(
        store
            .complete(&lease, &done(OutcomeKind::Failed, Some(1)), T0)
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    let events = store.events(&id).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.state == JobState::Succeeded)
            .count(),
        1
    );
    let job = store.get_job(&id).await.unwrap();
    assert_eq!(job.finished_at_ms, Some(T0));
}

pub async fn heartbeat_reports_lost_leases_and_requeues_unreported_ones<S: Store>(store: S) {
    let ids = submit(
        &store,
        vec![spec("reported"), spec("unreported"), spec("done")],
        T0,
    )
    .await;
    let mut offer = session(&store, "s1", T0).await;
    offer.max_jobs = 3;
    let leases: Vec<_> = store
        .claim(&offer, 64, T0)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lease)
        .collect();
    let by_job = |id: &str| leases.iter().find(|l| l.job_id == id).unwrap().clone();
    let (reported, finished) = (by_job(&ids[0]), by_job(&ids[2]));
    // Heartbeats that may have left before the Claim answer arrived do not
    // count against a fresh lease.
    for t in [T0 + 1, T0 + 2, T0 + 3] {
        let early = store.heartbeat("s1", &[], false, t).await.unwrap();
        assert!(
            early.requeued_unreported.is_empty(),
            "a fresh lease is not yet expected in reports"
        );
    }
    // A lease the agent has just completed is not "lost" while it is still listed.
    store
        .complete(&finished, &done(OutcomeKind::Succeeded, Some(0)), T0 + 4)
        .await
        .unwrap();
    let phantom = LeaseRef {
        job_id: "01PHANTOM".into(),
        attempt: 1,
        session_id: "s1".into(),
    };
    let later = T0 + TTL as i64 / 6 + 1;
    let first = store
        .heartbeat(
            "s1",
            &[reported.clone(), finished.clone(), phantom.clone()],
            false,
            later,
        )
        .await
        .unwrap();
    assert_eq!(first.lost, vec![phantom]);
    assert!(
        first.requeued_unreported.is_empty(),
        "one missed report is tolerated"
    );
    assert_eq!(
        first.remaining_ms,
        TTL - TTL / 6 - 1,
        "a sixth of the TTL after registering, no renewal is due yet"
    );
    let second = store
        .heartbeat("s1", std::slice::from_ref(&reported), false, later + 1)
        .await
        .unwrap();
    assert_eq!(second.requeued_unreported.len(), 1);
    assert_eq!(second.requeued_unreported[0].job_id, ids[1]);
    let job = store.get_job(&ids[1]).await.unwrap();
    assert_eq!((job.state, job.infra_retries), (JobState::Queued, 1));
    assert_eq!(
        store.get_job(&ids[0]).await.unwrap().state,
        JobState::Leased
    );
    assert_eq!(
        store.get_job(&ids[2]).await.unwrap().state,
        JobState::Succeeded
    );
}

/// Heartbeats write the renewal only once a third of the TTL has passed
/// (`renewal_due`); in between they answer the stored lifetime.
pub async fn session_renewal_is_written_lazily<S: Store>(store: S) {
    session(&store, "s1", T0).await;
    let ttl = TTL as i64;
    let soon = store.heartbeat("s1", &[], false, T0 + 1_000).await.unwrap();
    assert_eq!(soon.remaining_ms, TTL - 1_000, "not renewed yet");
    let due = T0 + ttl / 3 + 1;
    let renewed = store.heartbeat("s1", &[], false, due).await.unwrap();
    assert_eq!(
        renewed.remaining_ms, TTL,
        "renewed once a third of the TTL passed"
    );
    let after = store.heartbeat("s1", &[], false, due + 1).await.unwrap();
    assert_eq!(after.remaining_ms, TTL - 1);
    // The renewal holds: not expired where the first lifetime would have ended.
    assert!(store
        .expired_sessions(T0 + ttl + 1)
        .await
        .unwrap()
        .is_empty());
    // A drain flag is written at once, renewal due or not.
    store.heartbeat("s1", &[], true, due + 2).await.unwrap();
    let agent = store
        .list_agents(due + 2, 0)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.session_id == "s1")
        .unwrap();
    assert_eq!(
        agent.state,
        drover_proto::model::AgentState::Draining,
        "{agent:?}"
    );
    // Heartbeats keep it alive indefinitely; silence lets it expire.
    let mut now = due;
    for _ in 0..10 {
        now += ttl / 6;
        store.heartbeat("s1", &[], false, now).await.unwrap();
    }
    assert!(store
        .expired_sessions(now + ttl / 2)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.expired_sessions(now + ttl + 1).await.unwrap(),
        vec!["s1".to_string()]
    );
}

pub async fn expired_session_can_neither_claim_nor_heartbeat<S: Store>(store: S) {
    submit(&store, vec![spec("a")], T0).await;
    let offer = session(&store, "s1", T0).await;
    let late = T0 + TTL as i64 + 1;
    assert_eq!(
        store.expired_sessions(late).await.unwrap(),
        vec!["s1".to_string()]
    );
    assert!(store.claim(&offer, 64, late).await.is_err());
    assert!(matches!(
        store.heartbeat("s1", &[], false, late).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.resume_session("s1", late).await,
        Err(StoreError::Conflict(_))
    ));
}

pub async fn resume_renews_the_session_and_returns_its_leases<S: Store>(store: S) {
    submit(&store, vec![spec("a")], T0).await;
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    let leases = store.resume_session("s1", T0 + 30_000).await.unwrap();
    assert_eq!(leases, vec![lease]);
    let auth = store.session_auth("s1").await.unwrap();
    assert_eq!(auth.expires_at_ms, T0 + 30_000 + TTL as i64);
}

pub async fn reaper_times_out_running_jobs_and_requeues_unstarted_ones<S: Store>(store: S) {
    let mut slow = spec("slow");
    slow.timeout_secs = 1;
    let ids = submit(&store, vec![slow, spec("stuck")], T0).await;
    let mut offer = session(&store, "s1", T0).await;
    offer.max_jobs = 2;
    let leases: Vec<_> = store
        .claim(&offer, 64, T0)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lease)
        .collect();
    let slow_lease = leases.iter().find(|l| l.job_id == ids[0]).unwrap().clone();
    store.start(&slow_lease, T0, None).await.unwrap();
    let nothing = store.reap_jobs(500, 10_000, T0 + 1_400).await.unwrap();
    assert_eq!(nothing, ReapedJobs::default());
    let reaped = store.reap_jobs(500, 10_000, T0 + 10_001).await.unwrap();
    assert_eq!(reaped.timed_out, vec![slow_lease.clone()]);
    assert_eq!(reaped.not_started.len(), 1);
    assert_eq!(
        store.get_job(&ids[0]).await.unwrap().state,
        JobState::TimedOut
    );
    let stuck = store.get_job(&ids[1]).await.unwrap();
    assert_eq!((stuck.state, stuck.infra_retries), (JobState::Queued, 1));
    // The agent's own late report of the timed-out attempt is fenced off.
    assert!(store
        .complete(
            &slow_lease,
            &done(OutcomeKind::Succeeded, Some(0)),
            T0 + 10_002
        )
        .await
        .is_err());
}

pub async fn paused_pool_dispatches_nothing<S: Store>(store: S) {
    submit(&store, vec![spec("a")], T0).await;
    let offer = session(&store, "s1", T0).await;
    store.set_pool_paused("default", true).await.unwrap();
    assert!(claim_one(&store, &offer, T0).await.is_none());
    assert!(store.pool_capacity("default").await.unwrap().paused);
    store.set_pool_paused("default", false).await.unwrap();
    assert!(claim_one(&store, &offer, T0).await.is_some());
}

pub async fn pools_count_queued_running_and_agents<S: Store>(store: S) {
    submit(&store, vec![spec("a"), spec("b"), spec("c")], T0).await;
    let offer = session(&store, "s1", T0).await;
    claim_one(&store, &offer, T0).await.unwrap();
    let pools = store.pools(T0 + 1000).await.unwrap();
    let pool = pools.iter().find(|p| p.pool == "default").unwrap();
    assert_eq!((pool.queued, pool.running, pool.agents), (2, 1, 1));
    assert_eq!(pool.oldest_queued_age_ms, Some(1000));
    let capacity = store.pool_capacity("default").await.unwrap();
    assert_eq!(capacity.largest, Some(big()));
    let agents = store.list_agents(T0 + 1000, 60_000).await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].running, 1);
    let drained = store.request_drain("agent-s1", T0 + 1000).await.unwrap();
    assert_eq!(drained.state, drover_proto::model::AgentState::Draining);
    assert!(
        store
            .heartbeat("s1", &[], false, T0 + 1001)
            .await
            .unwrap()
            .drain
    );
}

pub async fn retry_requeues_a_finished_job_as_a_fresh_run<S: Store>(store: S) {
    let id = submit(&store, vec![spec("a")], T0).await.remove(0);
    let offer = session(&store, "s1", T0).await;
    let lease = claim_one(&store, &offer, T0).await.unwrap().lease;
    assert!(
        matches!(store.retry(&id, T0).await, Err(StoreError::Conflict(_))),
        "not while leased"
    );
    store
        .complete(&lease, &done(OutcomeKind::Failed, Some(1)), T0)
        .await
        .unwrap();
    let job = store.retry(&id, T0 + 1).await.unwrap();
    assert_eq!(
        (job.state, job.failures, job.exit_code),
        (JobState::Queued, 0, None)
    );
    assert_eq!(
        claim_one(&store, &offer, T0 + 2)
            .await
            .unwrap()
            .lease
            .attempt,
        2
    );
}

pub async fn leader_lease_is_exclusive_until_it_expires<S: Store>(store: S) {
    let a = store
        .try_acquire_leader("scaler", "a", TTL, T0)
        .await
        .unwrap()
        .expect("a free lease is granted");
    assert_eq!(a.expires_at_ms, T0 + TTL as i64);
    assert_eq!(
        store
            .try_acquire_leader("scaler", "b", TTL, T0 + 1)
            .await
            .unwrap(),
        None,
        "held by a"
    );
    assert!(
        store
            .try_acquire_leader("other", "b", TTL, T0 + 1)
            .await
            .unwrap()
            .is_some(),
        "leases are per name"
    );
    let renewed = store
        .try_acquire_leader("scaler", "a", TTL, T0 + 10_000)
        .await
        .unwrap()
        .expect("the holder renews");
    assert_eq!(renewed.epoch, a.epoch, "a renewal keeps the epoch");
    assert_eq!(renewed.expires_at_ms, T0 + 10_000 + TTL as i64);
    assert_eq!(
        store
            .try_acquire_leader("scaler", "b", TTL, renewed.expires_at_ms)
            .await
            .unwrap(),
        None,
        "live up to its expiry"
    );
    let b = store
        .try_acquire_leader("scaler", "b", TTL, renewed.expires_at_ms + 1)
        .await
        .unwrap()
        .expect("an expired lease is taken over");
    assert_eq!(b.epoch, a.epoch + 1, "a new holder gets a new epoch");
    assert_eq!(
        store
            .try_acquire_leader("scaler", "a", TTL, renewed.expires_at_ms + 2)
            .await
            .unwrap(),
        None,
        "the old holder is out"
    );
}

pub async fn leader_lease_goes_to_one_of_many_concurrent_takers<S: Store>(store: S) {
    let store = Arc::new(store);
    let mut takers = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        takers.push(tokio::spawn(async move {
            store
                .try_acquire_leader("scaler", &format!("c{i}"), TTL, T0)
                .await
                .unwrap()
        }));
    }
    let mut granted = Vec::new();
    for taker in takers {
        granted.extend(taker.await.unwrap());
    }
    assert_eq!(granted.len(), 1, "exactly one holder: {granted:?}");
}

pub async fn scaler_records_are_fenced_by_the_leader_lease<S: Store>(store: S) {
    let a = store
        .try_acquire_leader("scaler", "a", TTL, T0)
        .await
        .unwrap()
        .unwrap();
    store
        .put_scaler_state("gpu", "{\"v\":1}", &a)
        .await
        .unwrap();
    store
        .put_scaler_state("cpu", "{\"v\":2}", &a)
        .await
        .unwrap();
    // Expired but not taken over: still holds.
    store
        .put_scaler_state("gpu", "{\"v\":3}", &a)
        .await
        .unwrap();
    let b = store
        .try_acquire_leader("scaler", "b", TTL, T0 + TTL as i64 + 1)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            store.put_scaler_state("gpu", "{\"v\":4}", &a).await,
            Err(StoreError::Conflict(_))
        ),
        "the old leader is fenced"
    );
    let forged = LeaderLease {
        holder: "b".into(),
        ..a.clone()
    };
    assert!(
        matches!(
            store.put_scaler_state("gpu", "{\"v\":5}", &forged).await,
            Err(StoreError::Conflict(_))
        ),
        "the epoch fences too"
    );
    store
        .put_scaler_state("cpu", "{\"v\":6}", &b)
        .await
        .unwrap();
    let states = store.scaler_states().await.unwrap();
    assert_eq!(
        states,
        BTreeMap::from([
            ("cpu".to_string(), "{\"v\":6}".to_string()),
            ("gpu".to_string(), "{\"v\":3}".to_string()),
        ])
    );
}

pub async fn released_leader_lease_is_taken_over_at_once<S: Store>(store: S) {
    let a = store
        .try_acquire_leader("scaler", "a", TTL, T0)
        .await
        .unwrap()
        .unwrap();
    // A stale release (another epoch) changes nothing.
    store
        .release_leader(&LeaderLease {
            epoch: a.epoch + 7,
            ..a.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .try_acquire_leader("scaler", "b", TTL, T0 + 1)
            .await
            .unwrap(),
        None
    );
    store.release_leader(&a).await.unwrap();
    let b = store
        .try_acquire_leader("scaler", "b", TTL, T0 + 2)
        .await
        .unwrap()
        .expect("released: free at once");
    assert_eq!(b.epoch, a.epoch + 1);
    assert!(matches!(
        store.put_scaler_state("p", "{}", &a).await,
        Err(StoreError::Conflict(_))
    ));
}

pub async fn lost_sessions_are_the_expired_ones_not_those_that_left<S: Store>(store: S) {
    let labels = BTreeMap::from([("instance_id".to_string(), "i-1".to_string())]);
    session_with(&store, "lost", labels.clone(), T0).await;
    session(&store, "left", T0).await;
    session(&store, "live", T0).await;
    store
        .end_session("left", "agent left", T0 + 1000)
        .await
        .unwrap();
    let expired_at = T0 + TTL as i64 + 1;
    store
        .end_session("lost", "agent lost: session expired", expired_at)
        .await
        .unwrap();
    let lost = store.lost_sessions(T0, expired_at).await.unwrap();
    assert_eq!(
        lost,
        vec![LostSession {
            session_id: "lost".into(),
            agent_id: "agent-lost".into(),
            pool: "default".into(),
            labels,
            ended_at_ms: expired_at,
        }]
    );
    assert!(
        store
            .lost_sessions(expired_at + 1, expired_at + 1)
            .await
            .unwrap()
            .is_empty(),
        "since bounds the list"
    );
}

pub async fn a_note_on_an_agent_is_listed_with_it<S: Store>(store: S) {
    session(&store, "zombie", T0).await;
    session(&store, "other", T0).await;
    let expired_at = T0 + TTL as i64 + 1;
    store
        .end_session("zombie", "agent lost: session expired", expired_at)
        .await
        .unwrap();
    let note = "instance i-0abc terminated by the coordinator: still InService 5m after session zombie expired";
    store.note_agent("zombie", note).await.unwrap();
    let notes = |agents: Vec<Agent>| -> BTreeMap<String, (drover_proto::model::AgentState, Option<String>)> {
        agents
            .into_iter()
            .map(|a| (a.session_id, (a.state, a.note)))
            .collect()
    };
    let listed = notes(store.list_agents(expired_at, 600_000).await.unwrap());
    assert_eq!(
        listed["zombie"],
        (
            drover_proto::model::AgentState::Gone,
            Some(note.to_string())
        )
    );
    assert_eq!(listed["other"].1, None, "only the noted agent");

    // A later note replaces it; a note on no session is NotFound.
    store.note_agent("zombie", "second note").await.unwrap();
    let listed = notes(store.list_agents(expired_at, 600_000).await.unwrap());
    assert_eq!(listed["zombie"].1.as_deref(), Some("second note"));
    assert!(
        matches!(
            store.note_agent("nobody", "x").await,
            Err(StoreError::NotFound(_))
        ),
        "unknown session"
    );
    let listed = notes(store.list_agents(expired_at, 600_000).await.unwrap());
    assert!(!listed.contains_key("nobody"), "no session was created");
}

pub async fn queued_needs_list_what_queued_jobs_ask_for<S: Store>(store: S) {
    let mut gpu = spec("gpu");
    gpu.resources.gpus = 1;
    gpu.resources.gpu_model = Some("a100".into());
    gpu.constraints = BTreeMap::from([("arch".to_string(), "arm64".to_string())]);
    let mut flaky = spec("flaky");
    flaky.retry = RetryPolicy {
        max_attempts: 2,
        backoff_secs: 600,
        ..RetryPolicy::default()
    };
    let mut other = spec("other");
    other.pool = "elsewhere".into();
    submit(&store, vec![gpu.clone(), flaky, spec("leased"), other], T0).await;
    let mut offer = session(&store, "s1", T0).await;
    offer.max_jobs = 2;
    // Leases "flaky" and "leased" (the GPU job does not fit the offer's labels).
    let claimed = store.claim(&offer, 64, T0).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let flaky_lease = claimed
        .iter()
        .find(|c| c.spec.name == "flaky")
        .unwrap()
        .lease
        .clone();
    store
        .complete(&flaky_lease, &done(OutcomeKind::Failed, Some(1)), T0)
        .await
        .unwrap();
    let mut needs = store.queued_needs("default", 100).await.unwrap();
    needs.sort_by_key(|n| n.resources.gpus);
    assert_eq!(
        needs,
        vec![
            JobNeeds {
                resources: spec("x").resources,
                constraints: BTreeMap::new(),
            },
            JobNeeds {
                resources: gpu.resources.clone(),
                constraints: gpu.constraints.clone(),
            },
        ],
        "queued (ready or in backoff), not leased, not other pools"
    );
    assert_eq!(store.queued_needs("default", 1).await.unwrap().len(), 1);
}

/// Expands every conformance test for one backend.
macro_rules! store_conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            store_conformance!(@tests $make;
                claim_is_exclusive_under_concurrency,
                stale_attempt_and_foreign_session_are_fenced,
                claims_in_priority_then_fifo_order,
                claim_skips_jobs_that_do_not_fit,
                claim_looks_past_unfit_jobs_up_to_the_scan_limit,
                claim_respects_free_resources_across_jobs,
                claim_matches_constraints_to_labels,
                ended_session_requeues_on_the_infra_budget,
                failures_retry_with_backoff_until_max_attempts,
                only_listed_exit_codes_are_retried,
                interruptions_do_not_spend_attempts,
                idempotency_key_returns_the_existing_job,
                cancel_works_in_every_state,
                cancelled_job_held_by_a_dead_session_stays_cancelled,
                every_transition_appends_an_event,
                list_filters_and_pages_with_a_cursor,
                complete_is_idempotent_and_recorded_once,
                heartbeat_reports_lost_leases_and_requeues_unreported_ones,
                expired_session_can_neither_claim_nor_heartbeat,
                session_renewal_is_written_lazily,
                resume_renews_the_session_and_returns_its_leases,
                reaper_times_out_running_jobs_and_requeues_unstarted_ones,
                paused_pool_dispatches_nothing,
                pools_count_queued_running_and_agents,
                retry_requeues_a_finished_job_as_a_fresh_run,
                leader_lease_is_exclusive_until_it_expires,
                leader_lease_goes_to_one_of_many_concurrent_takers,
                scaler_records_are_fenced_by_the_leader_lease,
                released_leader_lease_is_taken_over_at_once,
                lost_sessions_are_the_expired_ones_not_those_that_left,
                queued_needs_list_what_queued_jobs_ask_for,
                a_note_on_an_agent_is_listed_with_it,
                workflow_run_is_created_with_roots_queued_and_the_rest_pending,
                dependents_are_released_when_all_their_dependencies_succeeded,
                two_dependencies_finishing_together_release_the_step_exactly_once,
                a_failed_step_fails_its_dependents_transitively,
                every_way_a_dependency_ends_badly_fails_its_dependents,
                cancel_run_cancels_every_unfinished_step,
                retry_of_a_succeeded_workflow_job_is_refused,
                runs_list_newest_first_with_a_cursor,
                start_records_the_attempt_price_on_its_running_event,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                super::$test($make.await).await;
            }
        )*
    };
}

store_conformance!(sqlite, async { SqliteStore::in_memory().unwrap() });
store_conformance!(dynamodb, crate::store::dynamodb::tests::fresh_store());
