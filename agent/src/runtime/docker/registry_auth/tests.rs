//! Pull credentials: the Docker config's parsing and key matching, ECR
//! against moto's server, and real pulls by the Engine from a loopback
//! registry that demands basic auth.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use sha2::Digest as _;

use super::*;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::suite::{collect, Ctx, SuiteRuntime};
use crate::runtime::Runtime;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn config(json: serde_json::Value) -> DockerConfig {
    DockerConfig::parse(&json.to_string()).unwrap()
}

fn user_password(entry: Option<AuthEntry>) -> Option<(String, String)> {
    entry.map(|e| (e.username.unwrap(), e.password.unwrap()))
}

fn pair(user: &str, password: &str) -> Option<(String, String)> {
    Some((user.to_string(), password.to_string()))
}

#[test]
fn registry_of_a_reference_follows_the_docker_cli() {
    use Registry::*;
    for image in [
        "busybox",
        "busybox:1.36",
        "team/app:1",
        "docker.io/library/busybox",
        "index.docker.io/team/app",
        "registry-1.docker.io/team/app@sha256:abc",
    ] {
        assert_eq!(Registry::of(image), DockerHub, "{image}");
    }
    assert_eq!(Registry::of("localhost/app"), Host("localhost"));
    assert_eq!(Registry::of("localhost:5000/app:1"), Host("localhost:5000"));
    assert_eq!(Registry::of("r.example/team/app"), Host("r.example"));
    assert_eq!(Registry::of("127.0.0.1:5000/app"), Host("127.0.0.1:5000"));
    assert_eq!(
        Registry::of("123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:2"),
        Host("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
    );
}

#[test]
fn config_keys_match_with_or_without_scheme_and_path() {
    let host = Registry::Host("r.example:5000");
    for key in [
        "r.example:5000",
        "https://r.example:5000",
        "http://r.example:5000/v1/",
        "R.Example:5000",
    ] {
        assert!(host.matches_key(key), "{key}");
    }
    for key in ["r.example", "r.example:5001", "https://other:5000"] {
        assert!(!host.matches_key(key), "{key}");
    }
    let hub = Registry::DockerHub;
    for key in [DOCKER_HUB_KEY, "docker.io", "https://registry-1.docker.io"] {
        assert!(hub.matches_key(key), "{key}");
    }
    assert!(!hub.matches_key("quay.io"));
}

#[test]
fn auth_decodes_to_user_and_password_and_identity_tokens_are_kept() {
    let c = config(serde_json::json!({"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hub:pass")},
        "r.example": {"username": "u", "password": "p"},
        "id.example": {"auth": b64("<token>:"), "identitytoken": "refresh-token"},
        "both.example": {"username": "old", "password": "old", "auth": b64("new:secret")},
    }}));
    // Only the first colon separates: passwords may contain colons.
    assert_eq!(
        user_password(c.lookup(Registry::of("busybox"))),
        pair("hubuser", "hub:pass")
    );
    assert_eq!(
        user_password(c.lookup(Registry::of("r.example/app"))),
        pair("u", "p")
    );
    assert_eq!(
        user_password(c.lookup(Registry::of("both.example/app"))),
        pair("new", "secret"),
        "`auth` wins, as in the Docker CLI"
    );
    let id = c.lookup(Registry::of("id.example/app")).unwrap();
    assert_eq!(id.identity_token.as_deref(), Some("refresh-token"));
    assert_eq!(c.lookup(Registry::of("other.example/app")), None);

    let credentials = id.into_credentials(Registry::Host("id.example"));
    assert_eq!(credentials.identitytoken.as_deref(), Some("refresh-token"));
    assert_eq!(credentials.serveraddress.as_deref(), Some("id.example"));
}

#[test]
fn the_exact_key_wins_over_one_with_a_scheme() {
    let c = config(serde_json::json!({"auths": {
        "https://r.example": {"username": "schemed", "password": "1"},
        "r.example": {"username": "exact", "password": "2"},
        "docker.io": {"username": "short-hub", "password": "3"},
    }}));
    assert_eq!(
        user_password(c.lookup(Registry::of("r.example/app"))),
        pair("exact", "2")
    );
    // Without the CLI's own Docker Hub key, another spelling of Hub is used.
    assert_eq!(
        user_password(c.lookup(Registry::of("busybox"))),
        pair("short-hub", "3")
    );
}

