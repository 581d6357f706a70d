//! A coordinator on DynamoDB and S3 (moto) killed with SIGKILL while a job's
//! output sits in its memory, unwritten: the agent resends what was not
//! durable to the coordinator restarted on the same address, the job
//! SUCCEEDS on its first attempt, and its log holds every byte once, in
//! order, through any coordinator.

use std::time::Duration;

use drover_cli::client::Client;
use drover_proto::model::{JobSpec, JobState};
use drover_tests::aws::{init_table, Moto};
use drover_tests::{wait_until, CoordinatorProcess, CoordinatorSettings, Sandbox, ADMIN_TOKEN};

const LINES: usize = 80;

/// Line `i` of the job's output (what its `printf` writes).
fn line(i: usize) -> String {
    format!("line {i:04} {}\n", "x".repeat(500))
}

/// Prints the lines one every 100 ms: 8 s of output.
fn job() -> JobSpec {
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do printf 'line %04d %s\\n' $i {pad}; i=$((i+1)); sleep 0.1; done",
        pad = "x".repeat(500)
    );
    let mut spec = JobSpec::command(["sh", "-c", &script]);
    spec.name = "crash".into();
    spec
}

async fn log_resends(http_addr: &str) -> u64 {
    let text = reqwest::get(format!("http://{http_addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("drover_log_resends_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("drover_log_resends_total in /metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_killed_mid_job_loses_no_output_and_kills_no_job() {
    let moto = Moto::start().await.expect("moto");
    let (table, bucket) = ("drover-crash", "drover-crash");
    moto.create_bucket(bucket).await.expect("CreateBucket");
    let mut env = moto.coordinator_env(table, bucket);
    init_table(&env).await;
    // Output stays in the coordinator's memory: no segment is written by
    // age or size while the job runs, only on the agent's final flush.
    env.push(("DROVER_S3_LOG_FLUSH_MS".into(), "60000".into()));
    env.push(("DROVER_S3_LOG_SEGMENT_BYTES".into(), (64 << 20).to_string()));
    // A session outlives the restart many times over: the agent must keep
    // its job because the lease holds, not because the restart was quick.
    let settings = CoordinatorSettings {
        heartbeat_interval_ms: 500,
        session_ttl_ms: 30_000,
        clock_skew_ms: 1_000,
        reaper_interval_ms: 500,
    };
    let mut sandbox = Sandbox::start_env(1, settings.clone(), env.clone()).await;
    let id = sandbox.client.submit_one(job()).await.expect("submit");

    // A quarter of the output is in: the job runs, nothing is in S3.
    let quarter = (0..LINES / 4).map(line).collect::<String>().len();
    let client = sandbox.client.clone();
    let seen = wait_until("a quarter of the output", Duration::from_secs(60), || {
        let (client, id) = (client.clone(), id.clone());
        async move {
            let log = client.read_logs(&id, None).await.ok()?;
            (log.len() >= quarter).then_some(log.len())
        }
    })
    .await;
    assert_eq!(sandbox.job(&id).await.state, JobState::Running);
    let keys = moto.s3_keys(bucket, "").await.expect("listing the bucket");
    assert!(
        !keys.iter().any(|k| k.contains("logs/")),
        "the output must still be unflushed when the coordinator dies: {keys:?}"
    );
    assert!(seen < LINES * line(0).len(), "the job is mid-way");

    // SIGKILL, and a new process on the same addresses.
    sandbox.restart_coordinator().await;

    let job = sandbox
        .wait_job(&id, "finished", Duration::from_secs(120), |j| {
            j.state.is_terminal()
        })
        .await;
    assert_eq!(
        (job.state, job.attempt, job.failures, job.infra_retries),
        (JobState::Succeeded, 1, 0, 0),
        "the job succeeds on its first attempt: {job:#?}"
    );
    let events = sandbox.client.job_events(&id).await.expect("events").events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.state == JobState::Leased)
            .count(),
        1,
        "leased once: {events:#?}"
    );
    assert!(
        log_resends(&sandbox.coordinator.http_addr).await >= 1,
        "the restarted coordinator asked the agent to resend"
    );

    // Every byte once, in order, through the restarted coordinator and
    // through one that never saw the job.
    let expected: String = (0..LINES).map(line).collect();
    let other = CoordinatorProcess::start_env(
        &sandbox.dir.path().join("coordinator-b"),
        &settings,
        None,
        &env,
    )
    .await
    .expect("another coordinator");
    let other_client = Client::new(
        &format!("http://{}", other.http_addr),
        Some(ADMIN_TOKEN.into()),
    )
    .unwrap();
    for client in [&sandbox.client, &other_client] {
        let log = client.read_logs(&id, None).await.expect("logs");
        assert!(
            log == expected.as_bytes(),
            "the log differs from the output ({} bytes read, {} written); first difference at byte {:?}",
            log.len(),
            expected.len(),
            log.iter().zip(expected.as_bytes()).position(|(a, b)| a != b)
        );
    }
}
