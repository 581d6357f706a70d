//! The tonic AgentService: a thin adapter over [`Service`]. Each call names a
//! session and must carry its token as `authorization: Bearer <token>`.

use std::pin::Pin;
use std::sync::Arc;

use drover_proto::v1::{self, agent_service_server::AgentService};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::service::{
    lease_from_wire, lease_to_wire, resources_from_wire, resources_to_wire, Service,
};
use crate::store::{Completion, OutcomeKind, SessionAuth};

pub struct AgentGrpc {
    service: Arc<Service>,
}

impl AgentGrpc {
    pub fn new(service: Arc<Service>) -> Self {
        AgentGrpc { service }
    }

    pub fn into_server(self) -> v1::agent_service_server::AgentServiceServer<AgentGrpc> {
        v1::agent_service_server::AgentServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    async fn session<T>(&self, req: &Request<T>, session_id: &str) -> Result<SessionAuth, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        Ok(self.service.authenticate(session_id, token).await?)
    }

    /// Authenticates the session a lease names.
    async fn lease_session<T>(
        &self,
        req: &Request<T>,
        lease: &Option<v1::LeaseRef>,
    ) -> Result<crate::store::LeaseRef, Status> {
        let lease = lease_from_wire(lease.clone())?;
        self.session(req, &lease.session_id).await?;
        Ok(lease)
    }
}

/// Reports one `Report` call may carry.
const MAX_REPORTS: usize = 256;

/// The calls a `Report` batches, shared with their unary forms.
impl AgentGrpc {
    async fn started(
        &self,
        session: &SessionAuth,
        lease: &crate::store::LeaseRef,
    ) -> Result<(), Status> {
        Ok(self.service.report_started(session, lease).await?)
    }

    async fn completed(
        &self,
        lease: crate::store::LeaseRef,
        body: v1::CompleteRequest,
    ) -> Result<drover_proto::model::JobState, Status> {
        let outcome = match v1::Outcome::try_from(body.outcome) {
            Ok(v1::Outcome::Succeeded) => OutcomeKind::Succeeded,
            Ok(v1::Outcome::Failed) => OutcomeKind::Failed,
            Ok(v1::Outcome::Cancelled) => OutcomeKind::Cancelled,
            Ok(v1::Outcome::TimedOut) => OutcomeKind::TimedOut,
            Ok(v1::Outcome::Interrupted) => OutcomeKind::Interrupted,
            _ => {
                return Err(ServiceError::invalid(
                    "outcome",
                    "must be one of SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, INTERRUPTED",
                )
                .into())
            }
        };
        let reason = if body.reason.is_empty() {
            match body.exit_code {
                Some(code) => format!("exit code {code}"),
                None => outcome.as_str().to_string(),
            }
        } else {
            body.reason.chars().take(1024).collect()
        };
        Ok(self
            .service
            .complete(
                &lease,
                Completion {
                    outcome,
                    exit_code: body.exit_code,
                    reason,
                },
            )
            .await?)
    }