#[test]
fn entries_left_by_a_credential_helper_give_no_credentials() {
    let c = config(serde_json::json!({
        "auths": {"r.example": {}},
        "credsStore": "desktop",
        "credHelpers": {"q.example": "gcloud"},
    }));
    assert_eq!(c.lookup(Registry::of("r.example/app")), None);
    assert_eq!(c.helper_for(Registry::of("r.example/app")), Some("desktop"));
    assert_eq!(c.helper_for(Registry::of("q.example/app")), Some("gcloud"));
}

#[test]
fn auth_entries_never_show_their_secrets_in_debug() {
    let c = config(serde_json::json!({"auths": {
        "r.example": {"auth": b64("user:hunter2"), "identitytoken": "tok-123"},
    }}));
    let entry = c.lookup(Registry::of("r.example/x")).unwrap();
    let debug = format!("{entry:?}");
    assert!(debug.contains("user"), "{debug}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("tok-123"),
        "{debug}"
    );
}

#[tokio::test]
async fn a_missing_docker_config_means_anonymous_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let auth = DockerConfigAuth::at(dir.path().join("config.json"));
    assert!(auth.credentials("r.example/app:1").await.unwrap().is_none());
    assert!(auth.credentials("busybox").await.unwrap().is_none());
}

#[tokio::test]
async fn a_malformed_docker_config_is_an_infra_error_naming_the_file_not_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let secret_auth = b64("no-colon-hunter2");
    let broken = [
        "{\"auths\": {".to_string(),
        serde_json::json!({"auths": {"r.example": {"auth": secret_auth}}}).to_string(),
        serde_json::json!({"auths": {"r.example": {"password": 7}}}).to_string(),
        serde_json::json!({"auths": "hunter2"}).to_string(),
    ];
    for text in broken {
        std::fs::write(&path, &text).unwrap();
        let err = DockerConfigAuth::at(&path)
            .credentials("r.example/app:1")
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(!err.is_job_failure(), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("malformed"), "{message}");
        assert!(
            !message.contains("hunter2") && !message.contains(&secret_auth),
            "a secret leaked: {message}"
        );
    }
}

#[tokio::test]
async fn docker_config_credentials_are_read_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let json = serde_json::json!({"auths": {"https://r.example:5000/v1/": {"auth": b64("u:p")}}});
    std::fs::write(&path, json.to_string()).unwrap();
    let credentials = DockerConfigAuth::at(&path)
        .credentials("r.example:5000/team/app:1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(credentials.username.as_deref(), Some("u"));
    assert_eq!(credentials.password.as_deref(), Some("p"));
    assert_eq!(credentials.serveraddress.as_deref(), Some("r.example:5000"));
}

#[test]
fn ecr_registry_hosts_are_recognised_and_others_are_not() {
    let ecr = |account: &str, region: &str| {
        Some(EcrRegistry {
            account: account.into(),
            region: region.into(),
        })
    };
    assert_eq!(
        EcrRegistry::parse("123456789012.dkr.ecr.us-east-1.amazonaws.com"),
        ecr("123456789012", "us-east-1")
    );
    assert_eq!(
        EcrRegistry::parse("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"),
        ecr("123456789012", "cn-north-1")
    );
    assert_eq!(
        EcrRegistry::parse("123456789012.DKR.ECR.eu-west-1.AMAZONAWS.COM:443"),
        ecr("123456789012", "eu-west-1")
    );
    for host in [
        "r.example",
        "localhost:5000",
        "public.ecr.aws",
        "12345678901.dkr.ecr.us-east-1.amazonaws.com",
        "12345678901x.dkr.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example",
        "123456789012.dkr.ecr.us_east_1.amazonaws.com",
        "x.123456789012.dkr.ecr.us-east-1.amazonaws.com",
    ] {
        assert_eq!(EcrRegistry::parse(host), None, "{host}");
    }
}

