//! The image the Docker tests run in, built locally (this machine reaches no
//! registry): `FROM scratch` with Debian's static busybox and its applets.

use bollard::query_parameters::{BuildImageOptions, BuilderVersion};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::OnceCell;

/// Tag of the test image; bump it when its content changes.
pub const TEST_IMAGE: &str = "drover-test-busybox:1";

/// Where Debian's `busybox-static` installs the binary.
const BUSYBOX: &str = "/bin/busybox";

const DOCKERFILE: &str = "FROM scratch\n\
COPY busybox /bin/busybox\n\
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n";

static BUILT: OnceCell<()> = OnceCell::const_new();

/// [`ensure`] on the local Engine (as the agent finds it); for harnesses
/// outside this crate. An unreachable Engine is an error naming the fix.
pub async fn ensure_on_local_engine() -> Result<String, super::RuntimeError> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| super::unreachable_engine(&e.to_string()))?;
    let docker = tokio::time::timeout(super::PING_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| super::unreachable_engine("no answer within 5 s"))?
        .map_err(|e| super::unreachable_engine(&e.to_string()))?;
    Ok(ensure(&docker).await)
}

/// Builds [`TEST_IMAGE`] unless it exists; once per test process.
pub async fn ensure(docker: &Docker) -> String {
    BUILT
        .get_or_init(|| async {
            if docker.inspect_image(TEST_IMAGE).await.is_ok() {
                return;
            }
            build(docker).await;
        })
        .await;
    TEST_IMAGE.to_string()
}

async fn build(docker: &Docker) {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("cannot read {BUSYBOX}: {e} — install a static busybox: apt-get install -y busybox-static")
    });
    let mut context = Vec::new();
    tar_file(&mut context, "Dockerfile", 0o644, DOCKERFILE.as_bytes());
    tar_file(&mut context, "busybox", 0o755, &busybox);
    context.extend_from_slice(&[0u8; 1024]);
    let options = BuildImageOptions {
        t: Some(TEST_IMAGE.to_string()),
        dockerfile: "Dockerfile".to_string(),
        rm: true,
        forcerm: true,
        version: BuilderVersion::BuilderV1,
        ..Default::default()
    };
    let mut progress = docker.build_image(
        options,
        None,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    let mut log = String::new();
    while let Some(item) = progress.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    panic!("building {TEST_IMAGE} failed: {detail:?}\n{log}");
                }
                log.push_str(info.stream.as_deref().unwrap_or_default());
            }
            Err(e) => panic!("building {TEST_IMAGE} failed: {e}\n{log}"),
        }
    }
}

/// Appends one regular file to a ustar archive.
pub(crate) fn tar_file(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], mode.into());
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], data.len() as u64);
    octal(&mut header[136..148], 0);
    header[148..156].fill(b' ');
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}
