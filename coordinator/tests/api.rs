//! The HTTP API and AgentService against a real coordinator on loopback:
//! every error path answers 4xx naming the field, and changes nothing.

use drover_coordinator::{ApiTokenConfig, Config, PoolConfig, Scope, Server};
use drover_proto::model::{ApiErrorBody, Job, JobList, JobState, SubmitResponse};
use drover_proto::v1;
use reqwest::StatusCode;
use serde_json::{json, Value};

const READ_TOKEN: &str = "read-only-token-0123456789";

struct Harness {
    server: Server,
    http: reqwest::Client,
    base: String,
    admin: String,
    join: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::dev(dir.path());
        config.api_tokens.push(ApiTokenConfig {
            token: READ_TOKEN.into(),
            scopes: vec![Scope::Read],
        });
        tweak(&mut config);
        let admin = config.api_tokens[0].token.clone();
        let join = config.join_tokens[0].token.clone();
        let server = Server::start(config).await.unwrap();
        Harness {
            base: format!("http://{}", server.http_addr()),
            server,
            http: reqwest::Client::new(),
            admin,
            join,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin.clone()), body)
            .await
    }

    async fn job_count(&self) -> usize {
        let (status, body) = self.admin("GET", "/v1/jobs?limit=1000", None).await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_value::<JobList>(body).unwrap().jobs.len()
    }

    async fn grpc(
        &self,
    ) -> v1::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
        v1::agent_service_client::AgentServiceClient::connect(format!(
            "http://{}",
            self.server.grpc_addr()
        ))
        .await
        .unwrap()
    }

    async fn register(
        &self,
        pool: &str,
        capacity: v1::Resources,
    ) -> Result<v1::RegisterResponse, tonic::Status> {
        self.grpc()
            .await
            .register(v1::RegisterRequest {
                join_token: self.join.clone(),
                agent: Some(v1::AgentInfo {
                    agent_id: format!("agent-{pool}"),
                    pool: pool.into(),
                    hostname: "test".into(),
                    capacity: Some(capacity),
                    runtime: "process".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }
}

fn error_of(body: &Value) -> ApiErrorBody {
    serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
}

/// Asserts a 4xx naming `field`, and that no job was written.
async fn assert_rejected(h: &Harness, body: Value, field: &str) {
    let before = h.job_count().await;
    let (status, answer) = h.admin("POST", "/v1/jobs", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let error = error_of(&answer).error;
    assert_eq!(error.field.as_deref(), Some(field), "{answer}");
    assert!(!error.message.is_empty());
    assert_eq!(
        h.job_count().await,
        before,
        "a rejected submit wrote nothing"
    );
}

#[tokio::test]
async fn no_request_with_a_bad_token_succeeds() {
    let h = Harness::start(|_| {}).await;
    let routes = [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/01ABC"),
        ("POST", "/v1/jobs/01ABC/cancel"),
        ("POST", "/v1/jobs/01ABC/retry"),
        ("GET", "/v1/jobs/01ABC/events"),
        ("GET", "/v1/jobs/01ABC/logs"),
        ("GET", "/v1/agents"),
        ("POST", "/v1/agents/a/drain"),
        ("GET", "/v1/pools"),
        ("POST", "/v1/pools/default/pause"),
        ("POST", "/v1/pools/default/resume"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token-0123456789")] {
            let (status, body) = h
                .call(method, path, token, Some(json!({"command": ["true"]})))
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {body}"
            );
        }
    }
    // A read token cannot submit, cancel or administer.
    for (method, path) in [
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/01ABC/cancel"),
        ("POST", "/v1/agents/a/drain"),
        ("POST", "/v1/pools/default/pause"),
    ] {
        let (status, _) = h
            .call(
                method,
                path,
                Some(READ_TOKEN),
                Some(json!({"command": ["true"]})),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    assert_eq!(h.job_count().await, 0);
    let (status, _) = h.call("GET", "/v1/jobs", Some(READ_TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    // Unauthenticated endpoints.
    assert_eq!(h.call("GET", "/health", None, None).await.0, StatusCode::OK);
    assert_eq!(
        h.call("GET", "/metrics", None, None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_submits_name_the_field_and_write_nothing() {
    let h = Harness::start(|_| {}).await;
    assert_rejected(&h, json!({"command": []}), "command").await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "priority": 10_000_000}),
        "priority",
    )
    .await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "env": {"BIG": "x".repeat(70_000)}}),
        "env",
    )
    .await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "env": {"1X": "y"}}),
        "env.1X",
    )
    .await;
    assert_rejected(&h, json!({"command": ["true"], "pool": "no/slash"}), "pool").await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "retry": {"max_attempts": 0}}),
        "retry.max_attempts",
    )
    .await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "resources": {"cpu_millis": 0}}),
        "resources.cpu_millis",
    )
    .await;
    assert_rejected(
        &h,
        json!({"command": ["true"], "workdir": "relative"}),
        "workdir",
    )
    .await;
    // Unknown fields and wrong types are body errors that quote the field.
    let (status, body) = h
        .admin(
            "POST",
            "/v1/jobs",
            Some(json!({"command": ["true"], "comand": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body).error.field.as_deref(), Some("body"));
    // One bad job in a batch rejects the whole batch.
    assert_rejected(
        &h,
        json!({"jobs": [{"command": ["true"]}, {"command": [""]}]}),
        "jobs[1].command",
    )
    .await;
    assert_rejected(&h, json!({"jobs": []}), "jobs").await;
    // An oversized body.
    let huge: Vec<Value> = (0..1000)
        .map(|_| json!({"command": ["x".repeat(9000)]}))
        .collect();
    let (status, body) = h
        .admin("POST", "/v1/jobs", Some(json!({ "jobs": huge })))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(h.job_count().await, 0);
}

#[tokio::test]
async fn submit_checks_declared_pools_and_the_largest_agent() {
    let h = Harness::start(|c| {
        c.pools = vec![
            PoolConfig {
                name: "default".into(),
                session_ttl_ms: None,
                scaling: None,
            },
            PoolConfig {
                name: "gpu".into(),
                session_ttl_ms: Some(600_000),
                scaling: None,
            },
        ];
    })
    .await;
    assert_rejected(&h, json!({"command": ["true"], "pool": "nope"}), "pool").await;
    // Before any agent joined, nothing is known about sizes: accepted.
    let (status, _) = h
        .admin(
            "POST",
            "/v1/jobs",
            Some(json!({"command": ["true"], "resources": {"memory_mib": 9000}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let resp = h
        .register(
            "default",
            v1::Resources {
                cpu_millis: 2000,
                memory_mib: 4096,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(resp.session_ttl_ms, 60_000);
    let before = h.job_count().await;
    let (status, body) = h
        .admin(
            "POST",
            "/v1/jobs",
            Some(json!({"command": ["true"], "resources": {"memory_mib": 8192}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = error_of(&body).error;
    assert_eq!(error.field.as_deref(), Some("resources"));
    assert!(
        error
            .message
            .contains("largest agent has 2000m CPU, 4096 MiB"),
        "{}",
        error.message
    );
    assert_eq!(h.job_count().await, before);
    // Per-pool TTL reaches the agent.
    let gpu = h
        .register(
            "gpu",
            v1::Resources {
                cpu_millis: 1000,
                memory_mib: 1024,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(gpu.session_ttl_ms, 600_000);
    // Registering into an undeclared pool is refused.
    let err = h
        .register("other", v1::Resources::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn job_routes_answer_404_409_and_400_clearly() {
    let h = Harness::start(|_| {}).await;
    let (status, body) = h.admin("GET", "/v1/jobs/01NOSUCHJOB", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).error.message.contains("01NOSUCHJOB"));
    for path in ["/v1/jobs/01NOSUCHJOB/events", "/v1/jobs/01NOSUCHJOB/logs"] {
        assert_eq!(
            h.admin("GET", path, None).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    for path in ["/v1/jobs/01NOSUCHJOB/cancel", "/v1/jobs/01NOSUCHJOB/retry"] {
        assert_eq!(
            h.admin("POST", path, None).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let (status, body) = h
        .admin(
            "POST",
            "/v1/jobs",
            Some(json!({"command": ["true"], "name": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = serde_json::from_value::<SubmitResponse>(body).unwrap().jobs[0]
        .id
        .clone();
    // Retry of a queued job: 409 with the fix.
    let (status, body) = h.admin("POST", &format!("/v1/jobs/{id}/retry"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_of(&body).error.message.contains("only finished jobs"));
    let (status, body) = h
        .admin("POST", &format!("/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_value::<Job>(body).unwrap().state,
        JobState::Cancelled
    );
    let (status, body) = h.admin("POST", &format!("/v1/jobs/{id}/retry"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_value::<Job>(body).unwrap().state,
        JobState::Queued
    );
    // Query errors name the parameter.
    for (query, field) in [
        ("state=BOGUS", "state"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("cursor=%21%21", "cursor"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = h.admin("GET", &format!("/v1/jobs?{query}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(
            error_of(&body).error.field.as_deref(),
            Some(field),
            "{query}"
        );
    }
    let (status, body) = h
        .admin("GET", &format!("/v1/jobs/{id}/logs?attempt=3"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body).error.field.as_deref(), Some("attempt"));
    let (status, _) = h
        .admin("GET", &format!("/v1/jobs/{id}/logs?follow=maybe"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Filters work.
    let (_, body) = h.admin("GET", "/v1/jobs?state=queued&name=x", None).await;
    assert_eq!(
        serde_json::from_value::<JobList>(body).unwrap().jobs.len(),
        1
    );
}

#[tokio::test]
async fn agent_and_pool_routes_answer_404_for_unknown_names() {
    let h = Harness::start(|_| {}).await;
    let (status, body) = h.admin("POST", "/v1/agents/ghost/drain", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).error.message.contains("ghost"));
    let (status, _) = h.admin("POST", "/v1/pools/ghost/pause", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.admin("POST", "/v1/pools/bad%2Fname/pause", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = h.admin("GET", "/v1/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body);
    // A pool known from a job can be paused and resumed.
    h.admin(
        "POST",
        "/v1/jobs",
        Some(json!({"command": ["true"], "pool": "batch"})),
    )
    .await;
    let (status, body) = h.admin("POST", "/v1/pools/batch/pause", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["paused"], json!(true));
    let (_, body) = h.admin("GET", "/v1/pools", None).await;
    assert_eq!(body["pools"][0]["queued"], json!(1));
    let (_, body) = h.admin("POST", "/v1/pools/batch/resume", None).await;
    assert_eq!(body["paused"], json!(false));
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let h = Harness::start(|_| {}).await;
    let (status, doc) = h.call("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    let source = include_str!("../src/http/mod.rs");
    let mut routes = 0;
    for call in source.split(".route(").skip(1) {
        // A catch-all `{*object}` is a plain `{object}` parameter in OpenAPI.
        let path = call.split('"').nth(1).unwrap().replace("{*", "{");
        assert!(
            paths.contains_key(&path),
            "route {path} is missing from the OpenAPI document"
        );
        routes += 1;
    }
    assert_eq!(routes, 16, "every route of http/mod.rs was found");
}

#[tokio::test]
async fn agent_calls_need_the_right_tokens() {
    let h = Harness::start(|c| {
        c.join_tokens.push(drover_coordinator::JoinTokenConfig {
            token: "gpu-only-join-token-123".into(),
            pool: Some("gpu".into()),
        })
    })
    .await;
    let mut client = h.grpc().await;
    let bad_join = client
        .register(v1::RegisterRequest {
            join_token: "not-the-token".into(),
            agent: Some(v1::AgentInfo {
                agent_id: "a".into(),
                pool: "default".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_join.code(), tonic::Code::Unauthenticated);
    let wrong_pool = client
        .register(v1::RegisterRequest {
            join_token: "gpu-only-join-token-123".into(),
            agent: Some(v1::AgentInfo {
                agent_id: "a".into(),
                pool: "cpu".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_pool.code(), tonic::Code::PermissionDenied);
    let session = h
        .register(
            "default",
            v1::Resources {
                cpu_millis: 1000,
                memory_mib: 1024,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let heartbeat = |token: Option<String>| {
        let mut req = tonic::Request::new(v1::HeartbeatRequest {
            session_id: session.session_id.clone(),
            ..Default::default()
        });
        if let Some(token) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        req
    };
    assert_eq!(
        client.heartbeat(heartbeat(None)).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        client
            .heartbeat(heartbeat(Some("ds_wrong".into())))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let ok = client
        .heartbeat(heartbeat(Some(session.session_token.clone())))
        .await
        .unwrap()
        .into_inner();
    // Renewals are written lazily: right after Register the session keeps
    // (nearly) its whole TTL.
    assert!(
        ok.session_remaining_ms > session.session_ttl_ms * 2 / 3
            && ok.session_remaining_ms <= session.session_ttl_ms,
        "{} of {}",
        ok.session_remaining_ms,
        session.session_ttl_ms
    );
    // After Leave the token is worthless.
    let mut leave = tonic::Request::new(v1::LeaveRequest {
        session_id: session.session_id.clone(),
    });
    leave.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", session.session_token).parse().unwrap(),
    );
    client.leave(leave).await.unwrap();
    assert_eq!(
        client
            .heartbeat(heartbeat(Some(session.session_token.clone())))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
}
