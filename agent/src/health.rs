//! The agent's health HTTP server (DESIGN §6): `/health` turns 503 as soon as
//! a drain begins, so probes and load balancers see it before anything stops;
//! `/health/live` stays 200 (platform checks that replace instances use it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::agent::{Phase, Shared};

#[derive(Debug, Serialize)]
pub struct FreeJson {
    pub cpu_millis: u32,
    pub memory_mib: u64,
    pub gpus: u32,
    pub slots: u32,
}

/// The `/health` body.
#[derive(Debug, Serialize)]
pub struct HealthJson {
    /// idle | busy | draining | terminating | unhealthy
    pub state: &'static str,
    /// Why draining or terminating (`idle`, `spot`, `lifecycle`, `operator`,
    /// `rebalance`, `shutdown`), or unhealthy.
    pub reason: Option<String>,
    pub session: Option<String>,
    pub running: usize,
    pub free: FreeJson,
    /// Milliseconds since the last successful heartbeat (or registration).
    pub last_heartbeat_ms: Option<u64>,
    pub runtime_ok: bool,
    /// The runtime and what it runs on (`docker 20.10.24`, `process`).
    pub runtime: String,
    /// `ec2`, `fargate` or `local`.
    pub platform: &'static str,
    /// While draining: milliseconds until running jobs are stopped.
    pub drain_deadline_ms: Option<u64>,
}

impl HealthJson {
    fn ok(&self) -> bool {
        matches!(self.state, "idle" | "busy")
    }
}

async fn snapshot(shared: &Shared) -> HealthJson {
    let runtime_error =
        match tokio::time::timeout(Duration::from_secs(2), shared.runtime.check()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("runtime check timed out".to_string()),
        };
    let (free, slots) = shared.free();
    let st = shared.state();
    let since = st.last_heartbeat_ok.map(|t| t.elapsed());
    let ttl = Duration::from_millis(st.session.as_ref().map_or(60_000, |s| s.ttl_ms));
    let stale = since.unwrap_or_else(|| shared.started_at.elapsed()) > ttl;
    let (state, reason) = match st.phase {
        Phase::Draining => ("draining", st.drain_reason.clone()),
        Phase::Terminating => ("terminating", st.drain_reason.clone()),
        Phase::Running if runtime_error.is_some() => ("unhealthy", runtime_error.clone()),
        Phase::Running if stale => (
            "unhealthy",
            Some(format!(
                "no successful heartbeat for over {} ms — is the coordinator at {} reachable?",
                ttl.as_millis(),
                shared.client.url()
            )),
        ),
        Phase::Running if st.jobs.is_empty() => ("idle", None),
        Phase::Running => ("busy", None),
    };
    HealthJson {
        state,
        reason,
        session: st.session.as_ref().map(|s| s.auth.session_id.clone()),
        running: st.jobs.len(),
        free: FreeJson {
            cpu_millis: free.cpu_millis,
            memory_mib: free.memory_mib,
            gpus: free.gpus,
            slots,
        },
        last_heartbeat_ms: since.map(|d| d.as_millis() as u64),
        runtime_ok: runtime_error.is_none(),
        runtime: shared.runtime.description(),
        platform: shared.platform.kind().as_str(),
        drain_deadline_ms: match st.phase {
            Phase::Draining => shared.drain_deadline.borrow().map(|d| {
                d.saturating_duration_since(tokio::time::Instant::now())
                    .as_millis() as u64
            }),
            _ => None,
        },
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let body = snapshot(&shared).await;
    let code = if body.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn live() -> &'static str {
    "ok"
}

async fn drain(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !drain_allowed(&shared, peer, &headers) {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({
                "error": "POST /drain is allowed from loopback, or with `Authorization: Bearer <health_token>` (DROVER_HEALTH_TOKEN)"
            })),
        )
            .into_response();
    }
    shared.begin_drain("operator");
    (StatusCode::ACCEPTED, Json(snapshot(&shared).await)).into_response()
}

fn drain_allowed(shared: &Shared, peer: SocketAddr, headers: &HeaderMap) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let Some(expected) = shared.config.health_token.as_deref() else {
        return false;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let running = shared.state().jobs.len();
    let body = shared
        .metrics
        .render(running, shared.phase() != Phase::Running);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/drain", post(drain))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Serves until `stop` is cancelled (the last step of a drain).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let app = router(shared);
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await;
    if let Err(e) = result {
        tracing::error!("health server failed: {e}");
    }
}
