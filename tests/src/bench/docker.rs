//! The `docker` scenario (issue #3): a `true` job end to end through the
//! agent's Docker runtime beside `docker run --rm <same image> true`,
//! alternated in one run so both see the same Engine and host load. The
//! agent's container has the job's limits (CPU, memory, pids) and three
//! bind mounts; a second baseline runs `docker run` with the same, so that
//! what the Engine charges for limits and mounts shows apart from what the
//! agent adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_agent::config::RuntimeChoice;
use drover_agent::runtime::docker::test_image;
use drover_agent::{Agent, AgentConfig};
use drover_coordinator::blob::LocalBlobStore;
use drover_coordinator::clock::SystemClock;
use drover_coordinator::store::SqliteStore;
use drover_coordinator::{Config, Server, Service};
use drover_proto::model::JobSpec;
use serde_json::json;

use super::{fmt_ms, ms, percentiles, Options, Report};
use crate::timed_store::TimedStore;

/// The ratio of medians issue #3 aims for (printed, never asserted).
const TARGET_RATIO: f64 = 1.1;

pub async fn docker(opts: &Options) -> anyhow::Result<Report> {
    let rounds = if opts.smoke { 3 } else { 20 };
    let image = test_image::ensure_on_local_engine()
        .await
        .context("the docker scenario needs a reachable Docker Engine")?;
    let engine = docker_cli(&["version", "--format", "{{.Server.Version}}"])
        .await
        .context("the docker scenario runs the `docker` CLI for its baseline")?;

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
    let server = Server::start_with(service).await?;
    let agent = Agent::start(AgentConfig {
        coordinator: format!("http://{}", server.grpc_addr()),
        join_token: config.join_tokens[0].token.clone(),
        agent_id: format!("bench-docker-{:08x}", std::process::id()),
        data_dir: dir.path().join("agent"),
        health_addr: "127.0.0.1:0".parse()?,
        max_jobs: 1,
        cpu_millis: Some(8_000),
        memory_mib: Some(8_192),
        runtime: RuntimeChoice::Docker,
        ..AgentConfig::default()
    })
    .await
    .context("cannot start an agent with the docker runtime")?;
    let client = drover_cli::Client::new(
        &format!("http://{}", server.http_addr()),
        Some(config.api_tokens[0].token.clone()),
    )?;
    let mut spec = JobSpec::command(["true"]);
    spec.image = image.clone();

    let (mut agent_ms, mut docker_ms, mut same_ms) = (Vec::new(), Vec::new(), Vec::new());
    // The container the agent makes for this job: its limits (the job
    // defaults: 100m CPU as a weight, 128 MiB, no swap; pids) and managed
    // mounts.
    let mounts = dir.path().join("mounts");
    for sub in ["input", "output", "scratch"] {
        std::fs::create_dir_all(mounts.join(sub))?;
    }
    let mount = |sub: &str, target: &str, ro: bool| {
        format!(
            "type=bind,source={},target={target}{}",
            mounts.join(sub).display(),
            if ro { ",readonly" } else { "" }
        )
    };
    let pids = drover_agent::runtime::docker::PIDS_LIMIT.to_string();
    let (input, output, scratch) = (
        mount("input", "/input", true),
        mount("output", "/output", false),
        mount("scratch", "/scratch", false),
    );
    let same_container = [
        "run",
        "--rm",
        "--cpu-shares",
        "102",
        "--memory",
        "128m",
        "--memory-swap",
        "128m",
        "--pids-limit",
        &pids,
        "--mount",
        &input,
        "--mount",
        &output,
        "--mount",
        &scratch,
        &image,
        "true",
    ];
    // One warm-up round of each, not counted.
    for round in 0..=rounds {
        let end_to_end = {
            let id = client.submit_one(spec.clone()).await?;
            let t_ack = Instant::now();
            let completed = wait_completed(&store, &id).await?;
            let job = client.get_job(&id).await?;
            anyhow::ensure!(
                job.exit_code == Some(0),
                "job {id} did not succeed: {:?} {:?}",
                job.state,
                job.reason
            );
            completed - t_ack
        };
        let t0 = Instant::now();
        docker_cli(&["run", "--rm", &image, "true"]).await?;
        let baseline = t0.elapsed();
        let t0 = Instant::now();
        docker_cli(&same_container).await?;
        let same = t0.elapsed();
        if round > 0 {
            agent_ms.push(ms(end_to_end));
            docker_ms.push(ms(baseline));
            same_ms.push(ms(same));
        }
    }
    agent.drain("bench done");
    agent.wait().await?;
    server.shutdown().await?;

    let (agent_p, docker_p, same_p) = (
        percentiles(agent_ms),
        percentiles(docker_ms),
        percentiles(same_ms),
    );
    let ratio = agent_p[0] / same_p[0];
    let plain_ratio = agent_p[0] / docker_p[0];
    let mut report = Report::new(
        "docker",
        vec![
            ("engine", engine),
            ("image", image),
            ("job", "true".into()),
            ("rounds", format!("{rounds}, alternating, after 1 warm-up")),
            ("agent", "in-process, docker runtime, 1 slot".into()),
            (
                "agent job limits",
                "100m CPU as a weight (cpu shares), 128 MiB (job defaults)".into(),
            ),
        ],
        &["measure", "p50", "p90", "max"],
    );
    for (label, p) in [
        ("agent: submit ack → completion recorded", agent_p),
        ("docker run --rm, same limits and mounts", same_p),
        ("docker run --rm (no limits, no mounts)", docker_p),
    ] {
        report.row(vec![label.into(), fmt_ms(p[0]), fmt_ms(p[1]), fmt_ms(p[3])]);
    }
    for (label, r) in [
        (
            format!("ratio of medians, vs plain docker run (target ≤ {TARGET_RATIO})"),
            plain_ratio,
        ),
        (
            "ratio of medians, same limits and mounts".to_string(),
            ratio,
        ),
    ] {
        report.row(vec![label, format!("{r:.2}"), String::new(), String::new()]);
    }
    report.figures = json!({
        "agent_end_to_end": {"p50_ms": agent_p[0], "p90_ms": agent_p[1], "max_ms": agent_p[3]},
        "docker_run_same_container": {"p50_ms": same_p[0], "p90_ms": same_p[1], "max_ms": same_p[3]},
        "docker_run": {"p50_ms": docker_p[0], "p90_ms": docker_p[1], "max_ms": docker_p[3]},
        "ratio_of_medians": plain_ratio,
        "ratio_of_medians_same_limits_and_mounts": ratio,
        "target_ratio": TARGET_RATIO,
        "rounds": rounds,
    });
    Ok(report)
}

/// When the store recorded the job's completion.
async fn wait_completed(store: &TimedStore<SqliteStore>, id: &str) -> anyhow::Result<Instant> {
    loop {
        let notified = store.completed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(at) = store.times(id).completed {
            return Ok(at);
        }
        tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .with_context(|| format!("job {id} did not complete within 60 s"))?;
    }
}

/// Runs the `docker` CLI to its end off the async workers; its stdout, or an
/// error with its stderr.
async fn docker_cli(args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shown = args.join(" ");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("docker").args(&args).output()
    })
    .await?
    .with_context(|| format!("cannot run `docker {shown}` — is the docker CLI installed?"))?;
    anyhow::ensure!(
        output.status.success(),
        "`docker {shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
