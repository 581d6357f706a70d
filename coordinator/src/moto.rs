//! moto's server for the coordinator's tests: one per test process on a free
//! loopback port, shared by the DynamoDB store and the scaler tests.
//!
//! moto's own `moto_server` is threaded, and moto checks a condition and
//! applies the write without a lock: two concurrent conditional updates can
//! both pass (AWS never does that). So moto's app is served single-threaded
//! with the same venv's Python instead, with one gap filled the way AWS
//! behaves (AWS-EMULATION.md): `TerminateInstanceInAutoScalingGroup` with
//! decrement is refused when the group is at its minimum size.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{Credentials, Region};

pub(crate) const REGION: &str = "us-east-1";

struct Moto {
    endpoint: String,
    /// `sh` waits on its stdin and kills moto when this process exits and
    /// the pipe closes; holding the child keeps the pipe open.
    _guard: Child,
}

const SERIAL_MOTO: &str = r#"
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.autoscaling.models import AutoScalingBackend
from moto.autoscaling.exceptions import ValidationError

_terminate = AutoScalingBackend.terminate_instance

def terminate_instance(self, instance_id, should_decrement):
    for group in self.autoscaling_groups.values():
        if any(s.instance.id == instance_id for s in group.instance_states):
            if should_decrement and group.desired_capacity <= group.min_size:
                raise ValidationError(
                    "Currently, desiredSize equals minSize (%d). Terminating instance without "
                    "replacement will violate group's min size constraint. Either set "
                    "shouldDecrementDesiredCapacity flag to false or lower group's min size."
                    % group.min_size
                )
    return _terminate(self, instance_id, should_decrement)

AutoScalingBackend.terminate_instance = terminate_instance
run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)
"#;

fn moto_binary() -> PathBuf {
    if let Ok(path) = std::env::var("DROVER_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
}

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let binary = moto_binary();
        assert!(
            binary.exists(),
            "moto_server not found at {}: run scripts/test.sh (it installs moto[server] into .venv) \
             or point DROVER_MOTO_SERVER at a moto_server binary",
            binary.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let python = binary.with_file_name("python");
        let guard = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" -c "$2" "$1" </dev/null >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid"#)
            .arg(&python)
            .arg(port.to_string())
            .arg(SERIAL_MOTO)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = conn.write_all(b"GET /moto-api/ HTTP/1.0\r\n\r\n");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server ({}) did not listen on port {port} within 60s",
                binary.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            _guard: guard,
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
