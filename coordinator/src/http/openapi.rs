//! The OpenAPI 3 document of the HTTP API, served at `/v1/openapi.json`.
//! A test checks that every route of the router is described here.

use serde_json::{json, Value};

fn op(summary: &str, scope: Option<&str>, response: &str) -> Value {
    let mut op = json!({
        "summary": summary,
        "responses": {
            "200": { "description": response },
            "400": { "$ref": "#/components/responses/Error" },
            "401": { "$ref": "#/components/responses/Error" },
            "403": { "$ref": "#/components/responses/Error" },
            "404": { "$ref": "#/components/responses/Error" },
            "409": { "$ref": "#/components/responses/Error" }
        }
    });
    match scope {
        Some(scope) => {
            op["security"] = json!([{ "bearer": [] }]);
            op["x-drover-scope"] = json!(scope);
        }
        None => op["security"] = json!([]),
    }
    op
}

fn id_param(name: &str) -> Value {
    json!([{ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }])
}

pub fn openapi_document() -> Value {
    let mut paths = serde_json::Map::new();
    let mut submit = op(
        "Submit one job (a JobSpec) or a batch ({\"jobs\": [...]})",
        Some("submit"),
        "201: SubmitResponse",
    );
    submit["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SubmitRequest" } } } });
    let mut list = op("List jobs, newest first", Some("read"), "JobList");
    list["parameters"] = json!([
        { "name": "state", "in": "query", "schema": { "type": "string", "enum": ["PENDING","QUEUED","LEASED","RUNNING","SUCCEEDED","FAILED","CANCELLED","TIMED_OUT"] } },
        { "name": "pool", "in": "query", "schema": { "type": "string" } },
        { "name": "name", "in": "query", "schema": { "type": "string" } },
        { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" },
        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 50 } }
    ]);
    paths.insert("/v1/jobs".into(), json!({ "post": submit, "get": list }));
    let with_id = |mut v: Value, name: &str| {
        v["parameters"] = id_param(name);
        v
    };
    paths.insert(
        "/v1/jobs/{id}".into(),
        json!({ "get": with_id(op("Get a job", Some("read"), "Job"), "id") }),
    );
    paths.insert(
        "/v1/jobs/{id}/cancel".into(),
        json!({ "post": with_id(op("Cancel a job in any state", Some("submit"), "Job"), "id") }),
    );
    paths.insert(
        "/v1/jobs/{id}/retry".into(),
        json!({ "post": with_id(op("Run a finished job again", Some("submit"), "Job"), "id") }),
    );
    paths.insert(
        "/v1/jobs/{id}/events".into(),
        json!({ "get": with_id(op("A job's timeline", Some("read"), "EventList"), "id") }),
    );
    let mut logs = op(
        "An attempt's output (text/plain); follow=true streams until the attempt ends",
        Some("read"),
        "text/plain; header x-drover-attempt",
    );
    logs["parameters"] = json!([
        { "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
        { "name": "attempt", "in": "query", "schema": { "type": "integer", "minimum": 1 } },
        { "name": "follow", "in": "query", "schema": { "type": "boolean" } }
    ]);
    paths.insert("/v1/jobs/{id}/logs".into(), json!({ "get": logs }));
    paths.insert(
        "/v1/jobs/{id}/artifacts".into(),
        json!({ "get": with_id(op("A signed, expiring download URL of the job's artifact (tar + zstd of its output directory)", Some("read"), "Artifact"), "id") }),
    );
    let blob_params = json!([
        { "name": "object", "in": "path", "required": true, "schema": { "type": "string" }, "description": "artifacts/<job>/<attempt>.tar.zst" },
        { "name": "expires", "in": "query", "required": true, "schema": { "type": "integer" } },
        { "name": "signature", "in": "query", "required": true, "schema": { "type": "string" } }
    ]);
    let mut blob_get = op(
        "Download through a signed URL (local blob store); the signature is the credential",
        None,
        "application/zstd",
    );
    blob_get["parameters"] = blob_params.clone();
    let mut blob_put = op(
        "Upload through a signed URL (agents, local blob store)",
        None,
        "201: {object, bytes}",
    );
    blob_put["parameters"] = blob_params;
    paths.insert(
        "/v1/blobs/{object}".into(),
        json!({ "get": blob_get, "put": blob_put }),
    );
    let mut create_run = op(
        "Start a workflow run: steps with depends_on, array, outputs and inputs; validated whole before anything is created",
        Some("submit"),
        "201: WorkflowRun",
    );
    create_run["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/WorkflowSpec" } } } });
    let mut list_runs = op("List workflow runs, newest first", Some("read"), "RunList");
    list_runs["parameters"] = json!([
        { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" },
        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 200, "default": 20 } }
    ]);
    paths.insert(
        "/v1/workflows".into(),
        json!({ "post": create_run, "get": list_runs }),
    );
    paths.insert(
        "/v1/workflows/{id}".into(),
        json!({ "get": with_id(op("A run: state, steps (tasks done, durations, cost) and their jobs", Some("read"), "WorkflowRun"), "id") }),
    );
    paths.insert(
        "/v1/workflows/{id}/cancel".into(),
        json!({ "post": with_id(op("Cancel every unfinished step of a run", Some("submit"), "WorkflowRun"), "id") }),
    );
    paths.insert("/v1/agents".into(), json!({ "get": op("Agents with live sessions and recently gone ones", Some("read"), "AgentList") }));
    paths.insert(
        "/v1/agents/{id}/drain".into(),
        json!({ "post": with_id(op("Ask an agent to drain", Some("admin"), "Agent"), "id") }),
    );
    let mut pools = op(
        "Queue depth, running jobs and agents per pool; for pools bound to an ASG or Fargate, the scaler's desired vs actual workers and last decision",
        Some("read"),
        "PoolList",
    );
    pools["responses"]["200"]["content"] =
        json!({ "application/json": { "schema": { "$ref": "#/components/schemas/PoolList" } } });
    paths.insert("/v1/pools".into(), json!({ "get": pools }));
    paths.insert("/v1/pools/{pool}/pause".into(), json!({ "post": with_id(op("Stop dispatching the pool's jobs and scaling it out", Some("admin"), "Pool"), "pool") }));
    paths.insert("/v1/pools/{pool}/resume".into(), json!({ "post": with_id(op("Dispatch the pool's jobs again", Some("admin"), "Pool"), "pool") }));
    paths.insert(
        "/health".into(),
        json!({ "get": op("Liveness of the coordinator", None, "{\"status\":\"ok\"}") }),
    );
    paths.insert(
        "/metrics".into(),
        json!({ "get": op("Prometheus metrics", None, "text/plain") }),
    );
    paths.insert(
        "/v1/openapi.json".into(),
        json!({ "get": op("This document", None, "OpenAPI 3") }),
    );
    let workflow_spec = json!({ "type": "object", "required": ["name", "steps"], "additionalProperties": false, "properties": {
                    "name": { "type": "string" }, "description": { "type": "string" },
                    "steps": { "type": "array", "minItems": 1, "maxItems": 100, "items": { "allOf": [ { "$ref": "#/components/schemas/JobSpec" }, { "type": "object", "required": ["name"], "properties": {
                        "name": { "type": "string", "description": "unique; the directory of its outputs under /input in dependent steps" },
                        "depends_on": { "type": "array", "items": { "type": "string" } },
                        "array": { "oneOf": [ { "type": "integer", "minimum": 1, "maximum": 256 }, { "type": "object", "properties": { "count": { "type": "integer" } } } ], "description": "N tasks with DROVER_TASK_INDEX and DROVER_TASK_COUNT" },
                        "inputs": { "type": "array", "items": { "type": "string" }, "description": "steps whose outputs to read (default: the dependencies that declare outputs)" } } } ] } } } });
    let mut document = json!({
        "openapi": "3.0.3",
        "info": { "title": "Drover coordinator API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Types are those of drover_proto::model (JobSpec, Job, JobEvent, Agent, Pool). Errors are {\"error\": {\"code\", \"message\", \"field\"}}." },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": { "Error": { "description": "ApiErrorBody", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApiErrorBody" } } } } },
            "schemas": {
                "AgentList": { "type": "object", "required": ["agents"], "properties": { "agents": { "type": "array", "items": { "$ref": "#/components/schemas/Agent" } } } },
                "Agent": { "type": "object", "description": "One agent session: an agent that restarted after its session expired is listed once per session.", "required": ["agent_id", "session_id", "pool", "hostname", "labels", "capacity", "runtime", "version", "state", "registered_at_ms", "last_heartbeat_ms", "running"], "properties": {
                    "agent_id": { "type": "string" }, "session_id": { "type": "string" }, "pool": { "type": "string" }, "hostname": { "type": "string" },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" }, "description": "platform, instance_id, asg, instance_type, az, region, spot, arch, … (set by the agent)" },
                    "capacity": { "type": "object", "properties": { "cpu_millis": { "type": "integer" }, "memory_mib": { "type": "integer" }, "gpus": { "type": "integer" }, "disk_gib": { "type": "integer" }, "gpu_model": { "type": "string" } } },
                    "runtime": { "type": "string" }, "version": { "type": "string" },
                    "state": { "type": "string", "enum": ["active", "draining", "gone"] },
                    "registered_at_ms": { "type": "integer" }, "last_heartbeat_ms": { "type": "integer" },
                    "running": { "type": "integer", "description": "jobs leased or running" },
                    "health_addr": { "type": "string" },
                    "note": { "type": "string", "description": "what the coordinator did about the agent beyond ending its session, e.g. \"instance i-… terminated by the coordinator: still InService 5m after session … expired …\" (zombie reaping)" } } },
                "PoolList": { "type": "object", "required": ["pools"], "properties": { "pools": { "type": "array", "items": { "$ref": "#/components/schemas/Pool" } } } },
                "Pool": { "type": "object", "required": ["pool", "queued", "running", "agents", "paused"], "properties": {
                    "pool": { "type": "string" }, "queued": { "type": "integer" }, "running": { "type": "integer" }, "agents": { "type": "integer" },
                    "paused": { "type": "boolean" }, "oldest_queued_age_ms": { "type": "integer" },
                    "scaling": { "$ref": "#/components/schemas/PoolScaling" } } },
                "PoolScaling": { "type": "object", "description": "Present when the pool is bound to an Auto Scaling group or a Fargate task definition. Scale-out only.", "required": ["kind", "target", "slots_per_worker"], "properties": {
                    "kind": { "type": "string", "enum": ["asg", "fargate"] }, "target": { "type": "string", "description": "ASG name, or <cluster>/<task definition>" },
                    "slots_per_worker": { "type": "integer" }, "min": { "type": "integer" }, "max": { "type": "integer" },
                    "demand_slots": { "type": "integer", "description": "queued jobs a worker can run + running jobs" },
                    "wanted": { "type": "integer", "description": "clamp(ceil(demand_slots / slots_per_worker), min, max)" },
                    "desired": { "type": "integer", "description": "ASG desired capacity, or Fargate tasks pending/running incl. just launched" },
                    "actual": { "type": "integer", "description": "ASG instances InService, or tasks ECS lists" },
                    "last_decision": { "$ref": "#/components/schemas/ScalingDecision" }, "last_action": { "$ref": "#/components/schemas/ScalingDecision" },
                    "last_error": { "type": "string" }, "backoff_until_ms": { "type": "integer" }, "evaluated_at_ms": { "type": "integer" } } },
                "ScalingDecision": { "type": "object", "required": ["at_ms", "action", "reason"], "properties": {
                    "at_ms": { "type": "integer" },
                    "action": { "type": "string", "enum": ["scale_out", "launch", "terminate_zombie", "none", "cooldown", "paused", "backoff", "error"] },
                    "reason": { "type": "string" } } },
                "SubmitRequest": { "oneOf": [ { "$ref": "#/components/schemas/JobSpec" }, { "type": "object", "required": ["jobs"], "properties": { "jobs": { "type": "array", "items": { "$ref": "#/components/schemas/JobSpec" } } } } ] },
                "JobSpec": { "type": "object", "required": ["command"], "additionalProperties": false, "properties": {
                    "name": { "type": "string" }, "pool": { "type": "string", "default": "default" }, "image": { "type": "string" },
                    "command": { "type": "array", "items": { "type": "string" }, "minItems": 1 }, "args": { "type": "array", "items": { "type": "string" } },
                    "env": { "type": "object", "additionalProperties": { "oneOf": [ { "type": "string" }, { "type": "object", "properties": { "value": { "type": "string" }, "secret": { "type": "boolean" } } } ] } },
                    "workdir": { "type": "string" }, "user": { "type": "string" },
                    "resources": { "type": "object", "properties": { "cpu_millis": { "type": "integer", "default": 100 }, "memory_mib": { "type": "integer", "default": 128 }, "gpus": { "type": "integer" }, "disk_gib": { "type": "integer" }, "gpu_model": { "type": "string" } } },
                    "constraints": { "type": "object", "additionalProperties": { "type": "string" } },
                    "timeout_secs": { "type": "integer" },
                    "retry": { "type": "object", "properties": { "max_attempts": { "type": "integer", "default": 1 }, "retry_on_exit_codes": { "type": "array", "items": { "type": "integer" } }, "backoff_secs": { "type": "integer", "default": 5 }, "max_infra_retries": { "type": "integer", "default": 5 } } },
                    "priority": { "type": "integer" }, "idempotency_key": { "type": "string" } } },
                "ApiErrorBody": { "type": "object", "properties": { "error": { "type": "object", "properties": { "code": { "type": "string" }, "message": { "type": "string" }, "field": { "type": "string" } } } } }
            }
        }
    });
    document["components"]["schemas"]["WorkflowSpec"] = workflow_spec;
    document
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_proto::model::{Agent, AgentList, AgentState, Resources};

    #[test]
    fn agent_schema_describes_every_field() {
        let agent = Agent {
            agent_id: "a".into(),
            session_id: "s".into(),
            pool: "p".into(),
            hostname: "h".into(),
            labels: BTreeMap::from([("platform".into(), "ec2".into())]),
            capacity: Resources {
                gpu_model: Some("t4".into()),
                ..Resources::default()
            },
            runtime: "docker".into(),
            version: "1".into(),
            state: AgentState::Gone,
            registered_at_ms: 1,
            last_heartbeat_ms: 1,
            running: 0,
            health_addr: "127.0.0.1:1".into(),
            note: Some("n".into()),
        };
        let doc = super::openapi_document();
        let schemas = &doc["components"]["schemas"];
        let json = serde_json::to_value(AgentList {
            agents: vec![agent],
        })
        .unwrap();
        for (schema, value) in [
            ("AgentList", &json),
            ("Agent", &json["agents"][0]),
            ("Agent.capacity", &json["agents"][0]["capacity"]),
        ] {
            let described = match schema.split_once('.') {
                Some((name, field)) => &schemas[name]["properties"][field]["properties"],
                None => &schemas[schema]["properties"],
            };
            let mut documented: Vec<&String> = described
                .as_object()
                .unwrap_or_else(|| panic!("{schema} is not described"))
                .keys()
                .collect();
            let mut fields: Vec<&String> = value.as_object().unwrap().keys().collect();
            documented.sort();
            fields.sort();
            assert_eq!(documented, fields, "{schema}");
        }
        assert_eq!(
            schemas["Agent"]["properties"]["state"]["enum"],
            serde_json::json!(["active", "draining", "gone"])
        );
    }
}
