//! Counters an on-call engineer needs, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use drover_proto::model::Pool;

#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub leases_granted: AtomicU64,
    pub claims: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Fenced calls rejected because the lease was lost.
    pub fenced_rejections: AtomicU64,
    pub sessions_registered: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Jobs requeued because their session ended or never reported them.
    pub requeues_session_lost: AtomicU64,
    pub jobs_timed_out_by_reaper: AtomicU64,
    pub completions: [AtomicU64; 5],
    /// Sum of milliseconds from submit to lease, and count, for the mean.
    pub dispatch_ms_sum: AtomicU64,
    pub dispatch_count: AtomicU64,
}

/// A per-pool gauge: name, help, and how to read it off a pool.
type PoolGauge = (&'static str, &'static str, fn(&Pool) -> Option<i64>);

pub const OUTCOMES: [&str; 5] = [
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "interrupted",
];

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, pools: &[Pool]) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "drover_jobs_submitted_total",
                "Jobs accepted by submit.",
                &self.jobs_submitted,
            ),
            (
                "drover_leases_granted_total",
                "Leases handed to agents.",
                &self.leases_granted,
            ),
            ("drover_claims_total", "Claim calls answered.", &self.claims),
            (
                "drover_heartbeats_total",
                "Heartbeats answered.",
                &self.heartbeats,
            ),
            (
                "drover_fenced_rejections_total",
                "Calls rejected because the lease was lost.",
                &self.fenced_rejections,
            ),
            (
                "drover_sessions_registered_total",
                "Agent sessions opened.",
                &self.sessions_registered,
            ),
            (
                "drover_sessions_expired_total",
                "Agent sessions reaped after their TTL.",
                &self.sessions_expired,
            ),
            (
                "drover_requeues_session_lost_total",
                "Jobs requeued because their agent session ended.",
                &self.requeues_session_lost,
            ),
            (
                "drover_jobs_timed_out_by_reaper_total",
                "Jobs timed out by the coordinator's backstop.",
                &self.jobs_timed_out_by_reaper,
            ),
            (
                "drover_dispatch_latency_ms_sum",
                "Sum of submit-to-lease latency of first attempts.",
                &self.dispatch_ms_sum,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP drover_dispatch_latency_ms_count First attempts leased.\n# TYPE drover_dispatch_latency_ms_count counter\ndrover_dispatch_latency_ms_count {}",
            self.dispatch_count.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP drover_completions_total Attempts completed, by outcome.\n# TYPE drover_completions_total counter");
        for (outcome, value) in OUTCOMES.iter().zip(&self.completions) {
            let _ = writeln!(
                out,
                "drover_completions_total{{outcome=\"{outcome}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let gauges: [PoolGauge; 4] = [
            (
                "drover_pool_queued_jobs",
                "Jobs waiting in the pool's queue.",
                |p| Some(p.queued as i64),
            ),
            (
                "drover_pool_running_jobs",
                "Jobs leased or running in the pool.",
                |p| Some(p.running as i64),
            ),
            (
                "drover_pool_agents",
                "Agents with a live session in the pool.",
                |p| Some(p.agents as i64),
            ),
            (
                "drover_pool_oldest_queued_age_ms",
                "Age of the oldest queued job.",
                |p| p.oldest_queued_age_ms,
            ),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for pool in pools {
                if let Some(v) = get(pool) {
                    let _ = writeln!(out, "{name}{{pool=\"{}\"}} {v}", pool.pool);
                }
            }
        }
        out
    }
}
