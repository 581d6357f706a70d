//! The agent against an in-process fake coordinator that follows the
//! agent.proto contract (auth metadata, fencing, offset de-duplication).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent::{Agent, AgentConfig};
use drover_proto::v1;
use drover_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

const PATIENCE: Duration = Duration::from_secs(30);
const TOKEN: &str = "join-secret";

#[derive(Default)]
struct FakeState {
    queue: VecDeque<v1::Lease>,
    registers: u32,
    session: String,
    logs: HashMap<String, Vec<u8>>,
    started: Vec<String>,
    completed: Vec<v1::CompleteRequest>,
    cancel_next: Vec<v1::LeaseRef>,
    heartbeats_ok: u32,
    fail_heartbeats: bool,
    remaining_ms: u64,
    left: bool,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let want = format!("Bearer tok-{}", self.st().session);
        match req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(got) if got == want => Ok(()),
            _ => Err(Status::unauthenticated("bad session token")),
        }
    }

    fn push_job(&self, job_id: &str, argv: &[&str], env: &[(&str, &str)]) {
        let mut st = self.st();
        let lease = v1::LeaseRef {
            job_id: job_id.into(),
            attempt: 1,
            session_id: String::new(),
        };
        st.queue.push_back(v1::Lease {
            lease: Some(lease),
            job: Some(v1::JobPayload {
                name: job_id.into(),
                command: argv.iter().map(|s| s.to_string()).collect(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                kill_grace_ms: 200,
                resources: Some(v1::Resources {
                    cpu_millis: 100,
                    memory_mib: 10,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
    }

    fn completion(&self, job_id: &str) -> Option<v1::CompleteRequest> {
        self.st()
            .completed
            .iter()
            .find(|c| c.lease.as_ref().unwrap().job_id == job_id)
            .cloned()
    }
}

type CommandStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::Command, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Fake {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let req = req.into_inner();
        if req.join_token != TOKEN {
            return Err(Status::unauthenticated("unknown join token"));
        }
        let agent = req.agent.unwrap();
        assert_eq!(
            agent.labels.get("platform").map(String::as_str),
            Some("local")
        );
        assert_eq!(agent.runtime, "process");
        let mut st = self.st();
        st.registers += 1;
        st.session = format!("s{}", st.registers);
        Ok(Response::new(v1::RegisterResponse {
            session_id: st.session.clone(),
            session_token: format!("tok-{}", st.session),
            heartbeat_interval_ms: 100,
            session_ttl_ms: 60_000,
            resumed: false,
            leases: vec![],
        }))
    }

    async fn claim(
        &self,
        req: Request<v1::ClaimRequest>,
    ) -> Result<Response<v1::ClaimResponse>, Status> {
        self.check(&req)?;
        let max = req.get_ref().max_jobs as usize;
        let session = self.st().session.clone();
        let mut leases = vec![];
        {
            let mut st = self.st();
            while leases.len() < max {
                let Some(mut lease) = st.queue.pop_front() else {
                    break;
                };
                lease.lease.as_mut().unwrap().session_id = session.clone();
                leases.push(lease);
            }
        }
        if leases.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Response::new(v1::ClaimResponse { leases }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.check(&req)?;
        let mut st = self.st();
        if st.fail_heartbeats {
            return Err(Status::unavailable("partitioned"));
        }
        st.heartbeats_ok += 1;
        let remaining = if st.remaining_ms == 0 {
            60_000
        } else {
            st.remaining_ms
        };
        Ok(Response::new(v1::HeartbeatResponse {
            session_remaining_ms: remaining,
            cancel: std::mem::take(&mut st.cancel_next),
            lost: vec![],
            drain: false,
            heartbeat_interval_ms: 100,
        }))
    }

    type CommandsStream = CommandStream;

    async fn commands(
        &self,
        req: Request<v1::CommandsRequest>,
    ) -> Result<Response<CommandStream>, Status> {
        self.check(&req)?;
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }

    async fn report_started(
        &self,
        req: Request<v1::ReportStartedRequest>,
    ) -> Result<Response<v1::ReportStartedResponse>, Status> {
        self.check(&req)?;
        let job = req.into_inner().lease.unwrap().job_id;
        self.st().started.push(job);
        Ok(Response::new(v1::ReportStartedResponse {}))
    }

    async fn append_logs(
        &self,
        req: Request<v1::AppendLogsRequest>,
    ) -> Result<Response<v1::AppendLogsResponse>, Status> {
        self.check(&req)?;
        let req = req.into_inner();
        let job = req.lease.unwrap().job_id;
        let mut st = self.st();
        let log = st.logs.entry(job).or_default();
        for chunk in req.chunks {
            let end = chunk.offset as usize + chunk.data.len();
            assert!(
                chunk.offset as usize <= log.len(),
                "a gap in the log offsets"
            );
            if end > log.len() {
                let skip = log.len() - chunk.offset as usize;
                log.extend_from_slice(&chunk.data[skip..]);
            }
        }
        Ok(Response::new(v1::AppendLogsResponse {
            stored_bytes: log.len() as u64,
        }))
    }

    async fn complete(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        self.check(&req)?;
        self.st().completed.push(req.into_inner());
        Ok(Response::new(v1::CompleteResponse {
            state: "DONE".into(),
        }))
    }

    async fn leave(
        &self,
        req: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveResponse>, Status> {
        self.check(&req)?;
        self.st().left = true;
        Ok(Response::new(v1::LeaveResponse { requeued: 0 }))
    }
}

async fn start_fake() -> (Fake, String) {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = AgentServiceServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (fake, format!("http://{addr}"))
}

fn config(url: &str, dir: &std::path::Path) -> AgentConfig {
    AgentConfig {
        coordinator: url.into(),
        join_token: TOKEN.into(),
        data_dir: dir.to_path_buf(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        max_jobs: 4,
        cpu_millis: Some(4000),
        memory_mib: Some(4096),
        claim_wait_ms: 100,
        ..AgentConfig::default()
    }
}

async fn wait_until(mut predicate: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !predicate() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 client: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn job_output_and_exit_code_reach_the_coordinator() {
    let (fake, url) = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(config(&url, dir.path())).await.unwrap();
    fake.push_job(
        "j-fail",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        &[],
    );
    fake.push_job(
        "j-ok",
        &["sh", "-c", "echo \"$GREETING\""],
        &[("GREETING", "hi")],
    );
    fake.push_job("j-missing", &["drover-no-such-program"], &[]);
    wait_until(|| fake.st().completed.len() == 3).await;

    let failed = fake.completion("j-fail").unwrap();
    assert_eq!(failed.outcome, v1::Outcome::Failed as i32);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.reason, "exit code 3");
    let log = String::from_utf8(fake.st().logs["j-fail"].clone()).unwrap();
    assert!(log.contains("out\n") && log.contains("err\n"), "{log:?}");
    assert!(fake.st().started.contains(&"j-fail".to_string()));

    let ok = fake.completion("j-ok").unwrap();
    assert_eq!(ok.outcome, v1::Outcome::Succeeded as i32);
    assert_eq!(fake.st().logs["j-ok"], b"hi\n");

    let missing = fake.completion("j-missing").unwrap();
    assert_eq!(missing.outcome, v1::Outcome::Failed as i32);
    assert!(
        missing
            .reason
            .contains("command not found: drover-no-such-program"),
        "{}",
        missing.reason
    );

    let (code, body) = http(agent.health_addr(), "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("drover_agent_jobs_finished_total{outcome=\"failed\"} 2"),
        "{body}"
    );
    agent.drain("test");
    agent.wait().await.unwrap();
    assert!(fake.st().left);
}

#[tokio::test]
async fn cancel_in_a_heartbeat_answer_stops_the_job_as_cancelled() {
    let (fake, url) = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(config(&url, dir.path())).await.unwrap();
    fake.push_job(
        "j-long",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 143' TERM; echo ready; while true; do sleep 0.05; done",
        ],
        &[],
    );
    wait_until(|| {
        fake.st()
            .logs
            .get("j-long")
            .is_some_and(|l| l.starts_with(b"ready"))
    })
    .await;
    fake.st().cancel_next.push(v1::LeaseRef {
        job_id: "j-long".into(),
        attempt: 1,
        session_id: "s1".into(),
    });
    wait_until(|| fake.completion("j-long").is_some()).await;
    let done = fake.completion("j-long").unwrap();
    assert_eq!(done.outcome, v1::Outcome::Cancelled as i32);
    assert_eq!(done.exit_code, Some(143));
    assert!(String::from_utf8_lossy(&fake.st().logs["j-long"]).contains("got-term"));
    agent.drain("test");
    agent.wait().await.unwrap();
}

#[tokio::test]
async fn health_turns_503_when_a_drain_begins_and_jobs_finish_first() {
    let (fake, url) = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(config(&url, dir.path())).await.unwrap();
    let addr = agent.health_addr();
    let (code, body) = http(addr, "GET", "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\":\"idle\""), "{body}");

    let stop_file = dir.path().join("stop");
    let stop = stop_file.to_str().unwrap().to_string();
    fake.push_job(
        "j-drain",
        &[
            "sh",
            "-c",
            "echo ready; while [ ! -f \"$STOP\" ]; do sleep 0.05; done",
        ],
        &[("STOP", &stop)],
    );
    wait_until(|| fake.st().logs.contains_key("j-drain")).await;

    let (code, body) = http(addr, "POST", "/drain").await;
    assert_eq!(code, 202, "{body}");
    let (code, body) = http(addr, "GET", "/health").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("\"state\":\"draining\"") && body.contains("operator"),
        "{body}"
    );
    assert_eq!(http(addr, "GET", "/health/live").await.0, 200);

    std::fs::write(&stop_file, "").unwrap();
    agent.wait().await.unwrap();
    let done = fake.completion("j-drain").unwrap();
    assert_eq!(
        done.outcome,
        v1::Outcome::Succeeded as i32,
        "a drain lets running jobs finish"
    );
    assert!(fake.st().left);
    assert!(
        !dir.path().join("session.json").exists(),
        "a left session is not resumed"
    );
}

#[tokio::test]
async fn drain_deadline_interrupts_running_jobs() {
    let (fake, url) = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&url, dir.path());
    cfg.drain_timeout_ms = 100;
    let agent = Agent::start(cfg).await.unwrap();
    fake.push_job("j-stuck", &["sh", "-c", "echo ready; sleep 1000"], &[]);
    wait_until(|| fake.st().logs.contains_key("j-stuck")).await;
    agent.drain("test");
    agent.wait().await.unwrap();
    let done = fake.completion("j-stuck").unwrap();
    assert_eq!(done.outcome, v1::Outcome::Interrupted as i32);
    assert!(fake.st().left);
}

#[tokio::test]
async fn lost_contact_fences_kills_jobs_without_completing_and_registers_again() {
    let (fake, url) = start_fake().await;
    fake.st().remaining_ms = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(config(&url, dir.path())).await.unwrap();
    fake.push_job("j-fenced", &["sh", "-c", "echo ready; sleep 1000"], &[]);
    wait_until(|| fake.st().logs.contains_key("j-fenced")).await;
    wait_until(|| fake.st().heartbeats_ok > 0).await;
    assert!(dir.path().join("fence-deadline").exists());
    fake.st().fail_heartbeats = true;
    wait_until(|| fake.st().registers >= 2).await;
    fake.st().fail_heartbeats = false;
    let (_, body) = http(agent.health_addr(), "GET", "/metrics").await;
    assert!(body.contains("drover_agent_fences_total 1"), "{body}");
    wait_until(|| {
        let body = std::fs::read_to_string(dir.path().join("session.json")).unwrap_or_default();
        body.contains("\"s2\"")
    })
    .await;
    agent.drain("test");
    agent.wait().await.unwrap();
    assert!(
        fake.completion("j-fenced").is_none(),
        "a fenced job is never completed"
    );
}

#[tokio::test]
async fn a_rejected_join_token_fails_start_with_the_fix() {
    let (_fake, url) = start_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&url, dir.path());
    cfg.join_token = "wrong".into();
    let err = Agent::start(cfg).await.err().expect("start should fail");
    assert!(err.to_string().contains("DROVER_JOIN_TOKEN"), "{err:#}");
}
