//! Periodic backstop: expired sessions, timed-out and never-started jobs.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::service::Service;

pub async fn run(service: Arc<Service>, interval_ms: u64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(10)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match service.reap().await {
            Ok(report) if report != Default::default() => {
                tracing::info!(?report, "reaper pass");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaper pass failed; retrying next tick"),
        }
    }
}