    /// One report of a `Report` call, answered as its own call would be.
    async fn one_report(
        &self,
        session: &SessionAuth,
        index: usize,
        report: v1::Report,
    ) -> v1::ReportResult {
        let field = |name: &str| format!("reports[{index}].{name}");
        let lease_of = |lease: Option<v1::LeaseRef>, name: &str| {
            let lease = lease_from_wire(lease).map_err(|_| {
                Status::invalid_argument(format!(
                    "{}: must name job_id, attempt (≥ 1) and session_id",
                    field(name)
                ))
            })?;
            if lease.session_id != session.session_id {
                return Err(Status::invalid_argument(format!(
                    "{}: names session {}, not the call's session {}; send each session's reports with its own token",
                    field(name),
                    lease.session_id,
                    session.session_id
                )));
            }
            Ok(lease)
        };
        let done = match report.report {
            Some(v1::report::Report::Started(started)) => {
                match lease_of(started.lease, "started.lease") {
                    Ok(lease) => self.started(session, &lease).await.map(|()| String::new()),
                    Err(e) => Err(e),
                }
            }
            Some(v1::report::Report::Complete(body)) => {
                match lease_of(body.lease.clone(), "complete.lease") {
                    Ok(lease) => self
                        .completed(lease, body)
                        .await
                        .map(|state| state.as_str().to_string()),
                    Err(e) => Err(e),
                }
            }
            None => Err(Status::invalid_argument(format!(
                "{}: empty; set started or complete",
                field("report")
            ))),
        };
        match done {
            Ok(state) => v1::ReportResult {
                code: tonic::Code::Ok as i32,
                message: String::new(),
                state,
            },
            Err(status) => v1::ReportResult {
                code: status.code() as i32,
                message: status.message().to_string(),
                state: String::new(),
            },
        }
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<v1::Command, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(
            self.service.register(req.into_inner()).await?,
        ))
    }

    async fn claim(
        &self,
        req: Request<v1::ClaimRequest>,
    ) -> Result<Response<v1::ClaimResponse>, Status> {
        let session = self.session(&req, &req.get_ref().session_id).await?;
        let body = req.into_inner();
        let free = resources_from_wire(body.free.unwrap_or_default());
        let claimed = self
            .service
            .claim(&session, free, body.max_jobs, body.wait_ms)
            .await?;
        let kill_grace_ms = self.service.config().kill_grace_ms;
        let mut leases = Vec::with_capacity(claimed.len());
        for c in claimed {
            let spec = c.spec;
            let inputs = if spec.inputs.is_empty() {
                Vec::new()
            } else {
                self.service.input_artifacts(&spec).await
            };
            leases.push(v1::Lease {
                lease: Some(lease_to_wire(&c.lease)),
                job: Some(v1::JobPayload {
                    command: spec.argv(),
                    secret_env: spec
                        .env
                        .iter()
                        .filter(|(_, v)| v.is_secret())
                        .map(|(k, _)| k.clone())
                        .collect(),
                    env: spec
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.value().to_string()))
                        .collect(),
                    name: spec.name,
                    image: spec.image,
                    workdir: spec.workdir,
                    user: spec.user,
                    resources: Some(resources_to_wire(&spec.resources)),
                    cpu_hard_limit: spec.cpu_hard_limit,
                    timeout_ms: spec.timeout_secs * 1000,
                    kill_grace_ms,
                    inputs,
                    outputs: spec.outputs,
                    pull_policy: spec
                        .pull_policy
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                }),
            });
        }
        Ok(Response::new(v1::ClaimResponse { leases }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let session = self.session(&req, &req.get_ref().session_id).await?;
        let body = req.into_inner();
        let running = body
            .running
            .into_iter()
            .map(|l| lease_from_wire(Some(l)))
            .collect::<Result<Vec<_>, _>>()?;
        let answer = self
            .service
            .heartbeat(&session, running, body.draining)
            .await?;
        Ok(Response::new(v1::HeartbeatResponse {
            session_remaining_ms: answer.remaining_ms,
            cancel: answer.cancel.iter().map(lease_to_wire).collect(),
            lost: answer
                .lost
                .iter()
                .chain(answer.requeued_unreported.iter())
                .map(lease_to_wire)
                .collect(),
            drain: answer.drain,
            heartbeat_interval_ms: self.service.config().heartbeat_interval_ms,
        }))
    }

    type CommandsStream = CommandStream;

    async fn commands(
        &self,
        req: Request<v1::CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let session = self.session(&req, &req.get_ref().session_id).await?;
        let rx = self.service.subscribe_commands(&session.session_id)?;
        let stream =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_started(
        &self,
        req: Request<v1::ReportStartedRequest>,
    ) -> Result<Response<v1::ReportStartedResponse>, Status> {
        let lease = lease_from_wire(req.get_ref().lease.clone())?;
        let session = self.session(&req, &lease.session_id).await?;
        self.started(&session, &lease).await?;
        Ok(Response::new(v1::ReportStartedResponse {}))
    }

    async fn append_logs(
        &self,
        req: Request<v1::AppendLogsRequest>,
    ) -> Result<Response<v1::AppendLogsResponse>, Status> {
        let lease = self.lease_session(&req, &req.get_ref().lease).await?;
        let req = req.into_inner();
        let appended = self
            .service
            .append_logs(&lease, req.chunks, req.flush)
            .await?;
        Ok(Response::new(v1::AppendLogsResponse {
            stored_bytes: appended.stored,
            durable_bytes: appended.durable,
            resend_from: appended.resend_from,
        }))
    }

    async fn artifact_upload_url(
        &self,
        req: Request<v1::ArtifactUploadUrlRequest>,
    ) -> Result<Response<v1::ArtifactUploadUrlResponse>, Status> {
        let lease = self.lease_session(&req, &req.get_ref().lease).await?;
        let upload = self.service.artifact_upload_url(&lease).await?;
        Ok(Response::new(v1::ArtifactUploadUrlResponse {
            url: upload.url,
            expires_at_ms: upload.expires_at_ms.max(0) as u64,
            max_bytes: upload.max_bytes,
        }))
    }

    async fn complete(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let lease = self.lease_session(&req, &req.get_ref().lease).await?;
        let state = self.completed(lease, req.into_inner()).await?;
        Ok(Response::new(v1::CompleteResponse {
            state: state.as_str().to_string(),
        }))
    }

    async fn report(
        &self,
        req: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let session = self.session(&req, &req.get_ref().session_id).await?;
        let reports = req.into_inner().reports;
        if reports.len() > MAX_REPORTS {
            return Err(ServiceError::invalid(
                "reports",
                format!(
                    "holds {} reports; send at most {MAX_REPORTS} per call",
                    reports.len()
                ),
            )
            .into());
        }
        Metrics::inc(&self.service.metrics.report_calls);
        self.service
            .metrics
            .reports
            .fetch_add(reports.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // All at once: the store takes what arrives together into one
        // transaction.
        let results = futures::future::join_all(
            reports
                .into_iter()
                .enumerate()
                .map(|(i, report)| self.one_report(&session, i, report)),
        )
        .await;
        Ok(Response::new(v1::ReportResponse { results }))
    }
    async fn leave(
        &self,
        req: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveResponse>, Status> {
        let session = self.session(&req, &req.get_ref().session_id).await?;
        let requeued = self.service.leave(&session).await?;
        Ok(Response::new(v1::LeaveResponse { requeued }))
    }
}
