//! Two coordinator processes on one DynamoDB table and one S3 bucket (moto),
//! four agents split between them, jobs submitted through both: every job
//! runs and SUCCEEDS exactly once, no job is leased twice at a time, every
//! job's events are complete, and logs are readable through either
//! coordinator.
//!
//! A second run of a job is allowed only as a new attempt after a requeue
//! (an agent that lost its session fences itself); an attempt never runs
//! twice, and attempts never overlap.
//!
//! `DROVER_TWO_COORDINATORS_JOBS` sets the number of jobs. The full run is
//! 2,000 (`DROVER_TWO_COORDINATORS_JOBS=2000`); CI runs the default, 200:
//! moto serves DynamoDB one request at a time, and on a shared 2-core
//! machine that is a few dozen requests per second (about 25 per job).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use drover_cli::client::{Client, JobQuery};
use drover_proto::model::{JobEvent, JobSpec, JobState, SubmitRequest};
use drover_tests::aws::{init_table, Moto};
use drover_tests::{CoordinatorProcess, CoordinatorSettings, Sandbox, ADMIN_TOKEN};

const BATCH: usize = 100;
/// Every this many jobs prints a line, read back through both coordinators.
const LOG_SAMPLE: usize = 50;

fn job_count() -> usize {
    std::env::var("DROVER_TWO_COORDINATORS_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn job(i: usize, runs: &std::path::Path) -> JobSpec {
    let mut script = format!("echo \"$DROVER_JOB_ID $DROVER_ATTEMPT\" >> {runs:?}");
    if i.is_multiple_of(LOG_SAMPLE) {
        script.push_str("; echo \"job $DROVER_JOB_ID\"");
    }
    let mut spec = JobSpec::command(["sh", "-c", &script]);
    spec.name = format!("two-{i}");
    spec
}

/// Submits `specs` in batches; returns the ids.
async fn submit_all(client: Client, specs: Vec<JobSpec>) -> Vec<String> {
    let mut ids = Vec::with_capacity(specs.len());
    for batch in specs.chunks(BATCH) {
        let resp = client
            .submit(&SubmitRequest::Batch {
                jobs: batch.to_vec(),
            })
            .await
            .expect("submit");
        ids.extend(resp.jobs.into_iter().map(|j| j.id));
    }
    ids
}

/// Checks one job's events: complete, one success, attempts never overlap.
fn check_events(id: &str, events: &[JobEvent]) -> Result<(), String> {
    let fail = |what: &str| Err(format!("job {id}: {what}: {events:#?}"));
    if events.first().map(|e| e.state) != Some(JobState::Queued) {
        return fail("the first event is not QUEUED");
    }
    if events.last().map(|e| e.state) != Some(JobState::Succeeded) {
        return fail("the last event is not SUCCEEDED");
    }
    if events
        .iter()
        .filter(|e| e.state == JobState::Succeeded)
        .count()
        != 1
    {
        return fail("not exactly one SUCCEEDED");
    }
    // Per attempt: LEASED, then RUNNING, then its end (a requeue or the
    // success); the next attempt is leased only after this one ended.
    let mut attempts: BTreeMap<u64, Vec<&JobEvent>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.attempt > 0) {
        attempts.entry(e.attempt).or_default().push(e);
    }
    let mut previous_end: Option<i64> = None;
    for (attempt, list) in &attempts {
        let states: Vec<JobState> = list.iter().map(|e| e.state).collect();
        if states.first() != Some(&JobState::Leased) {
            return fail(&format!("attempt {attempt} does not start LEASED"));
        }
        let leased_at = list[0].at_ms;
        if previous_end.is_some_and(|end| leased_at < end) {
            return fail(&format!(
                "attempt {attempt} leased before the previous one ended"
            ));
        }
        let last = list.last().expect("non-empty");
        if !(last.state.is_terminal() || last.state == JobState::Queued) {
            return fail(&format!("attempt {attempt} never ended"));
        }
        previous_end = Some(last.at_ms);
    }
    if attempts.is_empty()
        || !attempts
            .values()
            .flatten()
            .any(|e| e.state == JobState::Running)
    {
        return fail("no attempt ran");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_coordinators_on_one_table_run_every_job_exactly_once() {
    let jobs = job_count();
    let moto = Moto::start().await.expect("moto");
    let table = "drover-two";
    let bucket = "drover-two";
    moto.create_bucket(bucket).await.expect("CreateBucket");
    let env = moto.coordinator_env(table, bucket);
    init_table(&env).await;

    // Heartbeats survive a busy moto: a lost session would requeue jobs
    // (legitimately) and muddy the once-only count.
    let settings = CoordinatorSettings {
        heartbeat_interval_ms: 1_000,
        session_ttl_ms: 30_000,
        clock_skew_ms: 1_000,
        reaper_interval_ms: 1_000,
    };
    let mut sandbox = Sandbox::start_env(2, settings.clone(), env.clone()).await;
    let other = CoordinatorProcess::start_env(
        &sandbox.dir.path().join("coordinator-b"),
        &settings,
        None,
        &env,
    )
    .await
    .expect("second coordinator");
    let other_client = Client::new(
        &format!("http://{}", other.http_addr),
        Some(ADMIN_TOKEN.into()),
    )
    .unwrap();
    let to_other = vec![(
        "DROVER_COORDINATOR".to_string(),
        format!("http://{}", other.grpc_addr),
    )];
    sandbox.add_agent_env(&to_other).await;
    sandbox.add_agent_env(&to_other).await;
    assert_eq!(sandbox.client.list_agents().await.unwrap().agents.len(), 4);

    let runs = sandbox.dir.path().join("runs.txt");
    let specs: Vec<JobSpec> = (0..jobs).map(|i| job(i, &runs)).collect();
    let (first, second) = specs.split_at(jobs / 2);
    let started = Instant::now();
    let (a, b) = tokio::join!(
        tokio::spawn(submit_all(sandbox.client.clone(), first.to_vec())),
        tokio::spawn(submit_all(other_client.clone(), second.to_vec())),
    );
    let ids: Vec<String> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    let submitted = started.elapsed();
    assert_eq!(ids.len(), jobs);

    // Waits job by job (one cheap read each; moto serves DynamoDB requests
    // one at a time, so the wait must not crowd the coordinators out).
    let mut pending = ids.iter();
    let mut next = pending.next();
    let deadline = Instant::now() + Duration::from_secs(900);
    while let Some(id) = next {
        let job = sandbox.client.get_job(id).await.expect("get job");
        if job.state.is_terminal() {
            next = pending.next();
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {:?} after 900 s",
            job.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let finished = started.elapsed();
    let client = &sandbox.client;
    let listed = client
        .list_all_jobs(&JobQuery::default())
        .await
        .expect("listing jobs");
    let by_id: HashMap<&str, _> = listed.iter().map(|j| (j.id.as_str(), j)).collect();
    let mut not_succeeded = Vec::new();
    for id in &ids {
        match by_id.get(id.as_str()) {
            Some(j) if j.state == JobState::Succeeded => {}
            other => not_succeeded.push(format!("{id}: {:?}", other.map(|j| j.state))),
        }
    }
    assert!(not_succeeded.is_empty(), "not SUCCEEDED: {not_succeeded:?}");

    // Who ran what: one line per execution in the shared runs file.
    let text = std::fs::read_to_string(&runs).expect("runs file");
    let mut runs_per_job: HashMap<String, Vec<u64>> = HashMap::new();
    for line in text.lines() {
        let (id, attempt) = line.split_once(' ').expect("`<job> <attempt>`");
        runs_per_job
            .entry(id.to_string())
            .or_default()
            .push(attempt.parse().expect("attempt"));
    }
    assert_eq!(runs_per_job.len(), jobs, "every job ran");
    // Events of every job, read through both coordinators in turn.
    let clients = [sandbox.client.clone(), other_client.clone()];
    let mut checks = tokio::task::JoinSet::new();
    for (n, part) in ids.chunks(jobs.div_ceil(8).max(1)).enumerate() {
        let client = clients[n % 2].clone();
        let part: Vec<(String, Vec<u64>)> = part
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    runs_per_job.get(id).cloned().unwrap_or_default(),
                )
            })
            .collect();
        checks.spawn(async move {
            let mut problems = Vec::new();
            let mut attempts = 0;
            for (id, mut ran) in part {
                let events = client.job_events(&id).await.expect("events").events;
                attempts += events
                    .iter()
                    .filter(|e| e.state == JobState::Leased)
                    .count();
                if let Err(p) = check_events(&id, &events) {
                    problems.push(p);
                }
                // An attempt runs once; a second run only after a requeue
                // (the agent lost its session and fenced itself).
                let mut started: Vec<u64> = events
                    .iter()
                    .filter(|e| e.state == JobState::Running)
                    .map(|e| e.attempt)
                    .collect();
                ran.sort_unstable();
                started.sort_unstable();
                if ran.windows(2).any(|w| w[0] == w[1]) || ran.iter().any(|a| !started.contains(a))
                {
                    problems.push(format!(
                        "job {id}: ran as attempts {ran:?}, started {started:?}"
                    ));
                }
            }
            (problems, attempts)
        });
    }
    let mut problems = Vec::new();
    let mut leases = 0;
    while let Some(joined) = checks.join_next().await {
        let (p, n) = joined.unwrap();
        problems.extend(p);
        leases += n;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Where moto's time went: requests and serving time per operation.
    let calls = moto.calls().await.unwrap();
    let mut per_operation: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for c in &calls {
        let name = match &c.index {
            Some(index) => format!("{} {} {index}", c.service, c.action),
            None => format!("{} {}", c.service, c.action),
        };
        let entry = per_operation.entry(name).or_default();
        entry.0 += 1;
        entry.1 += c.ms.unwrap_or(0.0);
    }
    eprintln!("moto requests (count, serving ms) per operation, {jobs} jobs:");
    for (name, (count, ms)) in &per_operation {
        eprintln!("  {name:<40} {count:>7} {ms:>10.0}");
    }
    // Sampled logs: the same bytes through either coordinator.
    for (i, id) in ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i.is_multiple_of(LOG_SAMPLE))
    {
        for c in &clients {
            let log = c.read_logs(id, None).await.expect("logs");
            assert_eq!(
                String::from_utf8_lossy(&log),
                format!("job {id}\n"),
                "job {i}"
            );
        }
    }
    println!(
        "two coordinators: {jobs} jobs submitted in {:.1}s, all SUCCEEDED after {:.1}s \
         ({:.1} jobs/s on moto), {leases} leases, checks took {:.1}s",
        submitted.as_secs_f64(),
        finished.as_secs_f64(),
        jobs as f64 / finished.as_secs_f64(),
        (started.elapsed() - finished).as_secs_f64(),
    );
}

#[test]
fn overlapping_attempts_are_caught() {
    let ev = |attempt, state, at_ms| JobEvent {
        seq: 0,
        at_ms,
        attempt,
        state,
        agent_id: None,
        reason: String::new(),
        usd_per_hour: None,
    };
    let good = [
        ev(0, JobState::Queued, 0),
        ev(1, JobState::Leased, 10),
        ev(1, JobState::Running, 20),
        ev(1, JobState::Queued, 30),
        ev(2, JobState::Leased, 40),
        ev(2, JobState::Running, 50),
        ev(2, JobState::Succeeded, 60),
    ];
    check_events("J", &good).unwrap();
    let mut overlapping = good.clone();
    overlapping[4].at_ms = 25;
    assert!(check_events("J", &overlapping).is_err());
    let mut twice = good.to_vec();
    twice.push(ev(2, JobState::Succeeded, 70));
    assert!(check_events("J", &twice).is_err());
    assert!(check_events("J", &good[..6]).is_err(), "incomplete");
}
