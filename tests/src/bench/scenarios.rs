//! The scenarios of issue #7 that run on the embedded store and the process
//! runtime. Each returns a [`Report`]; none asserts anything about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_agent::{Agent, AgentConfig};
use drover_coordinator::blob::LocalBlobStore;
use drover_coordinator::clock::{Clock, SystemClock};
use drover_coordinator::store::{
    ClaimOffer, Completion, NewJob, NewSession, OutcomeKind, SqliteStore, Store,
};
use drover_coordinator::{Config, Server, Service};
use drover_proto::model::{JobSpec, JobState, Resources, SubmitRequest};
use serde_json::json;

use super::{fleet, fmt_ms, ms, percentiles, proc, Options, Report};
use crate::timed_store::TimedStore;
use crate::{wait_until, CoordinatorSettings, Sandbox};

pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "dispatch",
        "submit ack → process started / completion recorded, one job at a time",
    ),
    ("throughput", "10,000 no-op jobs through 4 agents × 8 slots"),
    (
        "store",
        "claims/s of each Store backend under 1, 4, 16 claimers",
    ),
    (
        "footprint",
        "agent RSS/CPU idle and busy; coordinator RSS with many queued jobs",
    ),
    (
        "fleet",
        "thousands of simulated agents heartbeating and long-polling",
    ),
    (
        "docker",
        "a `true` job through the agent's Docker runtime vs `docker run --rm`",
    ),
];

