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
    fixture_on(Arc::new(SqliteStore::in_memory().unwrap()))
}

/// A coordinator on `store` (which another may share).
fn fixture_on(store: Arc<SqliteStore>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::dev(dir.path());
    let join = config.join_tokens[0].token.clone();
    let clock = ManualClock::new(1_700_000_000_000);
    let service = Service::new(
        store,
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

/// A claim that waits for `free`, started and given time to reach its wait.
async fn waiting_claim(
    service: &Arc<Service>,
    session: SessionAuth,
    free: Resources,
) -> tokio::task::JoinHandle<Vec<String>> {
    let service = service.clone();
    let waiter = tokio::spawn(async move {
        let leases = service.claim(&session, free, 1, 60_000).await.unwrap();
        leases.into_iter().map(|c| c.lease.job_id).collect()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    waiter
}

#[tokio::test]
async fn the_poller_hands_a_job_from_another_coordinator_to_a_waiting_claim_that_fits_it() {
    // Two coordinators on one store.
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let (here, there) = (fixture_on(store.clone()), fixture_on(store));
    // The claim that has waited longest cannot take the job; the next can.
    let small = Resources {
        cpu_millis: 500,
        ..free()
    };
    let small = waiting_claim(&here.service, agent(&here, "small").await, small).await;
    let big = waiting_claim(&here.service, agent(&here, "big").await, free()).await;
    let mut job = JobSpec::command(["true"]);
    job.resources.cpu_millis = 2_000;
    let id = there
        .service
        .submit(vec![job])
        .await
        .unwrap()
        .jobs
        .remove(0)
        .id;

    // One tick of this coordinator's poller.
    here.service.poll_tick().await;
    let leased = tokio::time::timeout(Duration::from_secs(10), big)
        .await
        .expect("the claim that fits was woken by one tick")
        .unwrap();
    assert_eq!(leased, [id]);
    assert!(
        !small.is_finished(),
        "the claim that cannot take it waits on"
    );
    small.abort();
}

/// `?expires=…&signature=…` of a signed URL.
fn signed_parts(url: &str) -> (String, i64, String) {
    let (path, query) = url.split_once('?').unwrap();
    let object = path.split("/v1/blobs/").nth(1).unwrap().to_string();
    let mut expires = 0;
    let mut signature = String::new();
    for pair in query.split('&') {
        match pair.split_once('=').unwrap() {
            ("expires", v) => expires = v.parse().unwrap(),
            ("signature", v) => signature = v.to_string(),
            _ => {}
        }
    }
    (object, expires, signature)
}

#[tokio::test]
async fn artifact_urls_are_fenced_to_the_lease_and_expire() {
    use drover_coordinator::blob::Access;
    let f = fixture();
    f.service
        .set_public_url("http://coordinator.test:7080".into());
    let a = agent(&f, "a").await;
    let mut spec = JobSpec::command(["true"]);
    spec.outputs = true;
    let id = f.service.submit(vec![spec]).await.unwrap().jobs[0]
        .id
        .clone();
    let lease = f.service.claim(&a, free(), 1, 0).await.unwrap()[0]
        .lease
        .clone();

    let upload = f.service.artifact_upload_url(&lease).await.unwrap();
    assert!(
        upload.url.starts_with(&format!(
            "http://coordinator.test:7080/v1/blobs/artifacts/{id}/1.tar.zst?"
        )),
        "{}",
        upload.url
    );
    let (object, expires, signature) = signed_parts(&upload.url);
    assert_eq!(expires, upload.expires_at_ms);
    let key = f
        .service
        .check_blob_url(&object, Access::Put, expires, &signature)
        .unwrap();
    assert!(
        f.service
            .check_blob_url(&object, Access::Get, expires, &signature)
            .is_err(),
        "an upload URL does not download"
    );
    let body: drover_coordinator::blob::ByteStream = Box::pin(futures::stream::iter(vec![Ok(
        bytes::Bytes::from_static(b"archive"),
    )]));
    assert_eq!(f.service.put_blob(&key, body).await.unwrap(), 7);

    // Past its expiry the URL is refused.
    f.clock.advance_ms(3_600_001);
    let err = f
        .service
        .check_blob_url(&object, Access::Put, expires, &signature)
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // A lease that is no longer current gets no upload URL (fencing).
    let stale = drover_coordinator::store::LeaseRef {
        attempt: lease.attempt + 1,
        ..lease.clone()
    };
    assert!(f.service.artifact_upload_url(&stale).await.is_err());

    // Downloads name the job's latest attempt and its size.
    let artifact = f.service.artifact(&id).await.unwrap();
    assert_eq!((artifact.attempt, artifact.bytes), (1, 7));
}

#[tokio::test]
async fn inputs_must_name_existing_jobs_that_declare_outputs() {
    use drover_proto::model::InputSpec;
    let f = fixture();
    let plain = f
        .service
        .submit(vec![JobSpec::command(["true"])])
        .await
        .unwrap()
        .jobs[0]
        .id
        .clone();
    let consumer = |job: &str| {
        let mut spec = JobSpec::command(["true"]);
        spec.inputs = vec![InputSpec {
            name: "a".into(),
            job: job.into(),
        }];
        spec
    };
    let before = f
        .service
        .list_jobs(&Default::default(), None, None)
        .await
        .unwrap()
        .items
        .len();

    let err = f
        .service
        .submit(vec![consumer("01NOSUCHJOB")])
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("inputs[0].job"));
    assert!(err.to_string().contains("not found"), "{err}");

    let err = f.service.submit(vec![consumer(&plain)]).await.unwrap_err();
    assert_eq!(err.field(), Some("inputs[0].job"));
    assert!(
        err.to_string().contains("does not declare outputs"),
        "{err}"
    );

    // In a batch the error names the job's index, and nothing is written.
    let err = f
        .service
        .submit(vec![JobSpec::command(["true"]), consumer(&plain)])
        .await
        .unwrap_err();
    assert_eq!(err.field(), Some("jobs[1].inputs[0].job"));
    let after = f
        .service
        .list_jobs(&Default::default(), None, None)
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(before, after, "a rejected submit writes nothing");

    let mut twice = consumer(&plain);
    twice.inputs.push(twice.inputs[0].clone());
    let err = f.service.submit(vec![twice]).await.unwrap_err();
    assert_eq!(err.field(), Some("inputs[1].name"));
}
