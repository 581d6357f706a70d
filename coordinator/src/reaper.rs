//! Periodic backstop: expired sessions, timed-out and never-started jobs,
//! and PENDING workflow steps whose dependencies all ended (a completion
//! that could not finish releasing them).

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
        match service.release_pending().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "sweep released pending workflow jobs"),
            Err(e) => tracing::warn!(error = %e, "pending-job sweep failed; retrying next tick"),
        }
    }
}
