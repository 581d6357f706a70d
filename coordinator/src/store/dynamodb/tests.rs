//! Runs the DynamoDB store against moto's server (`crate::moto`: one server
//! per test process on a free loopback port), a fresh table per test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::Client;
use drover_proto::model::JobSpec;

use super::*;
use crate::store::{ClaimOffer, NewJob, NewSession};

/// A client on moto, with the store's retries and throttle counter.
fn client_for(interceptor: Option<WriteCounter>, config: &DynamoDbConfig) -> Client {
    let builder = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(crate::moto::region())
        .credentials_provider(crate::moto::credentials())
        .endpoint_url(crate::moto::endpoint())
        .http_client(https_client());
    let mut builder = tuned(builder, None, config);
    if let Some(interceptor) = interceptor {
        builder = builder.interceptor(interceptor);
    }
    Client::from_conf(builder.build())
}

fn client(interceptor: Option<WriteCounter>) -> Client {
    client_for(interceptor, &DynamoDbConfig::default())
}

fn fresh_config() -> DynamoDbConfig {
    DynamoDbConfig {
        table: format!("drover-{}", ulid::Ulid::new().to_string().to_lowercase()),
        ..DynamoDbConfig::default()
    }
}

async fn store_with(client: Client) -> DynamoStore {
    store_on(client, &fresh_config()).await
}

async fn store_on(client: Client, config: &DynamoDbConfig) -> DynamoStore {
    create_table(&client, &config.table).await.unwrap();
    DynamoStore::new(client, config)
}

/// A store on a fresh table in this process's moto server.
pub(crate) async fn fresh_store() -> DynamoStore {
    store_with(client(None)).await
}

/// Counts write requests and the items they write (events apart).
#[derive(Debug, Clone, Default)]
struct WriteCounter {
    tally: Arc<Mutex<Tally>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Tally {
    write_requests: u64,
    event_items: u64,
    other_items: u64,
    /// Transactional writes bill 2 WCU per KiB (rounded up) of each item.
    estimated_wcu: u64,
}

impl Intercept for WriteCounter {
    fn name(&self) -> &'static str {
        "WriteCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let target = request
            .headers()
            .get("x-amz-target")
            .unwrap_or_default()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        let body: serde_json::Value = request
            .body()
            .bytes()
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        // (item, key, WCU factor) of every item the request writes.
        let mut written: Vec<(serde_json::Value, serde_json::Value, u64)> = Vec::new();
        let mut requests = 0;
        match target.as_str() {
            "PutItem" | "UpdateItem" | "DeleteItem" => {
                requests = 1;
                let key = body.get("Item").cloned().unwrap_or(body["Key"].clone());
                written.push((body.clone(), key, 1));
            }
            "TransactWriteItems" => {
                requests = 1;
                for op in body["TransactItems"].as_array().into_iter().flatten() {
                    if let Some(put) = op.get("Put") {
                        written.push((put.clone(), put["Item"].clone(), 2));
                    } else if let Some(other) = op.get("Update").or_else(|| op.get("Delete")) {
                        written.push((other.clone(), other["Key"].clone(), 2));
                    }
                }
            }
            "BatchWriteItem" => requests = 1,
            _ => {}
        }
        let mut tally = self.tally.lock().map_err(|_| "poisoned")?;
        tally.write_requests += requests;
        for (item, key, factor) in written {
            if key["sk"]["S"]
                .as_str()
                .unwrap_or_default()
                .starts_with("EV#")
            {
                tally.event_items += 1;
            } else {
                tally.other_items += 1;
            }
            let bytes = item.to_string().len() as u64;
            tally.estimated_wcu += factor * bytes.div_ceil(1024).max(1);
        }
        Ok(())
    }
}

