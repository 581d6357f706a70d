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
    assert_eq!(routes, 19, "every route of http/mod.rs was found");
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

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn calc_workflow() -> Value {
    json!({"name": "calc", "description": "x·y + x/z", "steps": [
        {"name": "gen", "command": ["true"], "resources": {"cpu_millis": 1000, "memory_mib": 1024}},
        {"name": "div", "depends_on": ["gen"], "array": 2, "command": ["true"]},
        {"name": "sum", "depends_on": ["div"], "command": ["true"]}
    ]})
}

async fn run_count(h: &Harness) -> usize {
    let (status, body) = h.admin("GET", "/v1/workflows?limit=200", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["runs"].as_array().unwrap().len()
}

#[tokio::test]
async fn bad_workflows_name_the_field_and_create_nothing() {
    let h = Harness::start(|c| {
        c.pools = vec![PoolConfig {
            name: "default".into(),
            session_ttl_ms: None,
            scaling: None,
        }]
    })
    .await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut wf = calc_workflow();
        f(&mut wf);
        wf
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with(&|w| w["steps"][0]["depends_on"] = json!(["sum"])),
            "steps",
            "gen -> sum -> div -> gen",
        ),
        (
            with(&|w| w["steps"][2]["depends_on"] = json!(["dvi"])),
            "steps[2].depends_on[0]",
            "\"dvi\"",
        ),
        (
            with(&|w| w["steps"][1]["name"] = json!("gen")),
            "steps[1].name",
            "unique",
        ),
        (
            with(&|w| w["steps"][1]["name"] = json!("../up")),
            "steps[1].name",
            "not a valid name",
        ),
        (
            with(&|w| w["steps"][1]["array"] = json!(0)),
            "steps[1].array",
            "1 to 256",
        ),
        (
            with(&|w| w["steps"][1]["array"] = json!(100000)),
            "steps[1].array",
            "1 to 256",
        ),
        (
            with(&|w| w["steps"][2]["pool"] = json!("gpu")),
            "steps[2].pool",
            "unknown pool",
        ),
        (
            with(&|w| w["steps"][0]["command"] = json!([])),
            "steps[0].command",
            "must not be empty",
        ),
        (
            with(&|w| w["steps"][2]["inputs"] = json!(["div"])),
            "steps[2].inputs[0]",
            "outputs: true",
        ),
    ];
    for (body, field, says) in cases {
        let (status, answer) = h.admin("POST", "/v1/workflows", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let error = error_of(&answer).error;
        assert_eq!(error.field.as_deref(), Some(field), "{answer}");
        assert!(error.message.contains(says), "{field}: {}", error.message);
    }
    // A typo in a step's fields is refused by name too.
    let (status, answer) = h
        .admin(
            "POST",
            "/v1/workflows",
            Some(with(&|w| w["steps"][1]["dependson"] = json!(["gen"]))),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        error_of(&answer).error.message.contains("dependson"),
        "{answer}"
    );
    // Submit needs the submit scope.
    let (status, _) = h
        .call(
            "POST",
            "/v1/workflows",
            Some(READ_TOKEN),
            Some(calc_workflow()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(run_count(&h).await, 0, "no run was created");
    assert_eq!(h.job_count().await, 0, "no job was created");
    let (status, _) = h
        .admin("GET", &format!("/v1/workflows/{}", "0".repeat(26)), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_run_releases_its_steps_in_order_and_prices_every_attempt() {
    let h = Harness::start(|_| {}).await;
    let (status, run) = h
        .admin("POST", "/v1/workflows", Some(calc_workflow()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    assert_eq!(run["state"], "RUNNING");
    let states: Vec<_> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].clone())
        .collect();
    assert_eq!(
        states,
        [json!("QUEUED"), json!("PENDING"), json!("PENDING")]
    );

    // One agent on an m5.large (2 vCPU, 8 GiB, $0.096/h).
    let mut client = h.grpc().await;
    let session = client
        .register(v1::RegisterRequest {
            join_token: h.join.clone(),
            agent: Some(v1::AgentInfo {
                agent_id: "i-0123".into(),
                pool: "default".into(),
                hostname: "ip-10-0-0-1".into(),
                labels: [("platform", "ec2"), ("instance_type", "m5.large")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                capacity: Some(v1::Resources {
                    cpu_millis: 2000,
                    memory_mib: 8192,
                    ..Default::default()
                }),
                runtime: "process".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = session.session_token.clone();
    let mut order = Vec::new();
    while order.len() < 4 {
        let leases = client
            .claim(authed(
                v1::ClaimRequest {
                    session_id: session.session_id.clone(),
                    free: Some(v1::Resources {
                        cpu_millis: 2000,
                        memory_mib: 8192,
                        ..Default::default()
                    }),
                    max_jobs: 8,
                    wait_ms: 5_000,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner()
            .leases;
        assert!(!leases.is_empty(), "the next step was released");
        for lease in leases {
            let name = lease.job.as_ref().unwrap().name.clone();
            let lease = lease.lease.unwrap();
            client
                .report_started(authed(
                    v1::ReportStartedRequest {
                        lease: Some(lease.clone()),
                    },
                    &token,
                ))
                .await
                .unwrap();
            client
                .complete(authed(
                    v1::CompleteRequest {
                        lease: Some(lease),
                        outcome: v1::Outcome::Succeeded as i32,
                        exit_code: Some(0),
                        reason: "exit 0".into(),
                    },
                    &token,
                ))
                .await
                .unwrap();
            order.push(name);
        }
    }
    assert_eq!(order[0], "calc/gen");
    let mut middle = order[1..3].to_vec();
    middle.sort();
    assert_eq!(middle, ["calc/div[0]", "calc/div[1]"]);
    assert_eq!(order[3], "calc/sum");

    let (_, run) = h
        .admin("GET", &format!("/v1/workflows/{run_id}"), None)
        .await;
    assert_eq!(run["state"], "SUCCEEDED", "{run}");
    assert!(run["finished_at_ms"].as_i64().is_some());
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[1]["tasks"], 2);
    assert_eq!(steps[1]["succeeded"], 2);
    let step_costs: f64 = steps.iter().map(|s| s["cost_usd"].as_f64().unwrap()).sum();
    let total = run["cost_usd"].as_f64().unwrap();
    assert!(
        (total - step_costs).abs() < 1e-12,
        "{total} vs {step_costs}"
    );

    // Each attempt was priced at its share of the m5.large when it started:
    // gen asked for 1 of 2 vCPUs, the others for the default 100 m / 128 MiB.
    let gen_id = steps[0]["jobs"][0]["job_id"].as_str().unwrap();
    let sum_id = steps[2]["jobs"][0]["job_id"].as_str().unwrap();
    for (id, rate) in [(gen_id, 0.096 * 0.5), (sum_id, 0.096 * 0.05)] {
        let (_, events) = h.admin("GET", &format!("/v1/jobs/{id}/events"), None).await;
        let running = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["state"] == "RUNNING")
            .unwrap()
            .clone();
        let got = running["usd_per_hour"].as_f64().unwrap();
        assert!((got - rate).abs() < 1e-12, "{id}: {got} vs {rate}");
        let (_, job) = h.admin("GET", &format!("/v1/jobs/{id}"), None).await;
        assert!(job["cost_usd"].as_f64().is_some(), "{job}");
        assert_eq!(job["workflow"]["run_id"], run_id.as_str());
    }

    let (_, list) = h.admin("GET", "/v1/workflows", None).await;
    assert_eq!(list["runs"][0]["id"], run_id.as_str());
    assert_eq!(list["runs"][0]["state"], "SUCCEEDED");
    assert_eq!(list["runs"][0]["done"], 4);
    let (status, answer) = h.admin("GET", "/v1/workflows?limit=0", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&answer).error.field.as_deref(), Some("limit"));
}

#[tokio::test]
async fn cancelling_a_run_cancels_every_unfinished_step() {
    let h = Harness::start(|_| {}).await;
    let (_, run) = h
        .admin("POST", "/v1/workflows", Some(calc_workflow()))
        .await;
    let id = run["id"].as_str().unwrap();
    let (status, run) = h
        .admin("POST", &format!("/v1/workflows/{id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["state"], "CANCELLED");
    for step in run["steps"].as_array().unwrap() {
        assert_eq!(step["state"], "CANCELLED", "{step}");
        for job in step["jobs"].as_array().unwrap() {
            assert_eq!(job["state"], "CANCELLED", "{job}");
        }
    }
    let (status, again) = h
        .admin("POST", &format!("/v1/workflows/{id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["state"], "CANCELLED");
    let (status, _) = h
        .admin(
            "POST",
            &format!("/v1/workflows/{}/cancel", "0".repeat(26)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_report_call_applies_each_start_and_completion_as_its_own_call_would() {
    let h = Harness::start(|_| {}).await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let (status, job) = h
            .admin(
                "POST",
                "/v1/jobs",
                Some(json!({"name": name, "command": ["true"]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{job}");
        ids.push(job["jobs"][0]["id"].as_str().unwrap().to_string());
    }
    let capacity = v1::Resources {
        cpu_millis: 8000,
        memory_mib: 8192,
        ..Default::default()
    };
    let session = h.register("default", capacity.clone()).await.unwrap();
    let token = session.session_token.clone();
    let mut client = h.grpc().await;
    let leases: Vec<v1::LeaseRef> = client
        .claim(authed(
            v1::ClaimRequest {
                session_id: session.session_id.clone(),
                free: Some(capacity),
                max_jobs: 3,
                wait_ms: 0,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.lease.unwrap())
        .collect();
    assert_eq!(leases.len(), 3);
    let started = |lease: &v1::LeaseRef| v1::Report {
        report: Some(v1::report::Report::Started(v1::ReportStartedRequest {
            lease: Some(lease.clone()),
        })),
    };
    let completed = |lease: &v1::LeaseRef, code: i32| v1::Report {
        report: Some(v1::report::Report::Complete(v1::CompleteRequest {
            lease: Some(lease.clone()),
            outcome: if code == 0 {
                v1::Outcome::Succeeded
            } else {
                v1::Outcome::Failed
            } as i32,
            exit_code: Some(code),
            reason: String::new(),
        })),
    };
    let stale = v1::LeaseRef {
        attempt: 7,
        ..leases[1].clone()
    };
    let foreign = v1::LeaseRef {
        session_id: "someone-else".into(),
        ..leases[2].clone()
    };
    let reports = vec![
        started(&leases[0]),
        started(&leases[1]),
        completed(&leases[0], 0),
        // Applied in order: a repeat of the same completion is idempotent.
        completed(&leases[0], 0),
        completed(&stale, 0),
        completed(&foreign, 0),
        v1::Report { report: None },
        completed(&leases[2], 3),
    ];
    let results = client
        .report(authed(
            v1::ReportRequest {
                session_id: session.session_id.clone(),
                reports,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<tonic::Code> = results.iter().map(|r| tonic::Code::from(r.code)).collect();
    use tonic::Code::*;
    assert_eq!(
        codes,
        [
            Ok,
            Ok,
            Ok,
            Ok,
            FailedPrecondition,
            InvalidArgument,
            InvalidArgument,
            Ok
        ],
        "{results:?}"
    );
    assert_eq!(results[2].state, "SUCCEEDED");
    assert_eq!(results[7].state, "FAILED");
    assert!(
        results[5].message.contains("reports[5].complete.lease"),
        "{results:?}"
    );
    assert!(results[6].message.contains("reports[6]"), "{results:?}");
    let state = |id: &str| {
        let id = id.to_string();
        let h = &h;
        async move { h.admin("GET", &format!("/v1/jobs/{id}"), None).await.1["state"].clone() }
    };
    assert_eq!(state(&ids[0]).await, "SUCCEEDED");
    assert_eq!(state(&ids[1]).await, "RUNNING");
    assert_eq!(state(&ids[2]).await, "FAILED");

    // The whole call is refused for a wrong token or too many reports.
    let wrong = client
        .report(authed(
            v1::ReportRequest {
                session_id: session.session_id.clone(),
                reports: vec![completed(&leases[1], 0)],
            },
            "not-the-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Unauthenticated);
    let many = client
        .report(authed(
            v1::ReportRequest {
                session_id: session.session_id.clone(),
                reports: vec![completed(&leases[1], 0); 257],
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(many.code(), InvalidArgument);
    assert!(many.message().contains("reports"), "{}", many.message());
    assert_eq!(state(&ids[1]).await, "RUNNING");
}
