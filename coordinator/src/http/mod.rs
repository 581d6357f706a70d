//! The HTTP JSON API for people and tools: a thin adapter over [`Service`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_proto::model::{
    AgentList, ApiError, ApiErrorBody, EventList, JobList, JobState, PoolList, SubmitRequest,
};
use drover_proto::workflow::{RunList, WorkflowSpec};

use crate::config::Scope;
use crate::error::ServiceError;
use crate::service::Service;
use crate::store::JobFilter;

mod blobs;
mod openapi;
pub use openapi::openapi_document;

/// Largest request body (a batch of jobs).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { Json(openapi_document()) }),
        )
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/retry", post(retry))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/jobs/{id}/artifacts", get(blobs::artifact))
        .route(
            "/v1/blobs/{*object}",
            get(blobs::get_blob)
                .put(blobs::put_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/workflows", post(create_workflow).get(list_workflows))
        .route("/v1/workflows/{id}", get(get_workflow))
        .route("/v1/workflows/{id}/cancel", post(cancel_workflow))
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}/drain", post(drain))
        .route("/v1/pools", get(pools))
        .route("/v1/pools/{pool}/pause", post(pause))
        .route("/v1/pools/{pool}/resume", post(resume))
        .fallback(|| async {
            ApiFailure(ServiceError::NotFound(
                "no such route; see /v1/openapi.json".into(),
            ))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
}

/// Any error of the API, rendered as `ApiErrorBody`.
pub struct ApiFailure(ServiceError);

impl From<ServiceError> for ApiFailure {
    fn from(e: ServiceError) -> Self {
        ApiFailure(e)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ApiErrorBody {
            error: ApiError {
                code,
                message: self.0.to_string(),
                field: self.0.field().map(str::to_string),
            },
        };
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn authorize(service: &Service, headers: &HeaderMap, scope: Scope) -> ApiResult<()> {
    Ok(service.authorize(bearer(headers), scope)?)
}

fn json_rejection(rejection: JsonRejection) -> ApiFailure {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiFailure(ServiceError::invalid(
            "body",
            format!(
                "is larger than {} MiB; submit fewer jobs per batch",
                MAX_BODY_BYTES >> 20
            ),
        ));
    }
    ApiFailure(ServiceError::invalid("body", rejection.body_text()))
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(service): State<Arc<Service>>) -> ApiResult<Response> {
    let text = service.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn submit(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Submit)?;
    let Json(request) = body.map_err(json_rejection)?;
    let response = service.submit(request.into_specs()).await?;
    Ok((StatusCode::CREATED, Json(response)).into_response())
}

fn query_param<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
    what: &str,
) -> ApiResult<Option<T>> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiFailure(ServiceError::invalid(name, format!("{v:?} is not {what}")))
            })
        })
        .transpose()
}

async fn list_jobs(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<JobList>> {
    authorize(&service, &headers, Scope::Read)?;
    for key in q.keys() {
        if !["state", "pool", "name", "cursor", "limit"].contains(&key.as_str()) {
            return Err(ServiceError::invalid(
                key,
                "is not a filter; use state, pool, name, cursor or limit",
            )
            .into());
        }
    }
    let state = match q.get("state") {
        Some(s) => Some(s.parse::<JobState>().map_err(ServiceError::from)?),
        None => None,
    };
    let filter = JobFilter {
        state,
        pool: q.get("pool").cloned(),
        name: q.get("name").cloned(),
    };
    let limit = query_param::<usize>(&q, "limit", "a number")?;
    let page = service
        .list_jobs(&filter, q.get("cursor").map(String::as_str), limit)
        .await?;
    Ok(Json(JobList {
        jobs: page.items,
        next_cursor: page.next_cursor,
    }))
}

async fn create_workflow(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Result<Json<WorkflowSpec>, JsonRejection>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Submit)?;
    let Json(spec) = body.map_err(json_rejection)?;
    let run = service.create_workflow(spec).await?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

async fn list_workflows(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<RunList>> {
    authorize(&service, &headers, Scope::Read)?;
    if let Some(key) = q
        .keys()
        .find(|k| !["cursor", "limit"].contains(&k.as_str()))
    {
        return Err(ServiceError::invalid(key, "is not a parameter; use cursor or limit").into());
    }
    let limit = query_param::<usize>(&q, "limit", "a number")?;
    Ok(Json(
        service
            .workflows(q.get("cursor").map(String::as_str), limit)
            .await?,
    ))
}

async fn get_workflow(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(service.workflow(&id).await?).into_response())
}

async fn cancel_workflow(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Submit)?;
    Ok(Json(service.cancel_workflow(&id).await?).into_response())
}

async fn get_job(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(service.get_job(&id).await?).into_response())
}

async fn cancel(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Submit)?;
    Ok(Json(service.cancel(&id).await?).into_response())
}

async fn retry(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Submit)?;
    Ok(Json(service.retry(&id).await?).into_response())
}

async fn events(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<EventList>> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(EventList {
        events: service.events(&id).await?,
    }))
}

async fn logs(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Read)?;
    let attempt = query_param::<u64>(&q, "attempt", "an attempt number")?;
    let follow = query_param::<bool>(&q, "follow", "true or false")?.unwrap_or(false);
    let attempt = service.log_attempt(&id, attempt).await?;
    let stream = service.log_stream(id, attempt, follow);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-drover-attempt"),
                attempt.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn agents(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
) -> ApiResult<Json<AgentList>> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(AgentList {
        agents: service.agents().await?,
    }))
}

async fn drain(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Admin)?;
    Ok(Json(service.drain_agent(&id).await?).into_response())
}

async fn pools(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
) -> ApiResult<Json<PoolList>> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(PoolList {
        pools: service.pools().await?,
    }))
}

async fn pause(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(pool): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Admin)?;
    Ok(Json(service.set_pool_paused(&pool, true).await?).into_response())
}

async fn resume(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(pool): Path<String>,
) -> ApiResult<Response> {
    authorize(&service, &headers, Scope::Admin)?;
    Ok(Json(service.set_pool_paused(&pool, false).await?).into_response())
}