#[test]
fn ecr_errors_are_infra_errors_that_say_what_to_do() {
    let host = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
    let cases = [
        (Some(400), Some("ThrottlingException"), "will be retried"),
        (
            Some(503),
            Some("ServiceUnavailableException"),
            "will be retried",
        ),
        (None, None, "will be retried"),
        (
            Some(400),
            Some("AccessDeniedException"),
            "ecr:GetAuthorizationToken",
        ),
    ];
    for (status, code, expected) in cases {
        let err = ecr_error(host, status, code, "boom");
        let message = err.to_string();
        assert!(!err.is_job_failure(), "{message}");
        assert!(message.contains(host), "{message}");
        assert!(message.contains(expected), "{code:?}: {message}");
    }
}

/// moto's server on a free loopback port, stopped when dropped (and when
/// this process dies: its wrapper waits on our end of a pipe).
struct Moto {
    endpoint: String,
    _guard: Child,
}

impl Moto {
    fn start() -> Moto {
        let server = std::env::var("DROVER_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
            });
        assert!(
            server.exists(),
            "moto_server not found at {}: run scripts/test.sh (it installs moto[server] into .venv) \
             or point DROVER_MOTO_SERVER at a moto_server binary",
            server.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let guard = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" -H 127.0.0.1 -p "$1" </dev/null >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid"#)
            .arg(&server)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            _guard: guard,
        }
    }

    async fn ecr_auth(&self) -> EcrAuth {
        EcrAuth::with_sdk_config(sdk_config(&self.endpoint).await)
    }
}

/// Static test credentials; the default chain is never consulted.
async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ecr::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .endpoint_url(endpoint)
        .http_client(crate::platform::http_client())
        .load()
        .await
}

/// moto's tokens all expire at 2015-01-01T00:00:00Z (AWS's last 12 hours
/// from now), so the tests set the clock relative to that.
const MOTO_EXPIRY_S: u64 = 1_420_070_400;

fn an_hour_before_motos_expiry() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(MOTO_EXPIRY_S - 3600)
}

fn a_minute_before_motos_expiry() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(MOTO_EXPIRY_S - 60)
}

/// moto's default account; its password is `<account>-auth-token`.
const MOTO_ACCOUNT: &str = "123456789012";

#[tokio::test]
async fn ecr_tokens_from_moto_are_decoded_and_cached_per_registry() {
    let moto = Moto::start();
    let ecr = moto
        .ecr_auth()
        .await
        .with_clock(an_hour_before_motos_expiry);
    let image = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/team/app:1");
    for _ in 0..2 {
        let credentials = ecr.credentials(&image).await.unwrap().unwrap();
        assert_eq!(credentials.username.as_deref(), Some("AWS"));
        assert_eq!(
            credentials.password.as_deref(),
            Some(format!("{MOTO_ACCOUNT}-auth-token").as_str())
        );
        assert_eq!(
            credentials.serveraddress.as_deref(),
            Some(format!("https://{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com").as_str())
        );
    }
    assert_eq!(ecr.token_requests(), 1, "the second pull used the cache");

    let other_region = format!("{MOTO_ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/app@sha256:abc");
    assert!(ecr.credentials(&other_region).await.unwrap().is_some());
    assert_eq!(ecr.token_requests(), 2, "another registry, another token");

    assert!(ecr.credentials("r.example/app:1").await.unwrap().is_none());
    assert!(ecr.credentials("busybox").await.unwrap().is_none());
    assert_eq!(ecr.token_requests(), 2, "no token for other registries");
}

#[tokio::test]
async fn an_ecr_token_about_to_expire_is_fetched_again() {
    let moto = Moto::start();
    let ecr = moto
        .ecr_auth()
        .await
        .with_clock(a_minute_before_motos_expiry);
    let image = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/app:1");
    for _ in 0..2 {
        ecr.credentials(&image).await.unwrap().unwrap();
    }
    assert_eq!(ecr.token_requests(), 2);
}

