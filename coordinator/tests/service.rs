//! Service-level behaviour with a hand-moved clock: the reaper, its circuit
//! breaker, and long-poll claims woken by new work.

use std::sync::Arc;
use std::time::Duration;

use drover_coordinator::blob::LocalBlobStore;
use drover_coordinator::clock::ManualClock;
use drover_coordinator::store::{SessionAuth, SqliteStore};
use drover_coordinator::{Config, Service};
use drover_proto::model::{JobSpec, JobState, Resources};
use drover_proto::v1;

struct Fixture {
    service: Arc<Service>,
    clock: ManualClock,
    join: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::dev(dir.path());
    let join = config.join_tokens[0].token.clone();
    let clock = ManualClock::new(1_700_000_000_000);
    let service = Service::new(
        Arc::new(SqliteStore::in_memory().unwrap()),
        Arc::new(LocalBlobStore::new(dir.path().join("blobs"))),
        Arc::new(clock.clone()),
        config,
    );
    Fixture {
        service,
        clock,
        join,
        _dir: dir,
    }
}

fn free() -> Resources {
    Resources {
        cpu_millis: 4000,
        memory_mib: 4096,
        gpus: 0,
        disk_gib: 0,
        gpu_model: None,
    }
}

async fn agent(f: &Fixture, name: &str) -> SessionAuth {
    let resp = f
        .service
        .register(v1::RegisterRequest {
            join_token: f.join.clone(),
            agent: Some(v1::AgentInfo {
                agent_id: name.into(),
                pool: "default".into(),
                capacity: Some(v1::Resources {
                    cpu_millis: 4000,
                    memory_mib: 4096,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    f.service
        .authenticate(&resp.session_id, Some(&resp.session_token))
        .await
        .unwrap()
}

#[tokio::test]
async fn reaper_requeues_the_jobs_of_an_expired_session() {
    let f = fixture();
    let dead = agent(&f, "dead").await;
    let alive = agent(&f, "alive").await;
    let id = f
        .service
        .submit(vec![JobSpec::command(["true"])])
        .await
        .unwrap()
        .jobs[0]
        .id
        .clone();
    let leases = f.service.claim(&dead, free(), 1, 0).await.unwrap();
    assert_eq!(leases.len(), 1);
    // Only "alive" keeps heartbeating while time passes beyond the TTL + skew.
    for _ in 0..7 {
        f.clock.advance_ms(10_000);
        f.service.heartbeat(&alive, vec![], false).await.unwrap();
    }
    let report = f.service.reap().await.unwrap();
    assert_eq!((report.sessions_expired, report.requeued), (1, 1));
    let job = f.service.get_job(&id).await.unwrap();
    assert_eq!((job.state, job.infra_retries), (JobState::Queued, 1));
    // The dead session's token no longer works; the job goes to the live agent.
    assert!(f.service.heartbeat(&dead, vec![], false).await.is_err());
    let leases = f.service.claim(&alive, free(), 1, 0).await.unwrap();
    assert_eq!(leases[0].lease.attempt, 2);
}

#[tokio::test]
async fn circuit_breaker_holds_off_when_most_sessions_expire_at_once() {
    let f = fixture();
    for i in 0..5 {
        agent(&f, &format!("a{i}")).await;
    }
    // Nobody heartbeats (a coordinator-side outage looks like this).
    f.clock.advance_ms(120_000);
    let first = f.service.reap().await.unwrap();
    assert!(first.breaker_tripped);
    assert_eq!(first.sessions_expired, 0);
    // It holds for at most one TTL: a fleet that really died is reaped.
    f.clock.advance_ms(30_000);
    assert!(f.service.reap().await.unwrap().breaker_tripped);
    f.clock.advance_ms(30_001);
    let later = f.service.reap().await.unwrap();
    assert!(!later.breaker_tripped);
    assert_eq!(later.sessions_expired, 5);
}

#[tokio::test]
async fn a_waiting_claim_is_woken_by_a_submit() {
    let f = fixture();
    let session = agent(&f, "waiter").await;
    let service = f.service.clone();
    let waiter = tokio::spawn(async move { service.claim(&session, free(), 1, 20_000).await });
    // Let the claim reach its wait before submitting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    f.service
        .submit(vec![JobSpec::command(["true"])])
        .await
        .unwrap();
    let leases = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the claim returned well before its 20 s wait")
        .unwrap()
        .unwrap();
    assert_eq!(leases.len(), 1);
}