impl WriteCounter {
    fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lifecycle_costs_at_most_four_write_requests_beyond_events() {
    let counter = WriteCounter::default();
    let store = store_with(client(Some(counter.clone()))).await;
    let now = 1_700_000_000_000;
    // Registration and the per-process pool/listing markers are not per job.
    store
        .create_session(
            &NewSession {
                session_id: "s1".into(),
                token_hash: "h".into(),
                agent_id: "a1".into(),
                pool: "default".into(),
                hostname: "host".into(),
                labels: BTreeMap::new(),
                capacity: Resources {
                    cpu_millis: 4000,
                    memory_mib: 8192,
                    gpus: 0,
                    disk_gib: 100,
                    gpu_model: None,
                },
                runtime: "process".into(),
                version: "test".into(),
                health_addr: String::new(),
                ttl_ms: 60_000,
            },
            now,
        )
        .await
        .unwrap();
    let warm = NewJob {
        id: ulid::Ulid::new().to_string(),
        spec: JobSpec::command(["true"]),
        workflow: None,
    };
    store.submit(vec![warm], now).await.unwrap();
    counter.take();

    let mut spec = JobSpec::command(["sh", "-c", "echo hello"]);
    spec.name = "measured".into();
    let id = ulid::Ulid::new().to_string();
    store
        .submit(
            vec![NewJob {
                id: id.clone(),
                spec,
                workflow: None,
            }],
            now,
        )
        .await
        .unwrap();
    let submit = counter.take();
    let offer = ClaimOffer {
        session_id: "s1".into(),
        agent_id: "a1".into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        free: Resources {
            cpu_millis: 64_000,
            memory_mib: 1 << 20,
            gpus: 0,
            disk_gib: 1000,
            gpu_model: None,
        },
        max_jobs: 2,
    };
    let claimed = store.claim(&offer, 64, now).await.unwrap();
    let claim = counter.take();
    assert_eq!(claimed.len(), 2);
    let lease = claimed
        .into_iter()
        .find(|c| c.lease.job_id == id)
        .unwrap()
        .lease;
    // The warm-up job was claimed in the same call: count one claim.
    let claim = Tally {
        write_requests: claim.write_requests / 2,
        event_items: claim.event_items / 2,
        other_items: claim.other_items / 2,
        estimated_wcu: claim.estimated_wcu / 2,
    };
    store.start(&lease, now + 1, None).await.unwrap();
    let start = counter.take();
    let done = Completion {
        outcome: OutcomeKind::Succeeded,
        exit_code: Some(0),
        reason: "exit 0".into(),
    };
    store.complete(&lease, &done, now + 2).await.unwrap();
    let complete = counter.take();
    let phases = [
        ("submit", &submit),
        ("claim", &claim),
        ("start", &start),
        ("complete", &complete),
    ];
    let mut total = Tally::default();
    for (phase, t) in phases {
        println!(
            "{phase:>8}: {} write request(s), {} item(s) + {} event item(s), ~{} WCU",
            t.write_requests, t.other_items, t.event_items, t.estimated_wcu
        );
        total.write_requests += t.write_requests;
        total.other_items += t.other_items;
        total.event_items += t.event_items;
        total.estimated_wcu += t.estimated_wcu;
    }
    println!(
        "   total: {} write request(s), {} item(s) + {} event item(s), ~{} WCU",
        total.write_requests, total.other_items, total.event_items, total.estimated_wcu
    );
    assert!(
        total.write_requests <= 4,
        "a job lifecycle took {} write requests",
        total.write_requests
    );
    assert_eq!(total.event_items, 4, "one event per transition");
    assert_eq!(
        store.get_job(&id).await.unwrap().state,
        drover_proto::model::JobState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_heartbeats_write_only_the_session() {
    let counter = WriteCounter::default();
    let store = store_with(client(Some(counter.clone()))).await;
    let now = 1_700_000_000_000;
    const AGENTS: u64 = 10;
    for a in 0..AGENTS {
        store
            .create_session(
                &NewSession {
                    session_id: format!("s{a}"),
                    token_hash: "h".into(),
                    agent_id: format!("a{a}"),
                    pool: "default".into(),
                    hostname: "host".into(),
                    labels: BTreeMap::new(),
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
    }
    counter.take();
    for beat in 1..=6 {
        for a in 0..AGENTS {
            store
                .heartbeat(&format!("s{a}"), &[], false, now + beat * 10_000)
                .await
                .unwrap();
        }
    }
    let tally = counter.take();
    println!(
        "60 s of heartbeats every 5 s × {AGENTS} idle agents: {} write request(s) for {} heartbeats",
        tally.write_requests,
        12 * AGENTS
    );
    // Renewals are written once a third of the TTL (20 s) has passed: at
    // 25 s and 50 s, two per agent, whatever the heartbeat rate.
    assert_eq!(
        tally.write_requests,
        2 * AGENTS,
        "O(agents) writes, not O(heartbeats)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_stay_off_the_queue_head_until_due() {
    let store = fresh_store().await;
    let now = 1_700_000_000_000;
    let mut spec = JobSpec::command(["false"]);
    spec.retry.max_attempts = 3;
    spec.retry.backoff_secs = 60;
    let id = ulid::Ulid::new().to_string();
    store
        .submit(
            vec![NewJob {
                id: id.clone(),
                spec,
                workflow: None,
            }],
            now,
        )
        .await
        .unwrap();
    store
        .create_session(
            &NewSession {
                session_id: "s1".into(),
                token_hash: "h".into(),
                agent_id: "a1".into(),
                pool: "default".into(),
                hostname: "host".into(),
                labels: BTreeMap::new(),
                capacity: Resources::default(),
                runtime: "process".into(),
                version: "test".into(),
                health_addr: String::new(),
                ttl_ms: 600_000,
            },
            now,
        )
        .await
        .unwrap();
    let offer = ClaimOffer {
        session_id: "s1".into(),
        agent_id: "a1".into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        free: Resources::default(),
        max_jobs: 1,
    };
    let lease = store.claim(&offer, 64, now).await.unwrap().remove(0).lease;
    let failed = Completion {
        outcome: OutcomeKind::Failed,
        exit_code: Some(1),
        reason: "exit 1".into(),
    };
    store.complete(&lease, &failed, now).await.unwrap();
    let head = store
        .query_index(QUEUE_INDEX, "gsi1pk", "Q#default#0".into(), None)
        .await
        .unwrap();
    assert!(head.is_empty(), "a job in backoff is not at the queue head");
    let delayed = store
        .query_index(QUEUE_INDEX, "gsi1pk", "D#default#0".into(), None)
        .await
        .unwrap();
    assert_eq!(delayed.len(), 1);
    assert!(store
        .claim(&offer, 64, now + 59_999)
        .await
        .unwrap()
        .is_empty());
    let again = store.claim(&offer, 64, now + 60_000).await.unwrap();
    assert_eq!(again[0].lease.attempt, 2);
}

// ---- workflows ----

// The run builders are the conformance suite's.
use crate::store::conformance::workflows::{run_of, step};

fn step_jobs<'a>(run: &'a RunRecord, name: &str) -> &'a [String] {
    &run.steps.iter().find(|s| s.name == name).unwrap().jobs
}

/// A live session and the offer it makes (room for 200 jobs).
async fn offer_of(store: &DynamoStore, session_id: &str, now: i64) -> ClaimOffer {
    store
        .create_session(
            &NewSession {
                session_id: session_id.into(),
                token_hash: "h".into(),
                agent_id: format!("agent-{session_id}"),
                pool: "default".into(),
                hostname: "host".into(),
                labels: BTreeMap::new(),
                capacity: Resources::default(),
                runtime: "process".into(),
                version: "test".into(),
                health_addr: String::new(),
                ttl_ms: 3_600_000,
            },
            now,
        )
        .await
        .unwrap();
    ClaimOffer {
        session_id: session_id.into(),
        agent_id: format!("agent-{session_id}"),
        pool: "default".into(),
        labels: BTreeMap::new(),
        free: Resources::default(),
        max_jobs: 200,
    }
}

/// Claims everything claimable, whatever it takes.
async fn claim_all(store: &DynamoStore, offer: &ClaimOffer, now: i64) -> Vec<LeaseRef> {
    let mut leases = Vec::new();
    loop {
        let claimed = store.claim(offer, 1000, now).await.unwrap();
        if claimed.is_empty() {
            return leases;
        }
        leases.extend(claimed.into_iter().map(|c| c.lease));
    }
}

fn ok() -> Completion {
    Completion {
        outcome: OutcomeKind::Succeeded,
        exit_code: Some(0),
        reason: "exit 0".into(),
    }
}

async fn state_item(store: &DynamoStore, id: &str) -> Item {
    store.get(job_pk(id), "STATE").await.unwrap().unwrap()
}

async fn states(store: &DynamoStore, ids: &[String]) -> Vec<JobState> {
    store
        .get_jobs(ids)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.state)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_too_large_for_one_transaction_is_created_in_chunks_and_fully_visible() {
    let counter = WriteCounter::default();
    let store = store_with(client(Some(counter.clone()))).await;
    let now = 1_700_000_000_000;
    // seed → fan[100] → join: 102 jobs, 307 items; seed's success has more
    // dependents than fit in its completion's transaction.
    let mut fan = step("fan", &["seed"]);
    fan["array"] = 100.into();
    let (run, jobs) = run_of(
        serde_json::json!({"name": "big", "steps": [step("seed", &[]), fan, step("join", &["fan"])]}),
        now,
    );
    let all: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    counter.take();
    store.create_run(&run, jobs, now).await.unwrap();
    let create = counter.take();
    println!(
        "create_run of 102 jobs: {} write request(s), {} item write(s) + {} event item(s), ~{} WCU",
        create.write_requests, create.other_items, create.event_items, create.estimated_wcu
    );
    assert!(create.write_requests > 3, "written in chunks");

    assert_eq!(store.get_run(&run.id).await.unwrap(), run);
    let got = store.get_jobs(&all).await.unwrap();
    assert_eq!(
        got.iter().map(|j| &j.id).collect::<Vec<_>>(),
        all.iter().collect::<Vec<_>>()
    );
    for job in &got {
        let step = &job.workflow.as_ref().unwrap().step;
        let expected = if step == "seed" {
            JobState::Queued
        } else {
            JobState::Pending
        };
        assert_eq!(job.state, expected, "{step}");
    }
    // Published: index keys in place, no expiry, no marker left.
    for id in &all {
        let item = state_item(&store, id).await;
        assert!(!item.contains_key("unpub") && !item.contains_key(TTL_ATTRIBUTE));
        assert!(item.contains_key("gsi3pk"));
        let expected = if id == &step_jobs(&run, "seed")[0] {
            "gsi1pk"
        } else {
            "gsi2pk"
        };
        assert!(item.contains_key(expected), "{item:?}");
    }
    let run_item = store
        .get(format!("RUN#{}", run.id), "RUN")
        .await
        .unwrap()
        .unwrap();
    assert!(!run_item.contains_key("gsi2pk") && !run_item.contains_key("unpub"));
    let listed = store.list_runs(None, 10).await.unwrap();
    assert_eq!(listed.items, vec![run.clone()]);
    let jobs_listed = store
        .list_jobs(&JobFilter::default(), None, 1000)
        .await
        .unwrap();
    assert_eq!(jobs_listed.items.len(), 102);
    assert!(store
        .release_pending(now + 120_000)
        .await
        .unwrap()
        .is_empty());

    // seed succeeds: its 100 dependents are counted down after its
    // transaction, then all released.
    let offer = offer_of(&store, "s1", now).await;
    let leases = claim_all(&store, &offer, now).await;
    assert_eq!(leases.len(), 1, "only the root is queued");
    let done = store.complete(&leases[0], &ok(), now + 1).await.unwrap();
    assert_eq!(done.released.len(), 100);
    let fan_ids = step_jobs(&run, "fan");
    assert!(states(&store, fan_ids)
        .await
        .iter()
        .all(|s| *s == JobState::Queued));
    let join = &step_jobs(&run, "join")[0];
    assert_eq!(
        get_n::<i64>(&state_item(&store, join).await, "deps"),
        Some(100)
    );

    // Fan tasks count join down (moto is slow with a table this size: two
    // of them; the conformance suite runs joins to the end).
    let one = ClaimOffer {
        max_jobs: 1,
        ..offer
    };
    for _ in 0..2 {
        let lease = store
            .claim(&one, 100, now + 2)
            .await
            .unwrap()
            .remove(0)
            .lease;
        let done = store.complete(&lease, &ok(), now + 3).await.unwrap();
        assert!(done.released.is_empty());
    }
    assert_eq!(
        get_n::<i64>(&state_item(&store, join).await, "deps"),
        Some(98)
    );
    assert!(store.release_pending(now + 4).await.unwrap().is_empty());
    assert_eq!(
        states(&store, std::slice::from_ref(join)).await,
        [JobState::Pending]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_publishes_a_run_whose_create_was_interrupted() {
    let store = fresh_store().await;
    let now = 1_700_000_000_000;
    let mut fan = step("fan", &["seed"]);
    fan["array"] = 40.into();
    let wf = serde_json::json!({"name": "cut", "steps": [step("seed", &[]), fan]});

    // Died before the run item: the jobs stay invisible and expire.
    let (orphan, orphan_jobs) = run_of(wf.clone(), now);
    store.stage_jobs(&orphan, &orphan_jobs, now).await.unwrap();
    let item = state_item(&store, &orphan_jobs[0].id).await;
    assert_eq!(
        get_n::<i64>(&item, TTL_ATTRIBUTE),
        Some((now + DAY_MS) / 1000),
        "short expiry"
    );
    assert!(!item.contains_key("gsi1pk") && !item.contains_key("gsi3pk"));

    // Died after the run item (the commit point), before publishing.
    let (run, jobs) = run_of(wf, now);
    let all: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    store.stage_jobs(&run, &jobs, now).await.unwrap();
    store.commit_run(&run, now).await.unwrap();
    // ...and had published one job (a dependent: they go first).
    let fan_ids = step_jobs(&run, "fan");
    store
        .mutate_many(&fan_ids[..1], |row| {
            Ok(row.unpublished_at_ms.take().map(|_| Transition::silent()))
        })
        .await
        .unwrap();

    let invisible = |store: DynamoStore, all: Vec<String>, run_id: String| async move {
        assert!(matches!(
            store.get_run(&run_id).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.list_runs(None, 10).await.unwrap().items.is_empty());
        assert_eq!(
            store.get_jobs(&all).await.unwrap().len(),
            1,
            "the published one"
        );
        assert!(matches!(
            store.get_job(&all[0]).await,
            Err(StoreError::NotFound(_))
        ));
    };
    invisible(store.clone(), all.clone(), run.id.clone()).await;
    let offer = offer_of(&store, "s1", now).await;
    assert!(store.claim(&offer, 100, now).await.unwrap().is_empty());

    // Within a minute the creator may still be at it: left alone.
    assert!(store
        .release_pending(now + 30_000)
        .await
        .unwrap()
        .is_empty());
    invisible(store.clone(), all.clone(), run.id.clone()).await;

    // Later the sweep finishes the publish.
    assert!(store
        .release_pending(now + 61_000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.get_run(&run.id).await.unwrap(), run);
    assert_eq!(
        store.list_runs(None, 10).await.unwrap().items,
        vec![run.clone()]
    );
    let got = store.get_jobs(&all).await.unwrap();
    assert_eq!(got.len(), 41);
    for id in &all {
        let item = state_item(&store, id).await;
        assert!(!item.contains_key("unpub") && !item.contains_key(TTL_ATTRIBUTE));
    }
    assert!(states(&store, fan_ids)
        .await
        .iter()
        .all(|s| *s == JobState::Pending));
    let leases = claim_all(&store, &offer, now + 61_000).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job_id, step_jobs(&run, "seed")[0]);
    let done = store
        .complete(&leases[0], &ok(), now + 62_000)
        .await
        .unwrap();
    assert_eq!(done.released.len(), 40);
    // The orphan never shows.
    assert!(store
        .get_jobs(&[orphan_jobs[0].id.clone()])
        .await
        .unwrap()
        .is_empty());
}

/// Writes a completion as a coordinator that died right after its
/// transaction would: the job's state and event, no dependent counted
/// down, released or failed.
async fn complete_without_follow_up(
    store: &DynamoStore,
    lease: &LeaseRef,
    completion: &Completion,
    now: i64,
) {
    let row = store.load_row(&lease.job_id).await.unwrap().unwrap();
    let mut next = row.clone();
    let transition = next.complete(lease, completion, now);
    next.version = row.version + 1;
    let items = store.transition_items(&row, &mut next, transition).unwrap();
    assert!(store.transact(items).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_settles_what_a_lost_follow_up_left_pending() {
    let store = fresh_store().await;
    let now = 1_700_000_000_000;
    let chain = || {
        serde_json::json!({"name": "chain", "steps": [
            step("first", &[]), step("second", &["first"]), step("third", &["second"]),
        ]})
    };
    let offer = offer_of(&store, "s1", now).await;

    // A success whose dependents were never counted down.
    let (run, jobs) = run_of(chain(), now);
    store.create_run(&run, jobs, now).await.unwrap();
    let lease = claim_all(&store, &offer, now).await.remove(0);
    complete_without_follow_up(&store, &lease, &ok(), now + 1).await;
    let second = &step_jobs(&run, "second")[0];
    let item = state_item(&store, second).await;
    assert_eq!(get_s(&item, "state"), Some("PENDING"));
    assert_eq!(get_n::<i64>(&item, "deps"), Some(1), "never counted down");
    assert_eq!(store.release_pending(now + 2).await.unwrap(), ["default"]);
    let job = store.get_job(second).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    let events = store.events(second).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.state, last.reason.as_str()),
        (JobState::Queued, "dependencies succeeded")
    );
    assert_eq!(
        states(&store, step_jobs(&run, "third")).await,
        [JobState::Pending]
    );
    assert!(store.release_pending(now + 3).await.unwrap().is_empty());
    let lease = claim_all(&store, &offer, now + 3).await.remove(0);
    assert_eq!(&lease.job_id, second);
    let first_third = step_jobs(&run, "third")[0].clone();

    // A failure whose dependents were never failed.
    let (run, jobs) = run_of(chain(), now);
    store.create_run(&run, jobs, now).await.unwrap();
    let lease = claim_all(&store, &offer, now).await.remove(0);
    let failed = Completion {
        outcome: OutcomeKind::Failed,
        exit_code: Some(1),
        reason: "exit 1".into(),
    };
    complete_without_follow_up(&store, &lease, &failed, now + 1).await;
    assert!(store.release_pending(now + 2).await.unwrap().is_empty());
    for step in ["second", "third"] {
        let job = store.get_job(&step_jobs(&run, step)[0]).await.unwrap();
        assert_eq!(job.state, JobState::Failed, "{step}");
        assert!(job
            .reason
            .unwrap()
            .starts_with(drover_proto::workflow::DEPENDENCY_FAILED));
    }
    // Only the first chain's last step is still PENDING (its dependency
    // runs): the failed ones left the partition the sweep reads.
    let pending: Vec<String> = store
        .query_index(OWNER_INDEX, "gsi2pk", "PENDING".into(), None)
        .await
        .unwrap()
        .iter()
        .filter_map(|i| get_s(i, "gsi2sk").map(str::to_string))
        .collect();
    assert_eq!(pending, [first_third]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_step_workflow_costs_one_write_request_per_transition() {
    let counter = WriteCounter::default();
    let store = store_with(client(Some(counter.clone()))).await;
    let now = 1_700_000_000_000;
    let offer = offer_of(&store, "s1", now).await;
    // The per-process pool and listing markers are not per run.
    let (warm, warm_jobs) = run_of(
        serde_json::json!({"name": "warm", "steps": [step("only", &[])]}),
        now,
    );
    store.create_run(&warm, warm_jobs, now).await.unwrap();
    let warm_lease = claim_all(&store, &offer, now).await.remove(0);
    store.complete(&warm_lease, &ok(), now).await.unwrap();
    counter.take();

    let (run, jobs) = run_of(
        serde_json::json!({"name": "abc", "steps": [
            step("a", &[]), step("b", &["a"]), step("c", &["b"]),
        ]}),
        now,
    );
    store.create_run(&run, jobs, now).await.unwrap();
    let mut phases = vec![("create_run".to_string(), counter.take())];
    for name in ["a", "b", "c"] {
        let lease = claim_all(&store, &offer, now).await.remove(0);
        assert_eq!(lease.job_id, step_jobs(&run, name)[0]);
        phases.push((format!("claim {name}"), counter.take()));
        store.start(&lease, now, Some(0.5)).await.unwrap();
        phases.push((format!("start {name}"), counter.take()));
        let done = store.complete(&lease, &ok(), now).await.unwrap();
        assert_eq!(done.released.len(), (name != "c") as usize);
        phases.push((format!("complete {name}"), counter.take()));
    }
    let mut total = Tally::default();
    for (phase, t) in &phases {
        println!(
            "{phase:>12}: {} write request(s), {} item(s) + {} event item(s), ~{} WCU",
            t.write_requests, t.other_items, t.event_items, t.estimated_wcu
        );
        total.write_requests += t.write_requests;
        total.other_items += t.other_items;
        total.event_items += t.event_items;
        total.estimated_wcu += t.estimated_wcu;
    }
    println!(
        "       total: {} write request(s), {} item(s) + {} event item(s), ~{} WCU",
        total.write_requests, total.other_items, total.event_items, total.estimated_wcu
    );
    let requests = |phase: &str| {
        phases
            .iter()
            .find(|(p, _)| p == phase)
            .map(|(_, t)| t.write_requests)
            .unwrap()
    };
    assert_eq!(requests("create_run"), 1, "one transaction");
    // A completion that releases its dependent: its own transaction (which
    // counts the dependent down) and the release.
    assert_eq!(requests("complete a"), 2);
    assert_eq!(requests("complete b"), 2);
    assert_eq!(requests("complete c"), 1, "like a plain job");
    // One event per transition: the root's four, and the dependents' five
    // (PENDING, then QUEUED on release, LEASED, RUNNING, SUCCEEDED).
    assert_eq!(total.event_items, 4 + 5 + 5);
    // As many as three plain jobs cost (4 each): the release replaces the
    // submit.
    assert_eq!(total.write_requests, 12);
}

// ---- throttling ----

/// Submits `n` plain jobs; their ids, in submit order.
async fn submit_jobs(store: &DynamoStore, n: usize, now: i64) -> Vec<String> {
    let jobs: Vec<NewJob> = (0..n)
        .map(|_| NewJob {
            id: ulid::Ulid::new().to_string(),
            spec: JobSpec::command(["true"]),
            workflow: None,
        })
        .collect();
    let ids = jobs.iter().map(|j| j.id.clone()).collect();
    store.submit(jobs, now).await.unwrap();
    ids
}

/// Free resources for `jobs` jobs of the default size.
fn room_for(jobs: u32) -> Resources {
    let one = Resources::default();
    Resources {
        cpu_millis: jobs * one.cpu_millis,
        memory_mib: jobs as u64 * one.memory_mib,
        ..one
    }
}

/// How many calls of `action` on `table` moto refused (the injected faults).
async fn refused(table: &str, action: &str) -> usize {
    crate::moto::dynamodb_calls(table)
        .await
        .iter()
        .filter(|(a, status)| a == action && *status == 400)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_claim_is_retried_with_backoff_and_counted() {
    use crate::metrics::DYNAMODB_THROTTLED;

    let config = fresh_config();
    let store = store_on(client_for(None, &config), &config).await;
    let now = 1_700_000_000_000;
    let mut offer = offer_of(&store, "s1", now).await;
    offer.max_jobs = 3;
    offer.free = room_for(3);
    let mut ids = submit_jobs(&store, 3, now).await;
    let (updates_before, queries_before) = (
        DYNAMODB_THROTTLED.get("UpdateItem"),
        DYNAMODB_THROTTLED.get("Query"),
    );
    let table = &config.table;
    crate::moto::dynamodb_fault(table, "UpdateItem", "ThrottlingException", 0, 2).await;
    crate::moto::dynamodb_fault(
        table,
        "Query",
        "ProvisionedThroughputExceededException",
        0,
        2,
    )
    .await;

    let claimed = store.claim(&offer, 64, now).await.unwrap();
    let mut leased: Vec<String> = claimed.iter().map(|c| c.lease.job_id.clone()).collect();
    leased.sort();
    ids.sort();
    assert_eq!(leased, ids, "every job leased despite the throttling");
    assert_eq!(refused(table, "UpdateItem").await, 2);
    assert_eq!(refused(table, "Query").await, 2);
    // Every throttled attempt counted, by operation (other tests of this
    // process may add theirs).
    assert!(DYNAMODB_THROTTLED.get("UpdateItem") >= updates_before + 2);
    assert!(DYNAMODB_THROTTLED.get("Query") >= queries_before + 2);
    let text = crate::metrics::Metrics::default().render(&[]);
    assert!(
        text.contains("drover_dynamodb_throttled_total{operation=\"UpdateItem\"}"),
        "{text}"
    );
}

/// A store whose client tries each call twice (one retry): faults beyond
/// that reach the store.
async fn store_with_two_attempts() -> (DynamoStore, DynamoDbConfig) {
    let config = DynamoDbConfig {
        max_attempts: Some(2),
        ..fresh_config()
    };
    let store = store_on(client_for(None, &config), &config).await;
    (store, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_short_by_throttling_answers_with_the_leases_it_won() {
    let (store, config) = store_with_two_attempts().await;
    let now = 1_700_000_000_000;
    let mut offer = offer_of(&store, "s1", now).await;
    offer.max_jobs = 4;
    offer.free = room_for(4);
    let ids = submit_jobs(&store, 4, now).await;
    // The first claim write goes through; the second is throttled past the
    // SDK's retries.
    crate::moto::dynamodb_fault(&config.table, "UpdateItem", "ThrottlingException", 1, 2).await;

    let first = store.claim(&offer, 64, now).await.unwrap();
    assert_eq!(
        first.len(),
        1,
        "the lease won before the error is handed out"
    );
    assert_eq!(refused(&config.table, "UpdateItem").await, 2);
    // No job is leased without the claimer knowing: the rest are QUEUED.
    for job in store.get_jobs(&ids).await.unwrap() {
        if job.id == first[0].lease.job_id {
            assert_eq!(job.state, JobState::Leased);
            assert_eq!(job.session_id.as_deref(), Some("s1"));
        } else {
            assert_eq!(job.state, JobState::Queued, "{}", job.id);
        }
    }
    let rest = store.claim(&offer, 64, now).await.unwrap();
    let mut leased: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|c| c.lease.job_id.clone())
        .collect();
    leased.sort();
    let mut ids = ids;
    ids.sort();
    assert_eq!(leased, ids, "the rest is claimable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_whose_specs_cannot_be_read_go_back_to_the_queue_unspent() {
    let (store, config) = store_with_two_attempts().await;
    let now = 1_700_000_000_000;
    let mut offer = offer_of(&store, "s1", now).await;
    offer.max_jobs = 2;
    offer.free = room_for(2);
    let ids = submit_jobs(&store, 2, now).await;
    let younger = submit_jobs(&store, 1, now + 500).await;
    crate::moto::dynamodb_fault(&config.table, "BatchGetItem", "ThrottlingException", 0, 2).await;

    let later = now + 1000;
    let err = store.claim(&offer, 64, later).await.unwrap_err();
    assert!(err.to_string().contains("BatchGetItem"), "{err}");
    for job in store.get_jobs(&ids).await.unwrap() {
        assert_eq!(job.state, JobState::Queued, "{}", job.id);
        assert_eq!(job.session_id, None);
        assert_eq!((job.failures, job.infra_retries), (0, 0), "no budget spent");
        let events = store.events(&job.id).await.unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.state, JobState::Queued);
        assert!(last.reason.contains("lease not delivered"), "{last:?}");
    }
    // Claimable again, in their place in the queue: ahead of a job
    // submitted after them.
    let mut again: Vec<String> = store
        .claim(&offer, 64, later)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lease.job_id)
        .collect();
    again.sort();
    let mut ids = ids;
    ids.sort();
    assert_eq!(again, ids);
    assert_eq!(states(&store, &younger).await, [JobState::Queued]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_over_four_queue_shards_never_share_a_job() {
    let config = DynamoDbConfig {
        queue_shards: 4,
        ..fresh_config()
    };
    let store = store_on(client_for(None, &config), &config).await;
    let now = 1_700_000_000_000;
    let mut ids = submit_jobs(&store, 40, now).await;
    let mut claimers = Vec::new();
    for c in 0..4 {
        let mut offer = offer_of(&store, &format!("s{c}"), now).await;
        offer.max_jobs = 3;
        offer.free = room_for(3);
        let store = store.clone();
        claimers.push(tokio::spawn(async move {
            let mut won = Vec::new();
            loop {
                let claimed = store.claim(&offer, 64, now).await.unwrap();
                if claimed.is_empty() {
                    return won;
                }
                won.extend(claimed.into_iter().map(|c| c.lease));
            }
        }));
    }
    let mut leases: Vec<LeaseRef> = Vec::new();
    for claimer in claimers {
        leases.extend(claimer.await.unwrap());
    }
    let mut leased: Vec<String> = leases.iter().map(|l| l.job_id.clone()).collect();
    leased.sort();
    ids.sort();
    assert_eq!(leased, ids, "every job leased exactly once");
    // The store agrees with every claimer about who holds what.
    for lease in &leases {
        let job = store.get_job(&lease.job_id).await.unwrap();
        assert_eq!(job.state, JobState::Leased);
        assert_eq!(job.session_id.as_deref(), Some(lease.session_id.as_str()));
        assert_eq!(job.attempt, lease.attempt);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_expires_its_retention_after_it_finished() {
    let store = fresh_store().await;
    let now = 1_700_000_000_000;
    let offer = offer_of(&store, "s1", now).await;
    let id = submit_jobs(&store, 1, now).await.remove(0);
    let lease = claim_all(&store, &offer, now).await.remove(0);
    store.start(&lease, now, None).await.unwrap();
    assert!(
        !state_item(&store, &id).await.contains_key(TTL_ATTRIBUTE),
        "an unfinished job never expires"
    );
    let finished = now + 5_000;
    store.complete(&lease, &ok(), finished).await.unwrap();
    let retention_ms = DynamoDbConfig::default().retention_days as i64 * DAY_MS;
    assert_eq!(
        get_n::<i64>(&state_item(&store, &id).await, TTL_ATTRIBUTE),
        Some((finished + retention_ms) / 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_was_lost_is_recognised_on_the_sdk_s_retry() {
    let config = fresh_config();
    let store = store_on(client_for(None, &config), &config).await;
    let now = 1_700_000_000_000;
    let mut offer = offer_of(&store, "s1", now).await;
    offer.max_jobs = 1;
    let id = submit_jobs(&store, 1, now).await.remove(0);
    // The claim's write is applied, its answer lost: the SDK's retry finds
    // the condition failed on this very claim's lease.
    let before = crate::moto::dynamodb_calls(&config.table).await.len();
    crate::moto::dynamodb_lost_answer(&config.table, "UpdateItem", 1).await;

    let claimed = store.claim(&offer, 64, now).await.unwrap();
    assert_eq!(claimed.len(), 1, "the lease is handed out, not orphaned");
    assert_eq!(claimed[0].lease.job_id, id);
    let calls = crate::moto::dynamodb_calls(&config.table).await;
    let updates: Vec<u16> = calls[before..]
        .iter()
        .filter(|(action, _)| action == "UpdateItem")
        .map(|(_, status)| *status)
        .collect();
    assert_eq!(
        updates,
        [500, 400],
        "applied but lost, then the failed retry"
    );
    let job = store.get_job(&id).await.unwrap();
    assert_eq!(job.state, JobState::Leased);
    assert_eq!(job.attempt, claimed[0].lease.attempt);
}
