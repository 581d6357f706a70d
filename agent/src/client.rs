//! The agent's side of the AgentService: one channel, the session token on
//! every call, and errors classified into what the agent must do about them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    reports: Arc<Reports>,
}

/// Reports one `Report` call carries at most (the coordinator's limit).
const MAX_REPORTS: usize = 256;

/// Starts and completions on their way to the coordinator. Sent one
/// `Report` call at a time: under load each call carries everything that
/// queued while the previous one was in flight, so a busy agent makes one
/// round trip (and the coordinator one store transaction) for many jobs,
/// while a lone report still goes out at once.
#[derive(Default)]
struct Reports {
    queue: Mutex<ReportQueue>,
    /// Set once the coordinator answered UNIMPLEMENTED (older than
    /// `Report`): every report is its own call from then on.
    unary: AtomicBool,
}

#[derive(Default)]
struct ReportQueue {
    items: Vec<Queued>,
    /// Whether a task is sending (it empties the queue before it ends).
    sending: bool,
}

impl Reports {
    fn queue(&self) -> std::sync::MutexGuard<'_, ReportQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Queued {
    auth: Auth,
    report: v1::report::Report,
    reply: tokio::sync::oneshot::Sender<Result<String, CallError>>,
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
            reports: Arc::new(Reports::default()),
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