#[tokio::test]
async fn chain_auth_asks_ecr_for_ecr_registries_and_the_docker_config_for_others() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let json = serde_json::json!({"auths": {"r.example": {"auth": b64("u:p")}}});
    std::fs::write(&path, json.to_string()).unwrap();
    let ecr = moto
        .ecr_auth()
        .await
        .with_clock(an_hour_before_motos_expiry);
    let chain = ChainAuth::from_parts(ecr, DockerConfigAuth::at(&path));

    let ecr_image = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/app:1");
    let from_ecr = chain.credentials(&ecr_image).await.unwrap().unwrap();
    assert_eq!(from_ecr.username.as_deref(), Some("AWS"));
    let from_config = chain.credentials("r.example/app:1").await.unwrap().unwrap();
    assert_eq!(from_config.username.as_deref(), Some("u"));
    assert!(chain.credentials("busybox").await.unwrap().is_none());
    assert_eq!(chain.ecr.token_requests(), 1);
}

#[tokio::test]
async fn an_unreachable_ecr_endpoint_is_an_infra_error() {
    // Bound and dropped: nothing listens there any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let ecr = EcrAuth::with_sdk_config(sdk_config(&format!("http://{closed}")).await);
    let image = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/app:1");
    let err = ecr.credentials(&image).await.unwrap_err();
    assert!(!err.is_job_failure(), "{err}");
    assert!(err.to_string().contains("will be retried"), "{err}");
}

/// A one-image registry on loopback (the Engine trusts 127.0.0.0/8 over
/// plain HTTP) that demands basic auth as `user`:`password` on every
/// request. The image has one layer: Debian's static busybox.
struct AuthRegistry {
    addr: String,
}

const REGISTRY_USER: &str = "drover";
const REGISTRY_PASSWORD: &str = "s3cret:pw";

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex_lower(&sha2::Sha256::digest(data)))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// (manifest, blobs by digest) of a `linux/<host arch>` image whose only
/// layer holds `/bin/busybox`.
fn busybox_image() -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|e| {
        panic!("cannot read /bin/busybox: {e} — install a static busybox: apt-get install -y busybox-static")
    });
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(busybox.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    layer
        .append_data(&mut header, "bin/busybox", &busybox[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_digest = sha256_digest(&layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    })
    .to_string()
    .into_bytes();
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    })
    .to_string()
    .into_bytes();
    let blobs = HashMap::from([(config_digest, config), (layer_digest, layer)]);
    (manifest, blobs)
}

