//! Counters an on-call engineer needs, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use drover_proto::model::Pool;

#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub leases_granted: AtomicU64,
    pub claims: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Fenced calls rejected because the lease was lost.
    pub fenced_rejections: AtomicU64,
    /// AppendLogs answered with `resend_from`: output a coordinator had
    /// accepted was lost before it was persisted.
    pub log_resends: AtomicU64,
    /// `Report` calls, and the reports (starts, completions) they carried.
    pub report_calls: AtomicU64,
    pub reports: AtomicU64,
    pub sessions_registered: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Jobs requeued because their session ended or never reported them.
    pub requeues_session_lost: AtomicU64,
    pub jobs_timed_out_by_reaper: AtomicU64,
    pub completions: [AtomicU64; 5],
    /// Sum of milliseconds from submit to lease, and count, for the mean.
    pub dispatch_ms_sum: AtomicU64,
    pub dispatch_count: AtomicU64,
    /// Scaler evaluations by pool and outcome (`scale_out`, `launch`,
    /// `terminate_zombie`, `none`, `cooldown`, `paused`, `backoff`, `error`).
    pub scaler_decisions: PoolCounter,
    /// Failed AWS calls of the scaler by pool and call.
    pub scaler_errors: PoolCounter,
    /// Zombie instances terminated, by pool and Auto Scaling group.
    pub zombies_terminated: PoolCounter,
    /// 1 while this coordinator holds the scaler lease.
    pub scaler_leader: AtomicU64,
}

/// A counter per pool and one more label.
#[derive(Debug, Default)]
pub struct PoolCounter(Mutex<BTreeMap<(String, String), u64>>);

impl PoolCounter {
    pub fn inc(&self, pool: &str, label: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *counts
            .entry((pool.to_string(), label.to_string()))
            .or_default() += 1;
    }

    pub fn get(&self, pool: &str, label: &str) -> u64 {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&(pool.to_string(), label.to_string()))
            .copied()
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ((pool, value), count) in counts.iter() {
            let _ = writeln!(out, "{name}{{pool=\"{pool}\",{label}=\"{value}\"}} {count}");
        }
    }
}

/// Throttled DynamoDB answers by operation, every attempt counted, retried
/// or not ([`crate::aws::ThrottleCounter`]). Per process rather than per
/// [`Metrics`]: the store's SDK client counts into it, and it is built
/// before any service.
pub static DYNAMODB_THROTTLED: LabelCounter = LabelCounter::new();

/// A counter by one label.
#[derive(Debug, Default)]
pub struct LabelCounter(Mutex<BTreeMap<String, u64>>);

impl LabelCounter {
    pub const fn new() -> LabelCounter {
        LabelCounter(Mutex::new(BTreeMap::new()))
    }

    pub fn inc(&self, label: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(label.to_string()).or_default() += 1;
    }

    pub fn get(&self, label: &str) -> u64 {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(label).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (value, count) in counts.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
        }
    }
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
        let counters: [(&str, &str, &AtomicU64); 13] = [
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
                "drover_log_resends_total",
                "AppendLogs calls answered with resend_from (output lost by a coordinator before it was persisted).",
                &self.log_resends,
            ),
            (
                "drover_report_calls_total",
                "Report calls answered (each carries one or more starts and completions).",
                &self.report_calls,
            ),
            (
                "drover_reports_total",
                "Starts and completions received through Report calls.",
                &self.reports,
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
        self.scaler_decisions.render(
            &mut out,
            "drover_scaler_decisions_total",
            "Scaler evaluations, by pool and outcome.",
            "action",
        );
        self.scaler_errors.render(
            &mut out,
            "drover_scaler_errors_total",
            "Failed AWS calls of the scaler, by pool and call.",
            "call",
        );
        self.zombies_terminated.render(
            &mut out,
            "drover_zombies_terminated_total",
            "Instances terminated because their agent's session expired while they ran on.",
            "asg",
        );
        DYNAMODB_THROTTLED.render(
            &mut out,
            "drover_dynamodb_throttled_total",
            "Throttled DynamoDB answers (each attempt, retried by the SDK or not), by operation.",
            "operation",
        );
        let _ = writeln!(
            out,
            "# HELP drover_scaler_leader 1 while this coordinator holds the scaler lease.\n# TYPE drover_scaler_leader gauge\ndrover_scaler_leader {}",
            self.scaler_leader.load(Ordering::Relaxed)
        );
        let gauges: [PoolGauge; 7] = [
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
            (
                "drover_pool_wanted_workers",
                "Instances or tasks the pool's demand asks for (scaling pools).",
                |p| p.scaling.as_ref()?.wanted.map(|v| v as i64),
            ),
            (
                "drover_pool_desired_workers",
                "The ASG's desired capacity, or Fargate tasks pending or running.",
                |p| p.scaling.as_ref()?.desired.map(|v| v as i64),
            ),
            (
                "drover_pool_actual_workers",
                "Instances in service, or tasks ECS lists.",
                |p| p.scaling.as_ref()?.actual.map(|v| v as i64),
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
