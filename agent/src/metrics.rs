//! Counters for `GET /metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How an attempt ended on this agent; `lost` attempts are never completed.
pub const OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "interrupted",
    "lost",
];

#[derive(Debug, Default)]
pub struct Metrics {
    finished: [AtomicU64; 6],
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub claims_ok: AtomicU64,
    pub claims_failed: AtomicU64,
    pub leases_claimed: AtomicU64,
    pub fences: AtomicU64,
    pub registrations: AtomicU64,
    /// AWS API requests by operation, shared with the platform.
    pub aws_calls: Arc<AwsCalls>,
}

/// AWS API requests the agent made, by operation and result: what its IAM
/// policy is used for, and what it costs in API rate.
#[derive(Debug, Default)]
pub struct AwsCalls {
    counts: Mutex<BTreeMap<(&'static str, bool), u64>>,
}

impl AwsCalls {
    pub fn record(&self, op: &'static str, ok: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry((op, ok)).or_default() += 1;
    }

    /// Requests of `op` that succeeded (`ok`) or failed.
    pub fn get(&self, op: &str, ok: bool) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .iter()
            .filter(|((o, k), _)| *o == op && *k == ok)
            .map(|(_, n)| *n)
            .sum()
    }

    fn snapshot(&self) -> Vec<((&'static str, bool), u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl Metrics {
    pub fn job_finished(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.finished[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition; `running` and `draining` are gauges read by the caller.
    pub fn render(&self, running: usize, draining: bool) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP drover_agent_jobs_running Jobs running on this agent."
        );
        let _ = writeln!(out, "# TYPE drover_agent_jobs_running gauge");
        let _ = writeln!(out, "drover_agent_jobs_running {running}");
        let _ = writeln!(
            out,
            "# HELP drover_agent_draining 1 while the agent drains."
        );
        let _ = writeln!(out, "# TYPE drover_agent_draining gauge");
        let _ = writeln!(out, "drover_agent_draining {}", u8::from(draining));
        let _ = writeln!(
            out,
            "# HELP drover_agent_jobs_finished_total Attempts finished, by outcome."
        );
        let _ = writeln!(out, "# TYPE drover_agent_jobs_finished_total counter");
        for (i, outcome) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "drover_agent_jobs_finished_total{{outcome=\"{outcome}\"}} {}",
                get(&self.finished[i])
            );
        }
        let _ = writeln!(
            out,
            "# HELP drover_agent_heartbeats_total Heartbeats sent, by result."
        );
        let _ = writeln!(out, "# TYPE drover_agent_heartbeats_total counter");
        let _ = writeln!(
            out,
            "drover_agent_heartbeats_total{{result=\"ok\"}} {}",
            get(&self.heartbeats_ok)
        );
        let _ = writeln!(
            out,
            "drover_agent_heartbeats_total{{result=\"failed\"}} {}",
            get(&self.heartbeats_failed)
        );
        let _ = writeln!(
            out,
            "# HELP drover_agent_claims_total Claim calls, by result."
        );
        let _ = writeln!(out, "# TYPE drover_agent_claims_total counter");
        let _ = writeln!(
            out,
            "drover_agent_claims_total{{result=\"ok\"}} {}",
            get(&self.claims_ok)
        );
        let _ = writeln!(
            out,
            "drover_agent_claims_total{{result=\"failed\"}} {}",
            get(&self.claims_failed)
        );
        let _ = writeln!(
            out,
            "# HELP drover_agent_leases_claimed_total Leases received from Claim."
        );
        let _ = writeln!(out, "# TYPE drover_agent_leases_claimed_total counter");
        let _ = writeln!(
            out,
            "drover_agent_leases_claimed_total {}",
            get(&self.leases_claimed)
        );
        let _ = writeln!(out, "# HELP drover_agent_fences_total Times the agent fenced itself (killed its jobs and dropped its session).");
        let _ = writeln!(out, "# TYPE drover_agent_fences_total counter");
        let _ = writeln!(out, "drover_agent_fences_total {}", get(&self.fences));
        let _ = writeln!(
            out,
            "# HELP drover_agent_registrations_total Successful Register calls."
        );
        let _ = writeln!(out, "# TYPE drover_agent_registrations_total counter");
        let _ = writeln!(
            out,
            "drover_agent_registrations_total {}",
            get(&self.registrations)
        );
        let _ = writeln!(
            out,
            "# HELP drover_agent_aws_calls_total AWS API requests, by operation and result."
        );
        let _ = writeln!(out, "# TYPE drover_agent_aws_calls_total counter");
        for ((op, ok), n) in self.aws_calls.snapshot() {
            let result = if ok { "ok" } else { "error" };
            let _ = writeln!(
                out,
                "drover_agent_aws_calls_total{{op=\"{op}\",result=\"{result}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_calls_are_rendered_per_operation_and_result() {
        let m = Metrics::default();
        m.aws_calls.record("SetInstanceProtection", true);
        m.aws_calls.record("SetInstanceProtection", true);
        m.aws_calls
            .record("TerminateInstanceInAutoScalingGroup", false);
        let text = m.render(0, false);
        assert!(text.contains(
            "drover_agent_aws_calls_total{op=\"SetInstanceProtection\",result=\"ok\"} 2"
        ));
        assert!(text.contains(
            "drover_agent_aws_calls_total{op=\"TerminateInstanceInAutoScalingGroup\",result=\"error\"} 1"
        ));
        assert_eq!(m.aws_calls.get("SetInstanceProtection", true), 2);
    }
}
