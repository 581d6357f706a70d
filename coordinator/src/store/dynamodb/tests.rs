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

fn client(interceptor: Option<WriteCounter>) -> Client {
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(crate::moto::region())
        .credentials_provider(crate::moto::credentials())
        .endpoint_url(crate::moto::endpoint())
        .http_client(https_client());
    if let Some(interceptor) = interceptor {
        config = config.interceptor(interceptor);
    }
    Client::from_conf(config.build())
}

async fn store_with(client: Client) -> DynamoStore {
    let config = DynamoDbConfig {
        table: format!("drover-{}", ulid::Ulid::new().to_string().to_lowercase()),
        ..DynamoDbConfig::default()
    };
    create_table(&client, &config.table).await.unwrap();
    DynamoStore::new(client, &config)
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
    store.start(&lease, now + 1).await.unwrap();
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
