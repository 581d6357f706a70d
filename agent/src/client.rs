//! The agent's side of the AgentService: one channel, the session token on
//! every call, and errors classified into what the agent must do about them.

use std::path::Path;
use std::time::Duration;

use drover_proto::v1;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// Longest a unary call may take before it counts as a transient failure.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent's private CA comes from, for messages.
pub const CA_SETTING: &str = "tls_ca_file (DROVER_TLS_CA_FILE)";

/// Why the client cannot be built: a setting, not the network.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("coordinator URL {url:?} is invalid: {message} (DROVER_COORDINATOR)")]
    BadUrl { url: String, message: String },
    #[error(transparent)]
    Ca(#[from] drover_proto::tls::PemFileError),
    #[error("cannot set up TLS for {url} with {CA_SETTING}: {message}")]
    Tls { url: String, message: String },
}

/// What went wrong with a call, by what the agent does next.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Network or coordinator trouble: retry with backoff.
    #[error("cannot reach coordinator at {url}: {message} — is drover-coordinator running? (DROVER_COORDINATOR)")]
    Unreachable { url: String, message: String },
    /// The TLS handshake failed (an untrusted certificate, plain HTTP on
    /// the other end): retried, as the coordinator's side may be fixed.
    #[error("cannot talk to coordinator at {url}: {message}")]
    Tls { url: String, message: String },
    #[error("coordinator at {url} failed transiently ({code:?}): {message}")]
    Transient {
        url: String,
        code: Code,
        message: String,
    },
    /// FAILED_PRECONDITION: the lease is no longer ours. Kill, never complete.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// UNAUTHENTICATED (or NOT_FOUND for the session): the session is gone.
    /// Fence: kill everything and register again.
    #[error("session is no longer valid: {0}")]
    SessionGone(String),
    /// The coordinator rejected the request; retrying the same call is futile.
    #[error("coordinator rejected the call ({code:?}): {message}")]
    Rejected { code: Code, message: String },
}

impl CallError {
    pub fn from_status(url: &str, status: Status, job_call: bool) -> CallError {
        // Connection failures: a TLS handshake that failed, or plaintext
        // to a TLS port (the server drops it), say what to change.
        // (A TLS alert read as HTTP/2 can also surface as an h2 protocol
        // error, `Internal`.)
        if matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ) {
            if let Some(message) = drover_proto::tls::diagnose(&status, url, CA_SETTING) {
                return CallError::Tls {
                    url: url.to_string(),
                    message,
                };
            }
        }
        let message = status.message().to_string();
        match status.code() {
            Code::Unavailable => CallError::Unreachable {
                url: url.to_string(),
                message: if message.is_empty() {
                    "unavailable".to_string()
                } else {
                    message
                },
            },
            Code::FailedPrecondition => CallError::LeaseLost(message),
            Code::Unauthenticated => CallError::SessionGone(message),
            // For job calls NOT_FOUND means the job or lease is gone; for
            // session calls, the session is.
            Code::NotFound if job_call => CallError::LeaseLost(message),
            Code::NotFound => CallError::SessionGone(message),
            code @ (Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled) => CallError::Transient {
                url: url.to_string(),
                code,
                message,
            },
            code => CallError::Rejected { code, message },
        }
    }

    /// Worth retrying the same call.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CallError::Unreachable { .. } | CallError::Transient { .. } | CallError::Tls { .. }
        )
    }
}

/// A cheap-to-clone handle on the coordinator, and an HTTP client for the
/// URLs it signs (its own blob routes or S3), trusting the same CAs.
#[derive(Clone)]
pub struct Client {
    url: String,
    inner: AgentServiceClient<Channel>,
    http: reqwest::Client,
}

/// The session a call acts for.
#[derive(Debug, Clone)]
pub struct Auth {
    pub session_id: String,
    pub token: String,
}

