//! moto's server for the coordinator's tests: one per test process, shared
//! by the DynamoDB store and the scaler tests.
//!
//! It is the tests crate's launcher, `tests/moto/server.py`, run with the
//! venv's Python: moto with the gaps filled the way AWS behaves
//! (AWS-EMULATION.md) — DynamoDB served one request at a time (moto checks a
//! condition and applies the write without a lock, so two concurrent
//! conditional updates could both pass), the Auto Scaling min-size refusal
//! and lifecycle waits — and harness endpoints (`/_drover/…`) for faults the
//! tests inject. It prints `port N` once it listens and exits when its
//! standard input closes, i.e. when this process exits.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use aws_sdk_dynamodb::config::{Credentials, Region};

pub(crate) const REGION: &str = "us-east-1";

struct Moto {
    endpoint: String,
    /// The launcher exits when this pipe closes (this process exits).
    _stdin: ChildStdin,
    _child: Child,
}

/// The venv's python, next to `$DROVER_MOTO_SERVER` (scripts/test.sh sets
/// it to `.venv/bin/moto_server`).
fn moto_python() -> PathBuf {
    let server = std::env::var("DROVER_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
        });
    server.with_file_name("python")
}

/// The launcher script, shared with the tests crate.
fn launcher() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/moto/server.py")
}

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let python = moto_python();
        let script = launcher();
        assert!(
            python.exists(),
            "{} not found: run scripts/test.sh (it installs moto[server] into .venv) \
             or point DROVER_MOTO_SERVER at a venv's moto_server",
            python.display()
        );
        let mut child = Command::new(&python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Piped and copied by a thread rather than inherited: a child
            // holding the test's own stderr would outlive the test (nextest
            // reports it as a leak).
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} {}: {e}",
                    python.display(),
                    script.display()
                )
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                match line {
                    Ok(line) => eprintln!("moto: {line}"),
                    Err(_) => break,
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => panic!("reading the moto launcher's first line: {e}"),
            Err(_) => panic!(
                "{} {} did not announce its port within 60s",
                python.display(),
                script.display()
            ),
        };
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line from {}: {line:?} (expected `port N`; its errors are on stderr)",
                    script.display()
                )
            });
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            _stdin: stdin,
            _child: child,
        }
    })
}

/// The endpoint of this process's moto server (started on first use).
pub(crate) fn endpoint() -> &'static str {
    &moto().endpoint
}

pub(crate) fn credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "static")
}

pub(crate) fn region() -> Region {
    Region::new(REGION)
}

/// An SDK configuration for any AWS client, pointed at moto with static
/// credentials (nothing of the default chain is consulted).
pub(crate) async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(region())
        .credentials_provider(credentials())
        .endpoint_url(endpoint())
        .http_client(crate::store::dynamodb::https_client())
        .load()
        .await
}

/// One EC2 Query API call (the coordinator links no EC2 SDK): returns the
/// XML answer, panicking on an error status.
pub(crate) async fn ec2(action: &str, params: &[(&str, &str)]) -> String {
    let mut form: Vec<(&str, &str)> = vec![("Action", action), ("Version", "2016-11-15")];
    form.extend_from_slice(params);
    let resp = reqwest::Client::new()
        .post(endpoint())
        .header(
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=test/20240101/{REGION}/ec2/aws4_request, \
                 SignedHeaders=host, Signature=0"
            ),
        )
        .form(&form)
        .send()
        .await
        .expect("calling moto's EC2 API");
    let status = resp.status();
    let body = resp.text().await.expect("moto's EC2 answer");
    assert!(status.is_success(), "EC2 {action}: {status}: {body}");
    body
}

/// The text of the first `<tag>…</tag>` in `xml`.
pub(crate) fn xml_value(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..]
        .find(&format!("</{tag}>"))
        .unwrap_or_else(|| panic!("unterminated <{tag}> in {xml}"));
    xml[start..start + end].to_string()
}

/// Makes the next RunTask calls on `cluster` start `count` fewer tasks and
/// answer with a `failures` entry (`reason`, `detail`) for each, as AWS does
/// when it cannot place them (`/_drover/run-task-failures`, server.py).
pub(crate) async fn run_task_failures(cluster: &str, reason: &str, detail: &str, count: u32) {
    let resp = reqwest::Client::new()
        .post(format!("{}/_drover/run-task-failures", endpoint()))
        .json(&serde_json::json!({
            "cluster": cluster,
            "reason": reason,
            "detail": detail,
            "count": count,
        }))
        .send()
        .await
        .expect("calling moto's harness endpoint");
    let status = resp.status();
    assert!(
        status.is_success(),
        "POST /_drover/run-task-failures: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
}

/// Makes `count` `action` calls of DynamoDB on `table`, after the next
/// `skip`, fail with `code` (HTTP 400, DynamoDB's JSON error:
/// `/_drover/faults`, server.py) before moto sees them, e.g.
/// `ThrottlingException`.
pub(crate) async fn dynamodb_fault(table: &str, action: &str, code: &str, skip: u32, count: u32) {
    post_fault(serde_json::json!({
        "action": action,
        "code": code,
        "skip": skip,
        "count": count,
        "table": table,
    }))
    .await;
}

/// Makes the next `count` `action` calls of DynamoDB on `table` apply, then
/// answer HTTP 500 `InternalServerError` (which the SDK retries): an answer
/// lost on its way back.
pub(crate) async fn dynamodb_lost_answer(table: &str, action: &str, count: u32) {
    post_fault(serde_json::json!({
        "action": action,
        "code": "InternalServerError",
        "message": "Internal server error",
        "status": 500,
        "apply": true,
        "count": count,
        "table": table,
    }))
    .await;
}

async fn post_fault(fault: serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/_drover/faults", endpoint()))
        .json(&fault)
        .send()
        .await
        .expect("calling moto's harness endpoint");
    let status = resp.status();
    assert!(status.is_success(), "POST /_drover/faults: {status}");
}

/// The DynamoDB calls on `table` moto received, in order: `(action, HTTP
/// status)` (`/_drover/calls`).
pub(crate) async fn dynamodb_calls(table: &str) -> Vec<(String, u16)> {
    let calls: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!("{}/_drover/calls", endpoint()))
        .send()
        .await
        .expect("calling moto's harness endpoint")
        .json()
        .await
        .expect("the call log is JSON");
    calls
        .iter()
        .filter(|c| c["service"] == "dynamodb" && c["table"] == table)
        .map(|c| {
            (
                c["action"].as_str().unwrap_or_default().to_string(),
                c["status"].as_u64().unwrap_or_default() as u16,
            )
        })
        .collect()
}
