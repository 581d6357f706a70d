//! The container images of `docker/`: the `scratch` variants (this machine
//! pulls no base image) are built with the local Docker Engine from the
//! workspace's built binaries and run; the production Dockerfiles are checked
//! to build and start the same binaries. Images built here are removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("the docker CLI is not runnable ({e}): install Docker Engine and its CLI")
        })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An image tag this test owns; removed when dropped, pass or fail.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "--force", &self.0]);
    }
}

/// Stages `binary`'s scratch context with `docker/scratch-context.sh` and
/// builds `docker/<name>.scratch.Dockerfile` from it.
fn build_scratch(name: &str) -> Image {
    let binary = drover_tests::binary(name);
    let context = tempfile::tempdir().expect("tempdir");
    let staged = Command::new("bash")
        .arg(root().join("docker/scratch-context.sh"))
        .arg(&binary)
        .arg(context.path())
        .output()
        .expect("bash runs");
    assert!(staged.status.success(), "staging: {}", text(&staged));
    let image = Image(format!("drover-test-{name}:scratch-{}", std::process::id()));
    let short = name.trim_start_matches("drover-");
    let dockerfile = root().join(format!("docker/{short}.scratch.Dockerfile"));
    let built = docker(&[
        "build",
        "--quiet",
        "--force-rm",
        "--label",
        "drover.test=images",
        "--tag",
        &image.0,
        "--file",
        dockerfile.to_str().expect("utf-8 path"),
        context.path().to_str().expect("utf-8 path"),
    ]);
    assert!(built.status.success(), "docker build: {}", text(&built));
    image
}

#[test]
fn scratch_images_run_the_locally_built_binaries() {
    let agent = build_scratch("drover-agent");
    let out = docker(&["run", "--rm", "--network", "none", &agent.0, "--version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("drover-agent {}", env!("CARGO_PKG_VERSION"))
    );
    // The bootstrap subcommand is there too (user-data runs it on the AMI).
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &agent.0,
        "bootstrap",
        "--help",
    ]);
    assert!(
        out.status.success() && text(&out).contains("--join-token-parameter"),
        "{}",
        text(&out)
    );

    let coordinator = build_scratch("drover-coordinator");
    let out = docker(&["run", "--rm", "--network", "none", &coordinator.0, "--help"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Usage: drover-coordinator"),
        "{}",
        text(&out)
    );
}

/// The last `ENTRYPOINT` of a Dockerfile.
fn entrypoint(dockerfile: &str) -> String {
    dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .unwrap_or_else(|| panic!("no ENTRYPOINT in:\n{dockerfile}"))
        .to_string()
}

#[test]
fn production_dockerfiles_build_what_their_scratch_twins_run() {
    for name in ["agent", "coordinator"] {
        let read = |file: &str| {
            std::fs::read_to_string(root().join("docker").join(file))
                .unwrap_or_else(|e| panic!("docker/{file}: {e}"))
        };
        let production = read(&format!("{name}.Dockerfile"));
        let scratch = read(&format!("{name}.scratch.Dockerfile"));
        let froms = production
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count();
        assert!(froms >= 2, "{name}.Dockerfile is multi-stage");
        assert!(
            production.contains(&format!(
                "cargo build --release --locked -p drover-{name} --bin drover-{name}"
            )),
            "{name}.Dockerfile builds drover-{name}"
        );
        assert_eq!(entrypoint(&production), entrypoint(&scratch), "{name}");
        assert_eq!(
            entrypoint(&production),
            format!("[\"/usr/local/bin/drover-{name}\"]")
        );
    }
}