impl Client {
    /// Connects lazily: an unreachable coordinator shows up as call errors,
    /// which the loops retry. An https URL trusts the public web PKI roots
    /// and the CA certificates of `ca_file`, if given.
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<Client, SetupError> {
        let ca = ca_file
            .map(|path| drover_proto::tls::read_certificates(path, CA_SETTING))
            .transpose()?;
        let tls_error = |message: String| SetupError::Tls {
            url: url.to_string(),
            message,
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| SetupError::BadUrl {
                url: url.to_string(),
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &ca {
                tls = tls.ca_certificate(Certificate::from_pem(&ca.pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| tls_error(e.to_string()))?;
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // No overall timeout: archives can be large. Stalls are caught
            // by the read timeout.
            .read_timeout(Duration::from_secs(60));
        for cert in ca.iter().flat_map(|ca| &ca.certs) {
            let cert =
                reqwest::Certificate::from_der(cert).map_err(|e| tls_error(e.to_string()))?;
            http = http.add_root_certificate(cert);
        }
        Ok(Client {
            url: url.to_string(),
            inner: AgentServiceClient::new(endpoint.connect_lazy()),
            http: http.build().map_err(|e| tls_error(e.to_string()))?,
        })
    }

    /// For the signed artifact URLs the coordinator hands out.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn request<T>(&self, auth: Option<&Auth>, msg: T, timeout: Duration) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(timeout);
        if let Some(auth) = auth {
            if let Ok(value) = MetadataValue::try_from(format!("Bearer {}", auth.token)) {
                req.metadata_mut().insert("authorization", value);
            }
        }
        req
    }

    fn err(&self, status: Status, job_call: bool) -> CallError {
        CallError::from_status(&self.url, status, job_call)
    }

    pub async fn register(
        &self,
        msg: v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, CallError> {
        let req = self.request(None, msg, CALL_TIMEOUT);
        self.inner
            .clone()
            .register(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, false))
    }

    pub async fn claim(
        &self,
        auth: &Auth,
        msg: v1::ClaimRequest,
    ) -> Result<v1::ClaimResponse, CallError> {
        let timeout = Duration::from_millis(msg.wait_ms) + CALL_TIMEOUT;
        let req = self.request(Some(auth), msg, timeout);
        self.inner
            .clone()
            .claim(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, false))
    }

    pub async fn heartbeat(
        &self,
        auth: &Auth,
        msg: v1::HeartbeatRequest,
        timeout: Duration,
    ) -> Result<v1::HeartbeatResponse, CallError> {
        let req = self.request(Some(auth), msg, timeout);
        self.inner
            .clone()
            .heartbeat(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, false))
    }

    pub async fn commands(&self, auth: &Auth) -> Result<tonic::Streaming<v1::Command>, CallError> {
        let mut req = Request::new(v1::CommandsRequest {
            session_id: auth.session_id.clone(),
        });
        if let Ok(value) = MetadataValue::try_from(format!("Bearer {}", auth.token)) {
            req.metadata_mut().insert("authorization", value);
        }
        self.inner
            .clone()
            .commands(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, false))
    }

    pub async fn report_started(&self, auth: &Auth, lease: v1::LeaseRef) -> Result<(), CallError> {
        let req = self.request(
            Some(auth),
            v1::ReportStartedRequest { lease: Some(lease) },
            CALL_TIMEOUT,
        );
        self.inner
            .clone()
            .report_started(req)
            .await
            .map(|_| ())
            .map_err(|s| self.err(s, true))
    }

    /// A signed URL to PUT the attempt's artifact to. Fenced.
    pub async fn artifact_upload_url(
        &self,
        auth: &Auth,
        lease: v1::LeaseRef,
    ) -> Result<v1::ArtifactUploadUrlResponse, CallError> {
        let req = self.request(
            Some(auth),
            v1::ArtifactUploadUrlRequest { lease: Some(lease) },
            CALL_TIMEOUT,
        );
        self.inner
            .clone()
            .artifact_upload_url(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, true))
    }

    /// Stored and durable lengths after the append, and where to resend
    /// from when the coordinator lost output it had accepted (not an error).
    pub async fn append_logs(
        &self,
        auth: &Auth,
        msg: v1::AppendLogsRequest,
    ) -> Result<v1::AppendLogsResponse, CallError> {
        let req = self.request(Some(auth), msg, CALL_TIMEOUT);
        self.inner
            .clone()
            .append_logs(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s, true))
    }

    pub async fn complete(
        &self,
        auth: &Auth,
        msg: v1::CompleteRequest,
    ) -> Result<String, CallError> {
        let req = self.request(Some(auth), msg, CALL_TIMEOUT);
        self.inner
            .clone()
            .complete(req)
            .await
            .map(|r| r.into_inner().state)
            .map_err(|s| self.err(s, true))
    }

    pub async fn leave(&self, auth: &Auth) -> Result<u32, CallError> {
        let req = self.request(
            Some(auth),
            v1::LeaveRequest {
                session_id: auth.session_id.clone(),
            },
            CALL_TIMEOUT,
        );
        self.inner
            .clone()
            .leave(req)
            .await
            .map(|r| r.into_inner().requeued)
            .map_err(|s| self.err(s, false))
    }
}

/// Exponential backoff with jitter, for retries of one kind of call.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt: doubles up to `max`, ±25 % jitter.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        base.mul_f64(jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_what_the_agent_does() {
        let url = "http://c:7070";
        let e = |code, job| CallError::from_status(url, Status::new(code, "m"), job);
        assert!(matches!(
            e(Code::FailedPrecondition, true),
            CallError::LeaseLost(_)
        ));
        assert!(matches!(
            e(Code::Unauthenticated, false),
            CallError::SessionGone(_)
        ));
        assert!(matches!(
            e(Code::NotFound, false),
            CallError::SessionGone(_)
        ));
        assert!(matches!(e(Code::NotFound, true), CallError::LeaseLost(_)));
        assert!(e(Code::Unavailable, true).is_transient());
        assert!(e(Code::DeadlineExceeded, true).is_transient());
        assert!(!e(Code::InvalidArgument, true).is_transient());
        let msg = e(Code::Unavailable, false).to_string();
        assert!(
            msg.contains("http://c:7070") && msg.contains("DROVER_COORDINATOR"),
            "{msg}"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(125));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        assert!(b.next_delay() >= Duration::from_millis(3750));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
