//! A typed client for the coordinator's HTTP JSON API (one method per route).
//! The CLI commands, `drover dev --demo` and the end-to-end tests all go
//! through it, so they exercise the same requests a user's scripts would.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use drover_proto::model::{
    Agent, AgentList, ApiError, ApiErrorBody, EventList, Job, JobList, JobSpec, JobState, Pool,
    PoolList, SubmitRequest, SubmitResponse,
};
use drover_proto::workflow::{RunList, RunSummary, WorkflowRun};
use drover_proto::ErrorCode;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::CA_SETTING;

/// How long a plain (non-streaming) request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A non-2xx answer from the coordinator, with its decoded error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFailure {
    pub status: u16,
    pub error: ApiError,
}

impl ApiFailure {
    /// Whether the failure is the caller's input (exit code 2) rather than
    /// the system's.
    pub fn is_validation(&self) -> bool {
        self.error.code == ErrorCode::InvalidArgument
    }

    /// Whether `err` is the coordinator answering 404 (no such job, run…).
    pub fn is_not_found(err: &anyhow::Error) -> bool {
        err.downcast_ref::<ApiFailure>()
            .is_some_and(|f| f.status == 404)
    }
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error.message)?;
        if let Some(field) = &self.error.field {
            write!(f, " (field: {field})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

/// Filters for `GET /v1/jobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The coordinator's HTTP API. Cheap to clone. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Client {
    /// `addr` is the coordinator's HTTP URL, e.g. `http://127.0.0.1:7080`
    /// (a bare `host:port` is taken as `http://`).
    pub fn new(addr: &str, token: Option<String>) -> anyhow::Result<Client> {
        Self::with_ca_file(addr, token, None)
    }

    /// [`new`](Self::new), trusting the CA certificates of `ca_file` besides
    /// the public web PKI roots.
    pub fn with_ca_file(
        addr: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Client> {
        let with_scheme = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let base = Url::parse(&with_scheme)
            .with_context(|| format!("invalid coordinator address {addr:?}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            anyhow::bail!(
                "invalid coordinator address {addr:?}: use http://host:port or https://host"
            );
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("drover-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let ca = drover_proto::tls::read_certificates(path, CA_SETTING)?;
            for cert in &ca.certs {
                http = http.add_root_certificate(
                    reqwest::Certificate::from_der(cert)
                        .with_context(|| format!("{CA_SETTING}: {}", path.display()))?,
                );
            }
        }
        let http = http.build().context("building the HTTP client")?;
        Ok(Client {
            http,
            base,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The coordinator's base URL.
    pub fn addr(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    pub async fn health(&self) -> anyhow::Result<serde_json::Value> {
        self.call(Method::GET, &["health"], None::<&()>).await
    }

    pub async fn submit(&self, request: &SubmitRequest) -> anyhow::Result<SubmitResponse> {
        self.call(Method::POST, &["v1", "jobs"], Some(request))
            .await
    }

    /// Submits one spec; returns its id.
    pub async fn submit_one(&self, spec: JobSpec) -> anyhow::Result<String> {
        let response = self.submit(&SubmitRequest::One(Box::new(spec))).await?;
        response
            .jobs
            .into_iter()
            .next()
            .map(|job| job.id)
            .ok_or_else(|| anyhow!("the coordinator accepted the job but returned no id"))
    }

    /// One page of jobs; `next_cursor` names the next page.
    pub async fn list_jobs(&self, query: &JobQuery) -> anyhow::Result<JobList> {
        let request = self.request(Method::GET, &["v1", "jobs"]).query(query);
        self.send(request).await
    }

    /// Every job matching `query`, following `next_cursor` to the last page.
    pub async fn list_all_jobs(&self, query: &JobQuery) -> anyhow::Result<Vec<Job>> {
        let mut query = query.clone();
        let mut jobs = Vec::new();
        loop {
            let page = self.list_jobs(&query).await?;
            jobs.extend(page.jobs);
            match page.next_cursor {
                Some(cursor) if query.cursor.as_deref() != Some(cursor.as_str()) => {
                    query.cursor = Some(cursor)
                }
                _ => return Ok(jobs),
            }
        }
    }

    pub async fn get_job(&self, id: &str) -> anyhow::Result<Job> {
        self.call(Method::GET, &["v1", "jobs", id], None::<&()>)
            .await
    }

    pub async fn cancel_job(&self, id: &str) -> anyhow::Result<Job> {
        self.call(Method::POST, &["v1", "jobs", id, "cancel"], None::<&()>)
            .await
    }

    pub async fn retry_job(&self, id: &str) -> anyhow::Result<Job> {
        self.call(Method::POST, &["v1", "jobs", id, "retry"], None::<&()>)
            .await
    }

    pub async fn job_events(&self, id: &str) -> anyhow::Result<EventList> {
        self.call(Method::GET, &["v1", "jobs", id, "events"], None::<&()>)
            .await
    }

    /// Opens an attempt's log (`None`: the latest). With `follow` the body
    /// streams until the attempt ends.
    pub async fn logs(
        &self,
        id: &str,
        attempt: Option<u64>,
        follow: bool,
    ) -> anyhow::Result<LogStream> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(attempt) = attempt {
            query.push(("attempt", attempt.to_string()));
        }
        if follow {
            query.push(("follow", "true".to_string()));
        }
        let mut request = self
            .request(Method::GET, &["v1", "jobs", id, "logs"])
            .query(&query);
        if !follow {
            request = request.timeout(REQUEST_TIMEOUT);
        }
        let response = self.execute(request).await?;
        let attempt = response
            .headers()
            .get("x-drover-attempt")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .or(attempt);
        Ok(LogStream { attempt, response })
    }

    /// An attempt's whole log as it is now.
    pub async fn read_logs(&self, id: &str, attempt: Option<u64>) -> anyhow::Result<Vec<u8>> {
        let mut stream = self.logs(id, attempt, false).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Where to download a job's artifact (a signed, expiring URL).
    pub async fn artifact(&self, id: &str) -> anyhow::Result<drover_proto::model::Artifact> {
        self.call(Method::GET, &["v1", "jobs", id, "artifacts"], None::<&()>)
            .await
    }

    /// GETs a signed URL: no API token goes with it (the signature is the
    /// credential, and S3 refuses a second one).
    pub async fn download(&self, url: &str) -> anyhow::Result<Response> {
        let shown = url.split('?').next().unwrap_or(url);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|err| unreachable(err, shown, format!("cannot download {shown}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(api_failure(status, &body).into())
    }

    /// Starts a workflow run: `spec` is a `WorkflowSpec` as JSON (the CLI
    /// sends the file as written; the coordinator validates it).
    pub async fn create_workflow(&self, spec: &serde_json::Value) -> anyhow::Result<WorkflowRun> {
        self.call(Method::POST, &["v1", "workflows"], Some(spec))
            .await
    }

    /// One page of runs, newest first; `next_cursor` names the next page.
    pub async fn list_workflows(
        &self,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> anyhow::Result<RunList> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_string()));
        }
        let request = self
            .request(Method::GET, &["v1", "workflows"])
            .query(&query);
        self.send(request).await
    }

    /// Every run, following `next_cursor` to the last page.
    pub async fn list_all_workflows(&self, limit: Option<u32>) -> anyhow::Result<Vec<RunSummary>> {
        let mut cursor: Option<String> = None;
        let mut runs = Vec::new();
        loop {
            let page = self.list_workflows(limit, cursor.as_deref()).await?;
            runs.extend(page.runs);
            match page.next_cursor {
                Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
                _ => return Ok(runs),
            }
        }
    }

    pub async fn get_workflow(&self, id: &str) -> anyhow::Result<WorkflowRun> {
        self.call(Method::GET, &["v1", "workflows", id], None::<&()>)
            .await
    }

    /// Cancels every unfinished step of the run.
    pub async fn cancel_workflow(&self, id: &str) -> anyhow::Result<WorkflowRun> {
        self.call(
            Method::POST,
            &["v1", "workflows", id, "cancel"],
            None::<&()>,
        )
        .await
    }

    pub async fn list_agents(&self) -> anyhow::Result<AgentList> {
        self.call(Method::GET, &["v1", "agents"], None::<&()>).await
    }

    pub async fn drain_agent(&self, agent_id: &str) -> anyhow::Result<Agent> {
        self.call(
            Method::POST,
            &["v1", "agents", agent_id, "drain"],
            None::<&()>,
        )
        .await
    }

    pub async fn list_pools(&self) -> anyhow::Result<PoolList> {
        self.call(Method::GET, &["v1", "pools"], None::<&()>).await
    }

    pub async fn pause_pool(&self, pool: &str) -> anyhow::Result<Pool> {
        self.call(Method::POST, &["v1", "pools", pool, "pause"], None::<&()>)
            .await
    }

    pub async fn resume_pool(&self, pool: &str) -> anyhow::Result<Pool> {
        self.call(Method::POST, &["v1", "pools", pool, "resume"], None::<&()>)
            .await
    }

    /// The base URL with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let request = self.http.request(method, self.url(segments));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let mut request = self.request(method, segments);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        let response = self.execute(request.timeout(REQUEST_TIMEOUT)).await?;
        let url = response.url().path().to_string();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer to {url}"))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the coordinator to {url}"))
    }

    /// Sends the request; a non-2xx answer becomes an [`ApiFailure`].
    async fn execute(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request.send().await.map_err(|err| {
            unreachable(
                err,
                self.addr(),
                format!("cannot reach the coordinator at {}", self.addr()),
            )
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let mut failure = api_failure(status, &body);
        if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            failure
                .error
                .message
                .push_str(": pass --token or set DROVER_TOKEN");
        }
        Err(failure.into())
    }
}

/// A request that got no answer: `what`, then what TLS had to do with it
/// (naming the CA setting), then reqwest's causes.
fn unreachable(err: reqwest::Error, url: &str, what: String) -> anyhow::Error {
    let hint = drover_proto::tls::diagnose(&err, url, CA_SETTING);
    let err = anyhow::Error::new(err);
    match hint {
        Some(hint) => err.context(hint).context(what),
        None => err.context(what),
    }
}

/// Decodes an error answer; a body that is not an `ApiErrorBody` (a proxy's
/// HTML page, say) is summarised instead.
pub fn api_failure(status: StatusCode, body: &[u8]) -> ApiFailure {
    if let Ok(decoded) = serde_json::from_slice::<ApiErrorBody>(body) {
        return ApiFailure {
            status: status.as_u16(),
            error: decoded.error,
        };
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut message = format!("the coordinator answered {status}");
    if !text.is_empty() {
        let short: String = text.chars().take(200).collect();
        message.push_str(": ");
        message.push_str(&short);
    }
    let code = match status.as_u16() {
        400 | 422 => ErrorCode::InvalidArgument,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::FailedPrecondition,
        503 => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    ApiFailure {
        status: status.as_u16(),
        error: ApiError {
            code,
            message,
            field: None,
        },
    }
}

/// An attempt's log body, read chunk by chunk as it arrives.
#[derive(Debug)]
pub struct LogStream {
    /// The attempt being read (from the `x-drover-attempt` header).
    pub attempt: Option<u64>,
    response: Response,
}

impl LogStream {
    pub async fn next_chunk(&mut self) -> anyhow::Result<Option<Bytes>> {
        self.response
            .chunk()
            .await
            .context("reading the log stream from the coordinator")
    }

    /// Copies the stream into `out`, flushing after every chunk so a
    /// follower sees lines as they arrive. Returns the bytes copied.
    pub async fn copy_to(mut self, out: &mut impl Write) -> anyhow::Result<u64> {
        let mut total = 0;
        while let Some(chunk) = self.next_chunk().await? {
            out.write_all(&chunk)?;
            out.flush()?;
            total += chunk.len() as u64;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_renders_message_and_field() {
        let body = br#"{"error":{"code":"invalid_argument","message":"must not be empty","field":"command"}}"#;
        let failure = api_failure(StatusCode::BAD_REQUEST, body);
        assert_eq!(failure.to_string(), "must not be empty (field: command)");
        assert!(failure.is_validation());
    }

    #[test]
    fn error_body_without_field_renders_message_only() {
        let body = br#"{"error":{"code":"not_found","message":"job 01X not found"}}"#;
        let failure = api_failure(StatusCode::NOT_FOUND, body);
        assert_eq!(failure.to_string(), "job 01X not found");
        assert!(!failure.is_validation());
    }

    #[test]
    fn non_json_error_body_is_summarised_with_the_status() {
        let failure = api_failure(StatusCode::BAD_GATEWAY, b"<html>upstream down</html>");
        assert_eq!(
            failure.to_string(),
            "the coordinator answered 502 Bad Gateway: <html>upstream down</html>"
        );
        assert_eq!(failure.error.code, ErrorCode::Internal);
    }

    #[test]
    fn path_segments_are_escaped_and_base_paths_kept() {
        let client = Client::new("http://h:1/prefix/", None).unwrap();
        assert_eq!(
            client.url(&["v1", "agents", "a/b c", "drain"]).as_str(),
            "http://h:1/prefix/v1/agents/a%2Fb%20c/drain"
        );
        let client = Client::new("127.0.0.1:7080", None).unwrap();
        assert_eq!(
            client.url(&["v1", "jobs"]).as_str(),
            "http://127.0.0.1:7080/v1/jobs"
        );
    }

    #[test]
    fn debug_output_hides_the_token() {
        let client = Client::new("http://h:1", Some("s3cret-token".into())).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("s3cret-token"), "{shown}");
    }

    #[test]
    fn bad_addresses_are_rejected() {
        assert!(Client::new("ftp://h", None).is_err());
        assert!(Client::new("http://", None).is_err());
    }
}
