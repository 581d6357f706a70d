//! Artifacts: signed URLs for an attempt's upload (fenced), for downloads by
//! people and by later jobs (`inputs`), and the checks behind the local blob
//! store's `/v1/blobs/…` route.

use drover_proto::model::{self, JobSpec, JobState};
use drover_proto::v1;

use super::Service;
use crate::blob::{Access, ArtifactKey, ByteStream, SignedUrl};
use crate::error::{ServiceError, ServiceResult};
use crate::store::LeaseRef;

/// An upload URL for one attempt.
pub struct UploadUrl {
    pub url: String,
    pub expires_at_ms: i64,
    pub max_bytes: u64,
}

impl Service {
    /// The base agents and the CLI reach this coordinator's HTTP API at.
    pub fn public_url(&self) -> &str {
        self.public_url
            .get()
            .map(String::as_str)
            .unwrap_or("http://127.0.0.1:7080")
    }

    /// Called once the HTTP listener is bound: the default public URL.
    pub fn set_public_url(&self, url: String) {
        let _ = self.public_url.set(url.trim_end_matches('/').to_string());
    }

    fn absolute(&self, url: SignedUrl) -> String {
        match url {
            SignedUrl::Coordinator(path) => format!("{}{path}", self.public_url()),
            SignedUrl::External(url) => url,
        }
    }

    fn url_expiry(&self) -> i64 {
        self.now() + self.config.artifact_url_ttl_ms as i64
    }

    /// Fenced: only the attempt holding the lease may upload its artifact.
    pub async fn artifact_upload_url(&self, lease: &LeaseRef) -> ServiceResult<UploadUrl> {
        self.fenced(self.store.check_lease(lease).await)?;
        let expires_at_ms = self.url_expiry();
        let key = ArtifactKey::new(&lease.job_id, lease.attempt);
        let url = self
            .blobs
            .artifact_url(&key, Access::Put, expires_at_ms)
            .await?;
        Ok(UploadUrl {
            url: self.absolute(url),
            expires_at_ms,
            max_bytes: self.config.max_artifact_bytes,
        })
    }

    /// Where to download a job's artifact (its latest attempt's).
    pub async fn artifact(&self, job_id: &str) -> ServiceResult<model::Artifact> {
        let job = self.get_job(job_id).await?;
        let key = ArtifactKey::new(&job.id, job.attempt);
        let Some(bytes) = self.blobs.artifact_size(&key).await? else {
            return Err(ServiceError::NotFound(no_artifact_reason(
                &job.id,
                &job.spec,
                job.state,
                job.attempt,
            )));
        };
        let expires_at_ms = self.url_expiry();
        let url = self
            .blobs
            .artifact_url(&key, Access::Get, expires_at_ms)
            .await?;
        Ok(model::Artifact {
            job_id: job.id,
            attempt: job.attempt,
            bytes,
            url: self.absolute(url),
            expires_at_ms,
        })
    }

    /// Submit-time checks of `inputs`: every named job exists and declares
    /// outputs. Whether it has succeeded is checked when the job starts.
    pub(super) async fn check_inputs(&self, spec: &JobSpec) -> ServiceResult<()> {
        for (i, input) in spec.inputs.iter().enumerate() {
            let field = format!("inputs[{i}].job");
            let source = match self.store.get_job(&input.job).await {
                Ok(job) => job,
                Err(crate::store::StoreError::NotFound(_)) => {
                    return Err(ServiceError::invalid(
                        &field,
                        format!("job {} not found: name a job submitted earlier", input.job),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            if !source.spec.outputs {
                return Err(ServiceError::invalid(
                    &field,
                    format!(
                        "job {} does not declare outputs, so it has no artifact: submit it with outputs: true (drover submit --outputs)",
                        input.job
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The signed input URLs of a leased job, or why an input cannot be had
    /// (the agent then fails the attempt with that reason).
    pub async fn input_artifacts(&self, spec: &JobSpec) -> Vec<v1::InputArtifact> {
        let mut inputs = Vec::with_capacity(spec.inputs.len());
        for input in &spec.inputs {
            let (url, error) = match self.artifact(&input.job).await {
                Ok(artifact) => match self.get_job(&input.job).await {
                    Ok(job) if job.state == JobState::Succeeded => (artifact.url, String::new()),
                    Ok(job) => (
                        String::new(),
                        format!(
                            "input {}: job {} is {}, not SUCCEEDED; run this job after it succeeds (or in a workflow step that depends on it)",
                            input.name,
                            input.job,
                            job.state.as_str()
                        ),
                    ),
                    Err(e) => (String::new(), format!("input {}: {e}", input.name)),
                },
                Err(e) => (String::new(), format!("input {}: {e}", input.name)),
            };
            inputs.push(v1::InputArtifact {
                name: input.name.clone(),
                url,
                error,
            });
        }
        inputs
    }

    /// Checks a signed blob URL: a known object, a valid signature for this
    /// access, not expired. Answers the key it names.
    pub fn check_blob_url(
        &self,
        object: &str,
        access: Access,
        expires_at_ms: i64,
        signature: &str,
    ) -> ServiceResult<ArtifactKey> {
        let denied = || {
            ServiceError::PermissionDenied(
                "the blob URL is not valid: ask the coordinator for a new one (drover artifacts get)"
                    .into(),
            )
        };
        let key = ArtifactKey::parse(object).ok_or_else(denied)?;
        if !self.blobs.verify(&key, access, expires_at_ms, signature) {
            return Err(denied());
        }
        if expires_at_ms < self.now() {
            return Err(ServiceError::PermissionDenied(
                "the blob URL has expired: ask the coordinator for a new one (drover artifacts get)"
                    .into(),
            ));
        }
        Ok(key)
    }

    pub async fn put_blob(&self, key: &ArtifactKey, body: ByteStream) -> ServiceResult<u64> {
        let stored = self
            .blobs
            .put_artifact(key, body, self.config.max_artifact_bytes)
            .await?;
        tracing::info!(job = %key.job_id, attempt = key.attempt, bytes = stored, "artifact stored");
        Ok(stored)
    }

    pub async fn get_blob(&self, key: &ArtifactKey) -> ServiceResult<(ByteStream, u64)> {
        self.blobs.open_artifact(key).await?.ok_or_else(|| {
            ServiceError::NotFound(format!(
                "no artifact for job {} attempt {}",
                key.job_id, key.attempt
            ))
        })
    }
}

fn no_artifact_reason(job_id: &str, spec: &JobSpec, state: JobState, attempt: u64) -> String {
    if !spec.outputs {
        format!("job {job_id} has no artifact: it does not declare outputs (submit with outputs: true / --outputs)")
    } else if !state.is_terminal() {
        format!(
            "job {job_id} has no artifact yet: it is {} (attempt {attempt}); artifacts are uploaded when an attempt ends",
            state.as_str()
        )
    } else {
        format!(
            "job {job_id} has no artifact: attempt {attempt} ended {} without uploading one",
            state.as_str()
        )
    }
}
