//! Artifacts over HTTP: `GET /v1/jobs/{id}/artifacts` (API token) answers a
//! signed download URL; `/v1/blobs/{object}` serves the local blob store to
//! whoever holds a signed URL (agents uploading, the CLI downloading). The
//! signature is the credential: these two routes take no API token.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_proto::model;
use futures::TryStreamExt;

use super::{authorize, ApiResult};
use crate::blob::{Access, ArtifactKey};
use crate::config::Scope;
use crate::error::ServiceError;
use crate::service::Service;

pub(super) async fn artifact(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<model::Artifact>> {
    authorize(&service, &headers, Scope::Read)?;
    Ok(Json(service.artifact(&id).await?))
}

fn signed(
    service: &Service,
    object: &str,
    access: Access,
    q: &HashMap<String, String>,
) -> ApiResult<ArtifactKey> {
    let missing = |name: &str| {
        ServiceError::invalid(
            name,
            "is missing: use the whole URL the coordinator handed out",
        )
    };
    let expires = q
        .get("expires")
        .ok_or_else(|| missing("expires"))?
        .parse::<i64>()
        .map_err(|_| ServiceError::invalid("expires", "is not a time in unix milliseconds"))?;
    let signature = q.get("signature").ok_or_else(|| missing("signature"))?;
    Ok(service.check_blob_url(object, access, expires, signature)?)
}

pub(super) async fn put_blob(
    State(service): State<Arc<Service>>,
    Path(object): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> ApiResult<Response> {
    let key = signed(&service, &object, Access::Put, &q)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let bytes = service.put_blob(&key, Box::pin(stream)).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "object": key.object_name(), "bytes": bytes })),
    )
        .into_response())
}

pub(super) async fn get_blob(
    State(service): State<Arc<Service>>,
    Path(object): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let key = signed(&service, &object, Access::Get, &q)?;
    let (stream, size) = service.get_blob(&key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