impl AuthRegistry {
    async fn start() -> AuthRegistry {
        use axum::extract::{Path as UrlPath, Request};
        use axum::http::{header, StatusCode};
        use axum::middleware::Next;
        use axum::response::{IntoResponse, Response};

        let (manifest, blobs) = busybox_image();
        let manifest_digest = sha256_digest(&manifest);
        let manifest = Arc::new(manifest);
        let blobs = Arc::new(blobs);
        let expected = format!(
            "Basic {}",
            b64(&format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"))
        );

        let not_found = || {
            let body = serde_json::json!({"errors": [{
                "code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {},
            }]});
            (StatusCode::NOT_FOUND, body.to_string()).into_response()
        };
        let manifests = move |UrlPath((_name, reference)): UrlPath<(String, String)>| {
            let manifest = manifest.clone();
            let manifest_digest = manifest_digest.clone();
            async move {
                if reference != "1" && reference != manifest_digest {
                    return not_found();
                }
                (
                    [
                        (
                            header::CONTENT_TYPE,
                            "application/vnd.oci.image.manifest.v1+json".to_string(),
                        ),
                        (
                            header::HeaderName::from_static("docker-content-digest"),
                            manifest_digest,
                        ),
                    ],
                    manifest.as_ref().clone(),
                )
                    .into_response()
            }
        };
        let blob = move |UrlPath((_name, digest)): UrlPath<(String, String)>| {
            let blobs = blobs.clone();
            async move {
                match blobs.get(&digest) {
                    Some(data) => (
                        [
                            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                            (
                                header::HeaderName::from_static("docker-content-digest"),
                                digest,
                            ),
                        ],
                        data.clone(),
                    )
                        .into_response(),
                    None => not_found(),
                }
            }
        };
        let require_auth = move |request: Request, next: Next| {
            let expected = expected.clone();
            async move {
                let given = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                if given == Some(expected.as_str()) {
                    return next.run(request).await;
                }
                let body = serde_json::json!({"errors": [{
                    "code": "UNAUTHORIZED", "message": "authentication required", "detail": {},
                }]});
                let response: Response = (
                    StatusCode::UNAUTHORIZED,
                    [
                        (header::WWW_AUTHENTICATE, "Basic realm=\"drover-test\""),
                        (header::CONTENT_TYPE, "application/json"),
                    ],
                    body.to_string(),
                )
                    .into_response();
                response
            }
        };
        let app = axum::Router::new()
            .route("/v2/", axum::routing::get(|| async { "{}" }))
            .route(
                "/v2/{name}/manifests/{reference}",
                axum::routing::get(manifests),
            )
            .route("/v2/{name}/blobs/{digest}", axum::routing::get(blob))
            .layer(axum::middleware::from_fn(require_auth));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        AuthRegistry { addr }
    }

    /// A reference no other test uses, so nothing is cached by the Engine.
    fn image(&self) -> String {
        format!("{}/drover-auth-{:016x}:1", self.addr, rand::random::<u64>())
    }

    /// A Docker config holding `user`:`password` for this registry.
    fn docker_config(&self, dir: &Path, user: &str, password: &str) -> DockerConfigAuth {
        let path = dir.join("docker-config.json");
        let key = format!("http://{}", self.addr);
        let json =
            serde_json::json!({"auths": {key: {"auth": b64(&format!("{user}:{password}"))}}});
        std::fs::write(&path, json.to_string()).unwrap();
        DockerConfigAuth::at(path)
    }
}

fn runtime_with(dir: &Path, auth: DockerConfigAuth) -> DockerRuntime {
    DockerRuntime::new(dir, &format!("test-{:016x}", rand::random::<u64>()))
        .with_registry_auth(Arc::new(auth))
}

async fn remove_image(rt: &DockerRuntime, image: &str) {
    let options = bollard::query_parameters::RemoveImageOptions {
        force: true,
        ..Default::default()
    };
    let _ = rt
        .docker()
        .await
        .unwrap()
        .remove_image(image, Some(options), None)
        .await;
}

#[tokio::test]
async fn a_registry_demanding_basic_auth_is_pulled_from_with_docker_config_credentials() {
    let registry = AuthRegistry::start().await;
    let config_dir = tempfile::tempdir().unwrap();
    let auth = registry.docker_config(config_dir.path(), REGISTRY_USER, REGISTRY_PASSWORD);
    let cx = Ctx::new(|dir| runtime_with(dir, auth)).await;
    let image = registry.image();
    let mut spec = cx.command(["/bin/busybox", "echo", "pulled"]);
    spec.image = image.clone();
    let result = cx.rt.start(spec).await;
    let outcome = match result {
        Ok(started) => {
            let (status, out, _, job) = collect(started).await;
            job.cleanup().await;
            Ok((status, out))
        }
        Err(e) => Err(e),
    };
    remove_image(&cx.rt, &image).await;
    let (status, out) = outcome.expect("the pull with credentials failed");
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "pulled\n");
    cx.rt.assert_nothing_left().await;
}

#[tokio::test]
async fn a_registry_demanding_basic_auth_fails_the_job_without_or_with_wrong_credentials() {
    let registry = AuthRegistry::start().await;
    let config_dir = tempfile::tempdir().unwrap();
    let none = DockerConfigAuth::at(config_dir.path().join("absent.json"));
    let wrong = registry.docker_config(config_dir.path(), REGISTRY_USER, "wrong");
    for (what, auth) in [("no credentials", none), ("wrong credentials", wrong)] {
        let cx = Ctx::new(|dir| runtime_with(dir, auth)).await;
        let image = registry.image();
        let mut spec = cx.command(["/bin/busybox", "true"]);
        spec.image = image.clone();
        let result = cx.rt.start(spec).await;
        remove_image(&cx.rt, &image).await;
        let err = match result {
            Ok(_) => panic!("{what}: the image was pulled"),
            Err(e) => e,
        };
        assert!(err.is_job_failure(), "{what}: {err}");
        assert!(err.to_string().contains("access denied"), "{what}: {err}");
        assert!(
            !err.to_string().contains(REGISTRY_PASSWORD),
            "{what}: {err}"
        );
        cx.rt.assert_nothing_left().await;
    }
}
