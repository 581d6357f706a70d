//! Counters for `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
        out
    }
}
