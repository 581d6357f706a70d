//! TLS (DESIGN §9): a coordinator with a certificate from a private CA serves
//! only TLS on both listeners; the CLI and agents that trust the CA work
//! over it, and everything else is refused with a message naming the fix.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use drover_proto::model::{JobList, JobState};
use drover_tests::{
    binary, wait_until, CoordinatorSettings, Sandbox, TlsFiles, ADMIN_TOKEN, JOIN_TOKEN,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A private CA and a server certificate it issued for 127.0.0.1 and
/// localhost, as PEM files in `dir`.
fn private_ca(dir: &Path) -> TlsFiles {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Drover test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "drover-coordinator");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let files = TlsFiles {
        cert_file: dir.join("coordinator.pem"),
        key_file: dir.join("coordinator.key"),
        ca_file: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert_file, server_cert.pem()).unwrap();
    std::fs::write(&files.key_file, server_key.serialize_pem()).unwrap();
    std::fs::write(&files.ca_file, ca_cert.pem()).unwrap();
    files
}

async fn drover(addr: &str, ca_file: Option<&Path>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(binary("drover"));
    command
        .arg("--addr")
        .arg(addr)
        .env("DROVER_TOKEN", ADMIN_TOKEN)
        .env_remove("DROVER_CONFIG")
        .env_remove("DROVER_TLS_CA_FILE");
    if let Some(ca_file) = ca_file {
        command.arg("--ca-file").arg(ca_file);
    }
    command.args(args).output().await.expect("running drover")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_over_https_runs_on_a_tls_agent_and_its_logs_and_artifact_read_back() {
    let certs = tempfile::tempdir().unwrap();
    let tls = private_ca(certs.path());
    // Registration (over TLS gRPC) is awaited through the https client.
    let sandbox = Sandbox::start_tls(1, CoordinatorSettings::default(), &tls).await;
    let addr = format!("https://{}", sandbox.coordinator.http_addr);
    let ca = Some(tls.ca_file.as_path());

    let out = drover(
        &addr,
        ca,
        &[
            "submit",
            "--wait",
            "--outputs",
            "--name",
            "over-tls",
            "--",
            "sh",
            "-c",
            "echo hello over tls; echo kept > \"$DROVER_OUTPUT_DIR/kept.txt\"",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello over tls"),
        "{}",
        text(&out.stdout)
    );

    let out = drover(&addr, ca, &["--json", "jobs", "--name", "over-tls"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: JobList = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.jobs.len(), 1);
    assert_eq!(list.jobs[0].state, JobState::Succeeded);
    let id = list.jobs[0].id.clone();

    let out = drover(&addr, ca, &["logs", &id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hello over tls"),
        "{}",
        text(&out.stdout)
    );

    // The agent uploaded to, and the CLI downloads from, an https URL the
    // coordinator signed: both trust the private CA.
    let unpacked = tempfile::tempdir().unwrap();
    let dest = unpacked.path().join("out");
    let out = drover(
        &addr,
        ca,
        &["artifacts", "get", &id, "-x", &dest.to_string_lossy()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(dest.join("kept.txt")).unwrap(),
        "kept\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_get_no_service_from_a_tls_coordinator() {
    let certs = tempfile::tempdir().unwrap();
    let tls = private_ca(certs.path());
    let sandbox = Sandbox::start_tls(0, CoordinatorSettings::default(), &tls).await;

    // http:// to the HTTPS port.
    let out = drover(
        &format!("http://{}", sandbox.coordinator.http_addr),
        None,
        &["jobs"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("https://"), "{stderr}");

    // Plaintext gRPC to the gRPC port: Register never reaches the service.
    let client = drover_agent::client::Client::new(
        &format!("http://{}", sandbox.coordinator.grpc_addr),
        None,
    )
    .unwrap();
    let err = client
        .register(drover_proto::v1::RegisterRequest {
            join_token: JOIN_TOKEN.into(),
            agent: Some(drover_proto::v1::AgentInfo {
                agent_id: "plaintext".into(),
                pool: "default".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("https://"), "{err}");
    let agents = sandbox.client.list_agents().await.unwrap();
    assert!(agents.agents.is_empty(), "{agents:?}");

    // And the same CLI without the CA: the certificate is not trusted.
    let out = drover(
        &format!("https://{}", sandbox.coordinator.http_addr),
        None,
        &["jobs"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("not trusted"), "{stderr}");
    assert!(stderr.contains("--ca-file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_ca_cannot_register_and_says_to_set_tls_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    let tls = private_ca(certs.path());
    let sandbox = Sandbox::start_tls(0, CoordinatorSettings::default(), &tls).await;
    let mut command = sandbox.agent_command("no-ca", &[]);
    command
        .env_remove("DROVER_TLS_CA_FILE")
        .stdout(std::process::Stdio::piped());
    let mut agent = command.spawn().expect("starting drover-agent");
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("register failed") {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    let Ok(Some(line)) = found else {
        panic!("no register failure logged; the agent said: {seen:#?}");
    };
    assert!(line.contains("not trusted"), "{line}");
    assert!(line.contains("DROVER_TLS_CA_FILE"), "{line}");
    let agents = sandbox.client.list_agents().await.unwrap();
    assert!(agents.agents.is_empty(), "{agents:?}");
}

/// `DROVER_TLS_*` variables and their files.
type TlsEnv<'a> = Vec<(&'a str, &'a Path)>;

/// The coordinator on `dir` with `tls` settings, writing `dir/ready.json`
/// once it listens.
fn coordinator_command(dir: &Path, tls: &[(&str, &Path)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("drover-coordinator"));
    command
        .arg("--ready-file")
        .arg(dir.join("ready.json"))
        .env_remove("DROVER_CONFIG")
        .env("DROVER_DATA_DIR", dir.join("data"))
        .env("DROVER_GRPC_ADDR", "127.0.0.1:0")
        .env("DROVER_HTTP_ADDR", "127.0.0.1:0")
        .env("DROVER_JOIN_TOKEN", JOIN_TOKEN)
        .env("DROVER_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (k, v) in tls {
        command.env(k, v);
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_coordinator_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let tls = private_ca(dir.path());
    let other = tempfile::tempdir().unwrap();
    let other = private_ca(other.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let key_text = std::fs::read_to_string(&tls.key_file).unwrap();
    let key_body = key_text.lines().nth(1).unwrap().to_string();

    // What is wrong, the settings, the setting the error must name.
    let cases: [(&str, TlsEnv, &str); 4] = [
        (
            "a certificate without a key",
            vec![("DROVER_TLS_CERT_FILE", &tls.cert_file)],
            "tls_key_file",
        ),
        (
            "a key that is not the certificate's",
            vec![
                ("DROVER_TLS_CERT_FILE", &tls.cert_file),
                ("DROVER_TLS_KEY_FILE", &other.key_file),
            ],
            "tls_key_file",
        ),
        (
            "a certificate file without a certificate",
            vec![
                ("DROVER_TLS_CERT_FILE", &garbage),
                ("DROVER_TLS_KEY_FILE", &tls.key_file),
            ],
            "tls_cert_file",
        ),
        (
            "a key file without a key",
            vec![
                ("DROVER_TLS_CERT_FILE", &tls.cert_file),
                ("DROVER_TLS_KEY_FILE", &garbage),
            ],
            "tls_key_file",
        ),
    ];
    let ready = dir.path().join("ready.json");
    for (what, settings, setting) in cases {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            coordinator_command(dir.path(), &settings).output(),
        )
        .await
        .expect("the coordinator exits")
        .unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        assert!(stderr.contains(setting), "{what}: {stderr}");
        assert!(!ready.exists(), "{what}: it listened before failing");
        assert!(
            !stderr.contains(&key_body),
            "{what}: the key leaked: {stderr}"
        );
    }

    // The good pair starts (the control for the cases above).
    let mut good = coordinator_command(
        dir.path(),
        &[
            ("DROVER_TLS_CERT_FILE", &tls.cert_file),
            ("DROVER_TLS_KEY_FILE", &tls.key_file),
        ],
    )
    .spawn()
    .unwrap();
    wait_until(
        "the coordinator with a good pair to listen",
        Duration::from_secs(20),
        || {
            let ready = ready.clone();
            async move { ready.exists().then_some(()) }
        },
    )
    .await;
    let _ = good.kill().await;
}
