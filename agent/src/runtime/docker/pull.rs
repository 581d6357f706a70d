//! Getting a job's image onto the host: the pull policy, registry
//! credentials (the [`RegistryAuth`] seam; implementations in
//! `registry_auth.rs`) and the classification of pull errors into job
//! failures and infra retries.

use std::time::Duration;

use async_trait::async_trait;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use futures::StreamExt;

use crate::runtime::RuntimeError;

/// A pull that takes longer than this is an infra failure (a stuck registry
/// or a saturated link), not a job that runs forever without starting.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// When to pull a job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull before every attempt (a moving tag may have moved).
    Always,
    /// Use the local image when there is one.
    IfNotPresent,
}

impl PullPolicy {
    /// `always` for `latest` and untagged references (which mean `latest`),
    /// `if-not-present` for other tags and for digests, which cannot move.
    pub fn default_for(image: &str) -> PullPolicy {
        match split_reference(image) {
            (_, _, Some(_)) => PullPolicy::IfNotPresent,
            (_, None, None) => PullPolicy::Always,
            (_, Some("latest"), None) => PullPolicy::Always,
            _ => PullPolicy::IfNotPresent,
        }
    }
}

/// `registry:5000/team/app:1.2@sha256:…` → (`registry:5000/team/app`,
/// `Some("1.2")`, `Some("sha256:…")`). A colon before the last `/` belongs
/// to the registry's port, not to a tag.
pub fn split_reference(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let name_start = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[name_start..].rfind(':') {
        Some(i) => (
            &rest[..name_start + i],
            Some(&rest[name_start + i + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

/// Where pull credentials come from: ECR (`GetAuthorizationToken`), the
/// Docker config, both ([`ChainAuth`](super::ChainAuth), the default) or
/// none ([`Anonymous`]).
#[async_trait]
pub trait RegistryAuth: Send + Sync + 'static {
    /// Credentials for pulling `image`, or `None` for an anonymous pull. An
    /// error is an infra error: the credential source failed, not the job.
    async fn credentials(&self, image: &str) -> Result<Option<DockerCredentials>, RuntimeError>;
}

/// Anonymous pulls only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Anonymous;

#[async_trait]
impl RegistryAuth for Anonymous {
    async fn credentials(&self, _image: &str) -> Result<Option<DockerCredentials>, RuntimeError> {
        Ok(None)
    }
}

/// Makes `image` present locally according to `policy`.
pub async fn ensure_image(
    docker: &Docker,
    image: &str,
    policy: PullPolicy,
    auth: &dyn RegistryAuth,
) -> Result<(), RuntimeError> {
    if policy == PullPolicy::IfNotPresent {
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(DockerError::DockerResponseServerError {
                status_code: 400,
                message,
            }) => return Err(invalid_reference(image, &message)),
            Err(e) => {
                return Err(RuntimeError::Infra(format!(
                    "cannot inspect image {image:?}: {e}"
                )))
            }
        }
    }
    let credentials = auth.credentials(image).await?;
    let (repo, tag, digest) = split_reference(image);
    let options = CreateImageOptions {
        from_image: Some(repo.to_string()),
        // An empty tag would pull every tag of the repository.
        tag: Some(digest.or(tag).unwrap_or("latest").to_string()),
        ..Default::default()
    };
    let pull = async {
        let mut progress = docker.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail {
                        let message = detail.message.unwrap_or_default();
                        return Err(classify_pull_error(image, None, &message));
                    }
                }
                Err(DockerError::DockerResponseServerError {
                    status_code,
                    message,
                }) => return Err(classify_pull_error(image, Some(status_code), &message)),
                Err(DockerError::DockerStreamError { error }) => {
                    return Err(classify_pull_error(image, None, &error))
                }
                Err(e) => {
                    return Err(RuntimeError::Infra(format!(
                        "cannot pull image {image:?}: {e}"
                    )))
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(PULL_TIMEOUT, pull).await {
        Ok(result) => result,
        Err(_) => Err(RuntimeError::Infra(format!(
            "pulling image {image:?} took over {} min",
            PULL_TIMEOUT.as_secs() / 60
        ))),
    }
}

fn invalid_reference(image: &str, message: &str) -> RuntimeError {
    RuntimeError::Job(format!(
        "image {image:?} is not a valid image reference: {message}"
    ))
}

/// Sorts a failed pull: what retrying cannot fix (no such image or tag,
/// access denied, a malformed reference) fails the job; registry 5xx,
/// throttling and network trouble are infra errors, retried elsewhere.
///
/// An unreachable registry (DNS failure, connection refused, timeout) is an
/// infra error even when the name is wrong, because the agent cannot tell
/// the two apart and retries are bounded by the infra budget; a registry
/// that answers "not found" is believed.
pub fn classify_pull_error(image: &str, status: Option<u16>, message: &str) -> RuntimeError {
    let m = message.to_ascii_lowercase();
    const TRANSIENT: &[&str] = &[
        "toomanyrequests",
        "too many requests",
        "rate limit",
        "unexpected http status: 5",
        "service unavailable",
        "bad gateway",
        "gateway timeout",
        "internal server error",
        "timeout",
        "timed out",
        "deadline exceeded",
        "connection refused",
        "connection reset",
        "no such host",
        "name resolution",
        "server misbehaving",
        "network is unreachable",
        "no route to host",
        "tls handshake",
        "unexpected eof",
        "no space left",
    ];
    const NOT_FOUND: &[&str] = &[
        "manifest unknown",
        "not found",
        "repository does not exist",
        "name unknown",
        "no such image",
    ];
    const DENIED: &[&str] = &[
        "pull access denied",
        "unauthorized",
        "access denied",
        "access to the resource is denied",
        "authentication required",
        "no basic auth credentials",
        "forbidden",
    ];
    if TRANSIENT.iter().any(|t| m.contains(t)) {
        return RuntimeError::Infra(format!(
            "cannot pull image {image:?} (registry or network trouble, will be retried): {message}"
        ));
    }
    if DENIED.iter().any(|t| m.contains(t)) {
        return RuntimeError::Job(format!(
            "image {image:?} not found or access denied: {message} — check the image name and the registry's credentials"
        ));
    }
    if status == Some(404) || NOT_FOUND.iter().any(|t| m.contains(t)) {
        return RuntimeError::Job(format!("image {image:?} not found: {message}"));
    }
    if status == Some(400) || m.contains("invalid reference format") {
        return invalid_reference(image, message);
    }
    RuntimeError::Infra(format!("cannot pull image {image:?}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_name_tag_and_digest() {
        assert_eq!(split_reference("busybox"), ("busybox", None, None));
        assert_eq!(
            split_reference("busybox:1.36"),
            ("busybox", Some("1.36"), None)
        );
        assert_eq!(
            split_reference("registry:5000/team/app"),
            ("registry:5000/team/app", None, None)
        );
        assert_eq!(
            split_reference("registry:5000/team/app:2@sha256:abc"),
            ("registry:5000/team/app", Some("2"), Some("sha256:abc"))
        );
    }

    #[test]
    fn latest_and_untagged_images_are_always_pulled() {
        assert_eq!(PullPolicy::default_for("app"), PullPolicy::Always);
        assert_eq!(PullPolicy::default_for("app:latest"), PullPolicy::Always);
        assert_eq!(
            PullPolicy::default_for("localhost:5000/app"),
            PullPolicy::Always
        );
        assert_eq!(PullPolicy::default_for("app:1"), PullPolicy::IfNotPresent);
        assert_eq!(
            PullPolicy::default_for("app@sha256:abc"),
            PullPolicy::IfNotPresent
        );
    }

    #[test]
    fn pull_errors_are_classified_as_job_or_infra() {
        let job = [
            (Some(404), "manifest for x:1 not found: manifest unknown: manifest unknown"),
            (Some(404), "pull access denied for x, repository does not exist or may require 'docker login': denied: requested access to the resource is denied"),
            (Some(500), "unauthorized: authentication required"),
            (Some(500), "Head \"http://127.0.0.1:5000/v2/x/manifests/1\": no basic auth credentials"),
            (Some(400), "invalid reference format: repository name must be lowercase"),
        ];
        for (status, msg) in job {
            let e = classify_pull_error("x:1", status, msg);
            assert!(e.is_job_failure(), "{msg} → {e}");
            assert!(e.to_string().contains("\"x:1\""), "{e}");
        }
        let infra = [
            (Some(500), "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host"),
            (Some(500), "received unexpected HTTP status: 503 Service Unavailable"),
            (Some(500), "toomanyrequests: You have reached your pull rate limit"),
            (Some(500), "Get \"http://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused"),
            (None, "net/http: request canceled (Client.Timeout exceeded while awaiting headers)"),
        ];
        for (status, msg) in infra {
            let e = classify_pull_error("x:1", status, msg);
            assert!(!e.is_job_failure(), "{msg} → {e}");
        }
    }
}