    /// LEASED -> RUNNING. Fenced; sent with other reports (see [`Reports`]).
    pub async fn report_started(&self, auth: &Auth, lease: v1::LeaseRef) -> Result<(), CallError> {
        let started = v1::ReportStartedRequest { lease: Some(lease) };
        self.report(auth, v1::report::Report::Started(started))
            .await
            .map(|_| ())
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

    /// Records the attempt's outcome; answers the job's state after it.
    /// Fenced and idempotent; sent with other reports (see [`Reports`]).
    pub async fn complete(
        &self,
        auth: &Auth,
        msg: v1::CompleteRequest,
    ) -> Result<String, CallError> {
        self.report(auth, v1::report::Report::Complete(msg)).await
    }

    /// Queues a report and waits for its answer. The first report of a
    /// quiet moment goes out at once; what queues while it is in flight
    /// goes out together in the next `Report` call.
    async fn report(&self, auth: &Auth, report: v1::report::Report) -> Result<String, CallError> {
        if self.reports.unary.load(Ordering::Relaxed) {
            return self.report_alone(auth, report).await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = self.reports.queue();
            queue.items.push(Queued {
                auth: auth.clone(),
                report,
                reply,
            });
            !std::mem::replace(&mut queue.sending, true)
        };
        if start {
            tokio::spawn(self.clone().send_reports());
        }
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Transient {
                url: self.url.clone(),
                code: Code::Aborted,
                message: "the report was dropped before it was sent".into(),
            })
        })
    }

    /// Sends queued reports, a `Report` call per session at a time, until
    /// the queue is empty.
    async fn send_reports(self) {
        loop {
            let batch = {
                let mut queue = self.reports.queue();
                if queue.items.is_empty() {
                    queue.sending = false;
                    return;
                }
                let n = queue.items.len().min(MAX_REPORTS);
                queue.items.drain(..n).collect::<Vec<_>>()
            };
            // Reports of one session go together (a re-registered agent
            // may still have some of its old session's in the queue).
            let mut sessions: Vec<(Auth, Vec<Queued>)> = Vec::new();
            for item in batch {
                match sessions
                    .iter_mut()
                    .find(|(auth, _)| auth.session_id == item.auth.session_id)
                {
                    Some((_, items)) => items.push(item),
                    None => sessions.push((item.auth.clone(), vec![item])),
                }
            }
            for (auth, items) in sessions {
                self.send_batch(&auth, items).await;
            }
        }
    }

    async fn send_batch(&self, auth: &Auth, items: Vec<Queued>) {
        let msg = v1::ReportRequest {
            session_id: auth.session_id.clone(),
            reports: items
                .iter()
                .map(|i| v1::Report {
                    report: Some(i.report.clone()),
                })
                .collect(),
        };
        let req = self.request(Some(auth), msg, CALL_TIMEOUT);
        match self.inner.clone().report(req).await {
            Ok(answer) => {
                let mut results = answer.into_inner().results.into_iter();
                for item in items {
                    let result = match results.next() {
                        Some(r) if r.code == Code::Ok as i32 => Ok(r.state),
                        Some(r) => Err(self.err(Status::new(Code::from(r.code), r.message), true)),
                        None => Err(CallError::Transient {
                            url: self.url.clone(),
                            code: Code::Internal,
                            message: "the coordinator answered fewer reports than it was sent"
                                .into(),
                        }),
                    };
                    let _ = item.reply.send(result);
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                // A coordinator from before `Report`: one call per report
                // from now on.
                tracing::info!("the coordinator does not take Report calls; sending starts and completions one by one");
                self.reports.unary.store(true, Ordering::Relaxed);
                for item in items {
                    let client = self.clone();
                    let auth = item.auth.clone();
                    tokio::spawn(async move {
                        let result = client.report_alone(&auth, item.report).await;
                        let _ = item.reply.send(result);
                    });
                }
            }
            Err(status) => {
                for item in items {
                    let _ = item.reply.send(Err(self.err(status.clone(), true)));
                }
            }
        }
    }

    /// A report as its own call (`ReportStarted` or `Complete`).
    async fn report_alone(
        &self,
        auth: &Auth,
        report: v1::report::Report,
    ) -> Result<String, CallError> {
        match report {
            v1::report::Report::Started(msg) => {
                let req = self.request(Some(auth), msg, CALL_TIMEOUT);
                self.inner
                    .clone()
                    .report_started(req)
                    .await
                    .map(|_| String::new())
                    .map_err(|s| self.err(s, true))
            }
            v1::report::Report::Complete(msg) => {
                let req = self.request(Some(auth), msg, CALL_TIMEOUT);
                self.inner
                    .clone()
                    .complete(req)
                    .await
                    .map(|r| r.into_inner().state)
                    .map_err(|s| self.err(s, true))
            }
        }
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

    /// A coordinator that records the reports it gets. `batching`: it
    /// takes `Report` calls, holding the first until `gate` opens;
    /// otherwise it is older than `Report` and answers UNIMPLEMENTED.
    struct Recorder {
        batching: bool,
        gate: Arc<tokio::sync::Semaphore>,
        /// Reports per `Report` call, and calls of the single forms.
        report_calls: Mutex<Vec<usize>>,
        single_calls: Mutex<Vec<&'static str>>,
    }

    struct Fake(Arc<Recorder>);

    fn unimplemented<T>() -> Result<tonic::Response<T>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    #[tonic::async_trait]
    impl v1::agent_service_server::AgentService for Fake {
        async fn register(
            &self,
            _: Request<v1::RegisterRequest>,
        ) -> Result<tonic::Response<v1::RegisterResponse>, Status> {
            unimplemented()
        }
        async fn claim(
            &self,
            _: Request<v1::ClaimRequest>,
        ) -> Result<tonic::Response<v1::ClaimResponse>, Status> {
            unimplemented()
        }
        async fn heartbeat(
            &self,
            _: Request<v1::HeartbeatRequest>,
        ) -> Result<tonic::Response<v1::HeartbeatResponse>, Status> {
            unimplemented()
        }
        type CommandsStream = futures::stream::Empty<Result<v1::Command, Status>>;
        async fn commands(
            &self,
            _: Request<v1::CommandsRequest>,
        ) -> Result<tonic::Response<Self::CommandsStream>, Status> {
            unimplemented()
        }
        async fn report_started(
            &self,
            _: Request<v1::ReportStartedRequest>,
        ) -> Result<tonic::Response<v1::ReportStartedResponse>, Status> {
            self.0.single_calls.lock().unwrap().push("ReportStarted");
            Ok(tonic::Response::new(v1::ReportStartedResponse {}))
        }
        async fn append_logs(
            &self,
            _: Request<v1::AppendLogsRequest>,
        ) -> Result<tonic::Response<v1::AppendLogsResponse>, Status> {
            unimplemented()
        }
        async fn artifact_upload_url(
            &self,
            _: Request<v1::ArtifactUploadUrlRequest>,
        ) -> Result<tonic::Response<v1::ArtifactUploadUrlResponse>, Status> {
            unimplemented()
        }
        async fn complete(
            &self,
            _: Request<v1::CompleteRequest>,
        ) -> Result<tonic::Response<v1::CompleteResponse>, Status> {
            self.0.single_calls.lock().unwrap().push("Complete");
            Ok(tonic::Response::new(v1::CompleteResponse {
                state: "SUCCEEDED".into(),
            }))
        }
        async fn report(
            &self,
            req: Request<v1::ReportRequest>,
        ) -> Result<tonic::Response<v1::ReportResponse>, Status> {
            if !self.0.batching {
                return unimplemented();
            }
            let first = {
                let mut calls = self.0.report_calls.lock().unwrap();
                calls.push(req.get_ref().reports.len());
                calls.len() == 1
            };
            if first {
                let _ = self.0.gate.acquire().await.unwrap();
            }
            // A job of its own fails on its lease; the others succeed.
            let results = req
                .into_inner()
                .reports
                .into_iter()
                .map(|r| match r.report {
                    Some(v1::report::Report::Complete(c))
                        if c.lease.as_ref().is_some_and(|l| l.job_id == "lost") =>
                    {
                        v1::ReportResult {
                            code: Code::FailedPrecondition as i32,
                            message: "lease lost".into(),
                            state: String::new(),
                        }
                    }
                    _ => v1::ReportResult {
                        code: 0,
                        message: String::new(),
                        state: "SUCCEEDED".into(),
                    },
                })
                .collect();
            Ok(tonic::Response::new(v1::ReportResponse { results }))
        }
        async fn leave(
            &self,
            _: Request<v1::LeaveRequest>,
        ) -> Result<tonic::Response<v1::LeaveResponse>, Status> {
            unimplemented()
        }
    }

    async fn recorder(batching: bool) -> (Arc<Recorder>, Client) {
        let recorder = Arc::new(Recorder {
            batching,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            report_calls: Mutex::new(Vec::new()),
            single_calls: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let service = v1::agent_service_server::AgentServiceServer::new(Fake(recorder.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        (
            recorder,
            Client::new(&format!("http://{addr}"), None).unwrap(),
        )
    }

    fn lease(job: &str) -> v1::LeaseRef {
        v1::LeaseRef {
            job_id: job.into(),
            attempt: 1,
            session_id: "s1".into(),
        }
    }

    fn completion(job: &str) -> v1::CompleteRequest {
        v1::CompleteRequest {
            lease: Some(lease(job)),
            outcome: v1::Outcome::Succeeded as i32,
            exit_code: Some(0),
            reason: String::new(),
        }
    }

    const AUTH: fn() -> Auth = || Auth {
        session_id: "s1".into(),
        token: "t".into(),
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_queued_behind_one_in_flight_go_out_together_each_answered_alone() {
        let (recorder, client) = recorder(true).await;
        let first = {
            let client = client.clone();
            tokio::spawn(async move { client.report_started(&AUTH(), lease("a")).await })
        };
        while recorder.report_calls.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // While the first call is held, nine more queue up.
        let queued: Vec<_> = (0..9)
            .map(|i| {
                let client = client.clone();
                let job = if i == 4 {
                    "lost".to_string()
                } else {
                    format!("j{i}")
                };
                tokio::spawn(async move { client.complete(&AUTH(), completion(&job)).await })
            })
            .collect();
        while client.reports.queue().items.len() < 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        recorder.gate.add_permits(1);
        first.await.unwrap().unwrap();
        for (i, done) in futures::future::join_all(queued)
            .await
            .into_iter()
            .enumerate()
        {
            match done.unwrap() {
                Ok(state) => assert!(i != 4 && state == "SUCCEEDED", "{i}: {state}"),
                Err(e) => assert!(i == 4 && matches!(e, CallError::LeaseLost(_)), "{i}: {e}"),
            }
        }
        assert_eq!(*recorder.report_calls.lock().unwrap(), [1, 9]);
        assert!(recorder.single_calls.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_coordinator_without_report_gets_each_report_as_its_own_call() {
        let (recorder, client) = recorder(false).await;
        client.report_started(&AUTH(), lease("a")).await.unwrap();
        assert_eq!(
            client.complete(&AUTH(), completion("a")).await.unwrap(),
            "SUCCEEDED"
        );
        client.complete(&AUTH(), completion("b")).await.unwrap();
        assert_eq!(
            *recorder.single_calls.lock().unwrap(),
            ["ReportStarted", "Complete", "Complete"]
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