pub async fn run_one(name: &str, opts: &Options) -> anyhow::Result<Report> {
    match name {
        "dispatch" => dispatch(opts).await,
        "throughput" => throughput(opts).await,
        "store" => store(opts).await,
        "footprint" => footprint(opts).await,
        "fleet" => fleet::fleet(opts).await,
        "docker" => super::docker::docker(opts).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn noop() -> JobSpec {
    JobSpec::command(["true"])
}

/// Bench-friendly coordinator settings: production heartbeat cadence.
pub fn bench_settings() -> CoordinatorSettings {
    CoordinatorSettings {
        heartbeat_interval_ms: 5_000,
        session_ttl_ms: 30_000,
        clock_skew_ms: 1_000,
        reaper_interval_ms: 1_000,
    }
}

async fn dispatch(opts: &Options) -> anyhow::Result<Report> {
    let (jobs, warmup, agents) = if opts.smoke {
        (40, 5, 2)
    } else {
        (2_000, 50, 4)
    };
    let dir = tempfile::tempdir()?;
    let config = Config::dev(dir.path().join("coordinator"));
    let store = Arc::new(TimedStore::new(SqliteStore::open(
        &dir.path().join("coordinator/drover.db"),
    )?));
    let service = Service::new(
        store.clone(),
        Arc::new(LocalBlobStore::new(dir.path().join("coordinator/blobs"))),
        Arc::new(SystemClock),
        config.clone(),
    );
    let server = Server::start_with(service.clone()).await?;
    let mut running = Vec::new();
    for i in 0..agents {
        running.push(
            Agent::start(AgentConfig {
                coordinator: format!("http://{}", server.grpc_addr()),
                join_token: config.join_tokens[0].token.clone(),
                agent_id: format!("bench-{i}"),
                data_dir: dir.path().join(format!("agent-{i}")),
                health_addr: "127.0.0.1:0".parse()?,
                max_jobs: 8,
                cpu_millis: Some(8_000),
                memory_mib: Some(8_192),
                runtime: drover_agent::config::RuntimeChoice::Process,
                ..AgentConfig::default()
            })
            .await?,
        );
    }
    let client = drover_cli::Client::new(
        &format!("http://{}", server.http_addr()),
        Some(config.api_tokens[0].token.clone()),
    )?;
    let (mut ack, mut started, mut completed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + jobs {
        let t0 = Instant::now();
        let id = client.submit_one(noop()).await?;
        let t_ack = Instant::now();
        let times = loop {
            let notified = store.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let times = store.times(&id);
            if times.completed.is_some() {
                break times;
            }
            tokio::time::timeout(Duration::from_secs(30), notified)
                .await
                .with_context(|| format!("job {id} did not complete within 30 s"))?;
        };
        if times.started.is_none() {
            let job = client.get_job(&id).await?;
            anyhow::bail!(
                "job {id} completed without being started: {:?} {:?}",
                job.state,
                job.reason
            );
        }
        if i >= warmup {
            ack.push(ms(t_ack - t0));
            started.push(ms(times.started.context("started")? - t_ack));
            completed.push(ms(times.completed.context("completed")? - t_ack));
        }
    }
    for agent in running {
        agent.drain("bench done");
        agent.wait().await?;
    }
    server.shutdown().await?;
    let mut report = Report::new(
        "dispatch",
        vec![
            ("store", "sqlite".into()),
            ("runtime", "process".into()),
            ("agents", agents.to_string()),
            ("slots", "8".into()),
            ("jobs", jobs.to_string()),
            ("job", "true".into()),
            ("coordinator+agents", "one process".into()),
        ],
        &["measure", "p50", "p90", "p99", "max"],
    );
    let mut figures = serde_json::Map::new();
    for (label, sample) in [
        ("submit → ack", ack),
        ("ack → process started", started),
        ("ack → completion recorded", completed),
    ] {
        let p = percentiles(sample);
        report.row(
            std::iter::once(label.to_string())
                .chain(p.iter().map(|v| fmt_ms(*v)))
                .collect(),
        );
        figures.insert(
            label.into(),
            json!({"p50_ms": p[0], "p90_ms": p[1], "p99_ms": p[2], "max_ms": p[3]}),
        );
    }
    report.figures = figures.into();
    Ok(report)
}

async fn throughput(opts: &Options) -> anyhow::Result<Report> {
    let (jobs, batch) = if opts.smoke {
        (400, 100)
    } else {
        (10_000, 500)
    };
    let mut sandbox = Sandbox::start(0, bench_settings()).await;
    for _ in 0..4 {
        sandbox
            .add_agent(&[
                ("DROVER_MAX_JOBS", "8"),
                ("DROVER_CPU_MILLIS", "8000"),
                ("DROVER_MEMORY_MIB", "8192"),
                ("DROVER_CLAIM_WAIT_MS", "20000"),
            ])
            .await;
    }
    let coordinator_pid = sandbox.coordinator.pid();
    let agent_pids: Vec<u32> = sandbox.agents.iter().map(|a| a.pid() as u32).collect();
    let agents_cpu = |pids: &[u32]| pids.iter().filter_map(|p| proc::cpu_secs(*p)).sum::<f64>();
    let coord_cpu0 = proc::cpu_secs(coordinator_pid).unwrap_or_default();
    let agents_cpu0 = agents_cpu(&agent_pids);
    let t0 = Instant::now();
    let t0_ms = SystemClock.now_ms();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(batch) {
        sandbox
            .client
            .submit(&SubmitRequest::Batch {
                jobs: chunk.iter().map(|_| noop()).collect(),
            })
            .await?;
    }
    let submitted = t0.elapsed();
    // Poll gently: `/v1/pools` aggregates over active jobs, and polling it
    // fast would add to the coordinator CPU this scenario measures.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pools = sandbox.client.list_pools().await?;
        let done = pools
            .pools
            .iter()
            .find(|p| p.pool == "default")
            .is_some_and(|p| p.queued == 0 && p.running == 0);
        if done {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "jobs did not finish within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let polled = t0.elapsed();
    let coord_cpu = proc::cpu_secs(coordinator_pid).unwrap_or_default() - coord_cpu0;
    let agent_cpu = agents_cpu(&agent_pids) - agents_cpu0;
    let finished = sandbox
        .client
        .list_all_jobs(&drover_cli::JobQuery {
            state: Some(JobState::Succeeded),
            ..Default::default()
        })
        .await?;
    let succeeded = finished.len();
    // Up to the last completion as the coordinator recorded it (same host
    // clock), not the poll that noticed it 0–500 ms later.
    let elapsed = finished
        .iter()
        .filter_map(|j| j.finished_at_ms)
        .max()
        .map_or(polled, |last| {
            Duration::from_millis((last - t0_ms).max(1) as u64).min(polled)
        });
    let rate = jobs as f64 / elapsed.as_secs_f64();
    let mut report = Report::new(
        "throughput",
        vec![
            ("store", "sqlite".into()),
            ("runtime", "process".into()),
            ("agents", "4 processes".into()),
            ("slots", "8 per agent".into()),
            ("jobs", jobs.to_string()),
            ("batch", batch.to_string()),
            ("job", "true".into()),
        ],
        &["measure", "value"],
    );
    report.row(vec!["end-to-end jobs/s".into(), format!("{rate:.0}")]);
    report.row(vec![
        "wall time".into(),
        format!("{:.2} s", elapsed.as_secs_f64()),
    ]);
    report.row(vec![
        "submit time (all batches)".into(),
        format!("{:.2} s", submitted.as_secs_f64()),
    ]);
    report.row(vec![
        "coordinator CPU s / 1,000 jobs".into(),
        format!("{:.3}", coord_cpu / jobs as f64 * 1000.0),
    ]);
    report.row(vec![
        "agents' CPU s / 1,000 jobs".into(),
        format!("{:.3}", agent_cpu / jobs as f64 * 1000.0),
    ]);
    report.row(vec!["succeeded".into(), format!("{succeeded} / {jobs}")]);
    report.figures = json!({
        "jobs_per_s": rate, "wall_s": elapsed.as_secs_f64(), "submit_s": submitted.as_secs_f64(),
        "coordinator_cpu_s_per_1000": coord_cpu / jobs as f64 * 1000.0,
        "agents_cpu_s_per_1000": agent_cpu / jobs as f64 * 1000.0, "succeeded": succeeded,
    });
    Ok(report)
}

async fn store(opts: &Options) -> anyhow::Result<Report> {
    let (jobs, dynamo_jobs) = if opts.smoke { (200, 20) } else { (3_000, 200) };
    let mut report = Report::new(
        "store",
        vec![
            ("sqlite", format!("file, WAL; {jobs} jobs per round")),
            (
                "dynamodb",
                format!("moto's server on loopback; {dynamo_jobs} jobs per round; requests counted, not timed"),
            ),
            ("per job", "claim + complete (after a batch submit)".into()),
        ],
        &["backend", "claimers", "claims/s", "requests/job", "writes/job"],
    );
    let mut figures = serde_json::Map::new();
    for claimers in [1usize, 4, 16] {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SqliteStore::open(&dir.path().join("drover.db"))?);
        let (total, elapsed) = claim_round(store, jobs, claimers).await?;
        let rate = total as f64 / elapsed.as_secs_f64();
        report.row(vec![
            "sqlite".into(),
            claimers.to_string(),
            format!("{rate:.0}"),
            "–".into(),
            "–".into(),
        ]);
        figures.insert(
            format!("sqlite_{claimers}"),
            json!({ "claims_per_s": rate, "claimed": total }),
        );
    }
    // DynamoDB on moto: moto's speed says nothing about DynamoDB's, so what
    // is reported is what the store asks of DynamoDB per job.
    // Static test credentials for the AWS chain: this process only ever
    // talks to the emulator, never hands it real ones.
    for (key, value) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_SESSION_TOKEN", ""),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        if value.is_empty() {
            std::env::remove_var(key);
        } else {
            std::env::set_var(key, value);
        }
    }
    let moto = crate::aws::Moto::start().await?;
    for claimers in [1usize, 4] {
        let config = drover_coordinator::config::DynamoDbConfig {
            table: format!("bench-{claimers}-{}", ulid_like().to_lowercase()),
            endpoint: Some(moto.endpoint.clone()),
            region: Some(crate::aws::REGION.into()),
            create_table: true,
            ..Default::default()
        };
        let store = Arc::new(
            drover_coordinator::store::DynamoStore::connect(&config)
                .await
                .context("connecting to DynamoDB on moto")?,
        );
        let before = moto.calls().await?.len();
        let (total, _) = claim_round(store, dynamo_jobs, claimers).await?;
        let calls = moto.calls().await?;
        let mut by_action: std::collections::BTreeMap<String, usize> = Default::default();
        for call in calls[before..].iter().filter(|c| c.service == "dynamodb") {
            *by_action.entry(call.action.clone()).or_default() += 1;
        }
        let requests: usize = by_action.values().sum();
        let writes: usize = by_action
            .iter()
            .filter(|(a, _)| {
                matches!(
                    a.as_str(),
                    "PutItem"
                        | "UpdateItem"
                        | "DeleteItem"
                        | "TransactWriteItems"
                        | "BatchWriteItem"
                )
            })
            .map(|(_, n)| n)
            .sum();
        let per_job = |n: usize| n as f64 / total.max(1) as f64;
        report.row(vec![
            "dynamodb".into(),
            claimers.to_string(),
            "–".into(),
            format!("{:.1}", per_job(requests)),
            format!("{:.1}", per_job(writes)),
        ]);
        figures.insert(
            format!("dynamodb_{claimers}"),
            json!({
                "jobs": total,
                "requests_per_job": per_job(requests),
                "writes_per_job": per_job(writes),
                "requests_by_action": by_action,
            }),
        );
    }
    report.figures = figures.into();
    Ok(report)
}

/// Submits `jobs` no-op jobs in batches, then `claimers` sessions claim and
/// complete them one at a time until none is left. Returns the jobs claimed
/// and the time the claiming took (the submit excluded).
async fn claim_round<S: Store + 'static>(
    store: Arc<S>,
    jobs: usize,
    claimers: usize,
) -> anyhow::Result<(usize, Duration)> {
    let now = || SystemClock.now_ms();
    let specs: Vec<NewJob> = (0..jobs)
        .map(|_| NewJob {
            id: ulid_like(),
            spec: noop(),
            workflow: None,
        })
        .collect();
    for chunk in specs.chunks(500) {
        store.submit(chunk.to_vec(), now()).await?;
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let session = format!("bench-{c}-{}", ulid_like());
            store
                .create_session(
                    &NewSession {
                        session_id: session.clone(),
                        token_hash: String::new(),
                        agent_id: session.clone(),
                        pool: "default".into(),
                        hostname: String::new(),
                        labels: Default::default(),
                        capacity: Resources {
                            cpu_millis: 8_000,
                            memory_mib: 8_192,
                            ..Resources::default()
                        },
                        runtime: "bench".into(),
                        version: String::new(),
                        health_addr: String::new(),
                        ttl_ms: 600_000,
                    },
                    now(),
                )
                .await?;
            let offer = ClaimOffer {
                session_id: session.clone(),
                agent_id: session,
                pool: "default".into(),
                labels: Default::default(),
                free: Resources {
                    cpu_millis: 8_000,
                    memory_mib: 8_192,
                    ..Resources::default()
                },
                max_jobs: 1,
            };
            let mut claimed = 0usize;
            loop {
                let leases = store.claim(&offer, 64, now()).await?;
                let Some(lease) = leases.into_iter().next() else {
                    return anyhow::Ok(claimed);
                };
                store
                    .complete(
                        &lease.lease,
                        &Completion {
                            outcome: OutcomeKind::Succeeded,
                            exit_code: Some(0),
                            reason: String::new(),
                        },
                        now(),
                    )
                    .await?;
                claimed += 1;
            }
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok((total, t0.elapsed()))
}

fn ulid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("01BENCH{:019}", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn footprint(opts: &Options) -> anyhow::Result<Report> {
    let (idle_s, busy_s, queued) = if opts.smoke {
        (2, 1, 2_000)
    } else {
        (60, 10, 100_000)
    };
    let mut report = Report::new(
        "footprint",
        vec![
            ("runtime", "process".into()),
            ("heartbeat", "5 s".into()),
            ("claim long-poll", "20 s".into()),
            ("idle window", format!("{idle_s} s")),
            ("busy window", format!("{busy_s} s, 8 × sleep")),
            ("queued", queued.to_string()),
        ],
        &["measure", "value"],
    );
    // An idle agent.
    let mut sandbox = Sandbox::start(0, bench_settings()).await;
    sandbox
        .add_agent(&[
            ("DROVER_MAX_JOBS", "8"),
            ("DROVER_CPU_MILLIS", "8000"),
            ("DROVER_CLAIM_WAIT_MS", "20000"),
        ])
        .await;
    let pid = sandbox.agents[0].pid() as u32;
    // Let start-up settle before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, t0) = (proc::cpu_secs(pid).unwrap_or_default(), Instant::now());
    tokio::time::sleep(Duration::from_secs(idle_s)).await;
    let idle_cpu =
        (proc::cpu_secs(pid).unwrap_or_default() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let idle_rss = proc::rss_kib(pid).unwrap_or_default();
    // The same agent with 8 running jobs.
    let sleep_for = (busy_s + 5).to_string();
    sandbox
        .client
        .submit(&SubmitRequest::Batch {
            jobs: (0..8)
                .map(|_| JobSpec::command(["sleep", sleep_for.as_str()]))
                .collect(),
        })
        .await?;
    let client = &sandbox.client;
    wait_until("8 jobs running", Duration::from_secs(30), || async move {
        let pools = client.list_pools().await.ok()?;
        pools
            .pools
            .iter()
            .any(|p| p.pool == "default" && p.running == 8)
            .then_some(())
    })
    .await;
    let (cpu0, t0) = (proc::cpu_secs(pid).unwrap_or_default(), Instant::now());
    tokio::time::sleep(Duration::from_secs(busy_s)).await;
    let busy_cpu =
        (proc::cpu_secs(pid).unwrap_or_default() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let busy_rss = proc::rss_kib(pid).unwrap_or_default();
    drop(sandbox);
    // A coordinator holding many queued jobs.
    let sandbox = Sandbox::start(0, bench_settings()).await;
    let coordinator_pid = sandbox.coordinator.pid();
    let empty_rss = proc::rss_kib(coordinator_pid).unwrap_or_default();
    let t0 = Instant::now();
    for _ in 0..queued / 1000 {
        sandbox
            .client
            .submit(&SubmitRequest::Batch {
                jobs: (0..1000).map(|_| noop()).collect(),
            })
            .await?;
    }
    let submit_rate = queued as f64 / t0.elapsed().as_secs_f64();
    let queued_rss = proc::rss_kib(coordinator_pid).unwrap_or_default();
    report.row(vec![
        "agent RSS, idle".into(),
        format!("{:.1} MiB", idle_rss as f64 / 1024.0),
    ]);
    report.row(vec![
        "agent CPU, idle".into(),
        format!("{idle_cpu:.2} % of a core"),
    ]);
    report.row(vec![
        "agent RSS, 8 jobs running".into(),
        format!("{:.1} MiB", busy_rss as f64 / 1024.0),
    ]);
    report.row(vec![
        "agent CPU, 8 jobs running".into(),
        format!("{busy_cpu:.2} % of a core"),
    ]);
    report.row(vec![
        "coordinator RSS, empty".into(),
        format!("{:.1} MiB", empty_rss as f64 / 1024.0),
    ]);
    report.row(vec![
        format!("coordinator RSS, {queued} queued"),
        format!("{:.1} MiB", queued_rss as f64 / 1024.0),
    ]);
    report.row(vec![
        "batch submit rate".into(),
        format!("{submit_rate:.0} jobs/s"),
    ]);
    report.figures = json!({
        "agent_idle_rss_kib": idle_rss, "agent_idle_cpu_pct": idle_cpu,
        "agent_busy_rss_kib": busy_rss, "agent_busy_cpu_pct": busy_cpu,
        "coordinator_empty_rss_kib": empty_rss, "coordinator_queued_rss_kib": queued_rss,
        "queued": queued, "batch_submit_jobs_per_s": submit_rate,
    });
    Ok(report)
}
