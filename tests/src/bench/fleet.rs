//! Fleet simulation: thousands of light gRPC "agents" in this process, each
//! with its own session, heartbeating and long-polling one real coordinator
//! process while jobs flow through them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_proto::model::{JobSpec, SubmitRequest};
use drover_proto::v1::{self, agent_service_client::AgentServiceClient};
use serde_json::json;
use tonic::transport::Channel;

use super::scenarios::bench_settings;
use super::{fmt_ms, ms, percentiles, proc, Options, Report};
use crate::{CoordinatorSettings, Sandbox, JOIN_TOKEN};

fn authed<T>(token: &str, body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    if let Ok(value) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

#[derive(Default)]
struct Samples {
    heartbeat_ms: Vec<f64>,
    claimed_at: HashMap<String, Instant>,
    errors: u64,
}

pub async fn fleet(opts: &Options) -> anyhow::Result<Report> {
    let (agents, jobs, window_s, channels) = if opts.smoke {
        (50, 100, 5u64, 5)
    } else {
        (5_000, 5_000, 60u64, 50)
    };
    let heartbeat_ms = 5_000u64;
    let sandbox = Sandbox::start(
        0,
        CoordinatorSettings {
            heartbeat_interval_ms: heartbeat_ms,
            ..bench_settings()
        },
    )
    .await;
    let coordinator_pid = sandbox.coordinator.pid();
    let url = format!("http://{}", sandbox.coordinator.grpc_addr);
    let mut pool = Vec::new();
    for _ in 0..channels {
        pool.push(Channel::from_shared(url.clone())?.connect().await?);
    }
    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = Stop::default();
    // Register every simulated agent, 64 at a time.
    let mut sessions = Vec::with_capacity(agents);
    for chunk in (0..agents).collect::<Vec<_>>().chunks(64) {
        let mut pending = Vec::new();
        for &i in chunk {
            let mut client = AgentServiceClient::new(pool[i % channels].clone());
            pending.push(tokio::spawn(async move {
                client
                    .register(v1::RegisterRequest {
                        join_token: JOIN_TOKEN.into(),
                        agent: Some(v1::AgentInfo {
                            agent_id: format!("sim-{i}"),
                            pool: "default".into(),
                            capacity: Some(v1::Resources {
                                cpu_millis: 1000,
                                memory_mib: 1024,
                                ..Default::default()
                            }),
                            runtime: "simulated".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .map(|r| (i, r.into_inner()))
            }));
        }
        for p in pending {
            sessions.push(p.await??);
        }
    }
    let mut tasks = Vec::new();
    for (i, session) in sessions {
        let channel = pool[i % channels].clone();
        // Heartbeats, spread evenly over the interval.
        {
            let (samples, stop, session, channel) = (
                samples.clone(),
                stop.clone(),
                session.clone(),
                channel.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut client = AgentServiceClient::new(channel);
                tokio::time::sleep(Duration::from_millis((i as u64 * 7_919) % heartbeat_ms)).await;
                let mut tick = tokio::time::interval(Duration::from_millis(heartbeat_ms));
                while !stop.is_stopped() {
                    tick.tick().await;
                    let t0 = Instant::now();
                    let result = client
                        .heartbeat(authed(
                            &session.session_token,
                            v1::HeartbeatRequest {
                                session_id: session.session_id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await;
                    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(_) => s.heartbeat_ms.push(ms(t0.elapsed())),
                        Err(_) => s.errors += 1,
                    }
                }
            }));
        }
        // Long-poll claims; every lease is started and completed at once.
        {
            let (samples, stop) = (samples.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = AgentServiceClient::new(channel);
                while !stop.is_stopped() {
                    let claim = client
                        .claim(authed(
                            &session.session_token,
                            v1::ClaimRequest {
                                session_id: session.session_id.clone(),
                                free: Some(v1::Resources {
                                    cpu_millis: 1000,
                                    memory_mib: 1024,
                                    ..Default::default()
                                }),
                                max_jobs: 1,
                                wait_ms: 20_000,
                            },
                        ))
                        .await;
                    let leases = match claim {
                        Ok(r) => r.into_inner().leases,
                        Err(_) => {
                            samples.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    for lease in leases.into_iter().filter_map(|l| l.lease) {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .claimed_at
                            .insert(lease.job_id.clone(), Instant::now());
                        let _ = client
                            .report_started(authed(
                                &session.session_token,
                                v1::ReportStartedRequest {
                                    lease: Some(lease.clone()),
                                },
                            ))
                            .await;
                        let _ = client
                            .complete(authed(
                                &session.session_token,
                                v1::CompleteRequest {
                                    lease: Some(lease),
                                    outcome: v1::Outcome::Succeeded as i32,
                                    exit_code: Some(0),
                                    reason: String::new(),
                                },
                            ))
                            .await;
                    }
                }
            }));
        }
    }
    // Let the fleet settle into its heartbeat rhythm, then measure a window.
    tokio::time::sleep(Duration::from_millis(heartbeat_ms.min(window_s * 1000 / 2))).await;
    samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .heartbeat_ms
        .clear();
    let cpu0 = proc::cpu_secs(coordinator_pid).unwrap_or_default();
    let t0 = Instant::now();
    let per_tick = (jobs as u64).div_ceil(window_s * 10).max(1) as usize;
    let mut submitted_at: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while submitted_at.len() < jobs {
        tick.tick().await;
        let n = per_tick.min(jobs - submitted_at.len());
        let resp = sandbox
            .client
            .submit(&SubmitRequest::Batch {
                jobs: (0..n).map(|_| JobSpec::command(["true"])).collect(),
            })
            .await?;
        let at = Instant::now();
        for job in resp.jobs {
            submitted_at.insert(job.id, at);
        }
    }
    let elapsed = t0.elapsed().max(Duration::from_secs(window_s));
    tokio::time::sleep(elapsed.saturating_sub(t0.elapsed())).await;
    let coordinator_cpu_pct = (proc::cpu_secs(coordinator_pid).unwrap_or_default() - cpu0)
        / t0.elapsed().as_secs_f64()
        * 100.0;
    // Give the last jobs a moment to be claimed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claimed_at
            .len()
            < jobs
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.stop();
    for task in &tasks {
        task.abort();
    }
    let coordinator_rss = proc::rss_kib(coordinator_pid).unwrap_or_default();
    let s = samples.lock().unwrap_or_else(|e| e.into_inner());
    let dispatch: Vec<f64> = submitted_at
        .iter()
        .filter_map(|(id, at)| {
            s.claimed_at
                .get(id)
                .map(|c| ms(c.saturating_duration_since(*at)))
        })
        .collect();
    let dispatched = dispatch.len();
    let hb = percentiles(s.heartbeat_ms.clone());
    let dp = percentiles(dispatch);
    let mut report = Report::new(
        "fleet",
        vec![
            ("store", "sqlite".into()),
            ("simulated agents", agents.to_string()),
            ("gRPC connections", channels.to_string()),
            ("heartbeat", format!("{} s", heartbeat_ms / 1000)),
            ("claim long-poll", "20 s".into()),
            ("jobs", jobs.to_string()),
            ("window", format!("{window_s} s")),
            (
                "note",
                "the simulator shares the 2 cores with the coordinator".into(),
            ),
        ],
        &["measure", "value"],
    );
    report.row(vec![
        "coordinator CPU".into(),
        format!("{coordinator_cpu_pct:.1} % of a core"),
    ]);
    report.row(vec![
        "coordinator RSS".into(),
        format!("{:.1} MiB", coordinator_rss as f64 / 1024.0),
    ]);
    report.row(vec![
        "heartbeat p50 / p99 / max".into(),
        format!("{} / {} / {}", fmt_ms(hb[0]), fmt_ms(hb[2]), fmt_ms(hb[3])),
    ]);
    report.row(vec![
        "heartbeats measured".into(),
        s.heartbeat_ms.len().to_string(),
    ]);
    report.row(vec![
        "dispatch p50 / p99 / max".into(),
        format!("{} / {} / {}", fmt_ms(dp[0]), fmt_ms(dp[2]), fmt_ms(dp[3])),
    ]);
    report.row(vec![
        "jobs dispatched".into(),
        format!("{dispatched} / {jobs}"),
    ]);
    report.row(vec!["RPC errors".into(), s.errors.to_string()]);
    report.figures = json!({
        "coordinator_cpu_pct": coordinator_cpu_pct, "coordinator_rss_kib": coordinator_rss,
        "heartbeat_p50_ms": hb[0], "heartbeat_p99_ms": hb[2], "heartbeat_max_ms": hb[3],
        "dispatch_p50_ms": dp[0], "dispatch_p99_ms": dp[2], "dispatch_max_ms": dp[3],
        "dispatched": dispatched, "jobs": jobs, "agents": agents, "rpc_errors": s.errors,
    });
    Ok(report)
}

/// A shared stop flag for the simulated agents' loops.
#[derive(Clone, Default)]
struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Stop {
    fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn is_stopped(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
