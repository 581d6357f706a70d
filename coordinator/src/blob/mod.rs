//! Where logs and artifacts live. Logs are one byte sequence per attempt,
//! appended in order by fenced `AppendLogs` calls (a file locally, segments
//! in S3). Artifacts are one archive (tar + zstd of the job's output
//! directory) per attempt, moved by the agents and the CLI through signed,
//! expiring URLs: nobody but the coordinator holds the store's credentials.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub mod local;
pub mod s3;
pub use local::LocalBlobStore;
pub use s3::S3BlobStore;

#[cfg(test)]
mod conformance;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A chunk starts past the end of what is stored: an earlier chunk is missing.
    #[error("log chunk at offset {offset} leaves a gap: {stored} bytes are stored; resend from {stored}")]
    Gap { offset: u64, stored: u64 },
    /// An upload is larger than the coordinator accepts.
    #[error("the artifact is larger than {max_bytes} bytes (max_artifact_bytes): write less to the output directory")]
    TooLarge { max_bytes: u64 },
    /// The store does not serve this through the coordinator (its URLs point
    /// elsewhere).
    #[error("this blob store does not serve artifacts through the coordinator")]
    Unsupported,
    #[error("blob store: {0}")]
    Io(String),
}

/// How much of one attempt's log a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogLen {
    /// Bytes appended and readable through this coordinator.
    pub stored: u64,
    /// Of those, the bytes persisted in the store itself: they survive a
    /// crash of this coordinator. Never more than `stored`.
    pub durable: u64,
}

/// A body streamed in or out of the store.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Identifies one attempt's artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactKey {
    pub job_id: String,
    pub attempt: u64,
}

impl ArtifactKey {
    pub fn new(job_id: &str, attempt: u64) -> ArtifactKey {
        ArtifactKey {
            job_id: job_id.to_string(),
            attempt,
        }
    }

    /// `artifacts/<job>/<attempt>.tar.zst`: the object name, also the path of
    /// the coordinator's blob route.
    pub fn object_name(&self) -> String {
        format!("artifacts/{}/{}.tar.zst", self.job_id, self.attempt)
    }

    /// The inverse of [`ArtifactKey::object_name`]; `None` for anything
    /// else, so a crafted path never names a file outside the store.
    pub fn parse(object_name: &str) -> Option<ArtifactKey> {
        let rest = object_name.strip_prefix("artifacts/")?;
        let (job_id, file) = rest.split_once('/')?;
        let attempt = file.strip_suffix(".tar.zst")?.parse().ok()?;
        let safe_id = !job_id.is_empty()
            && job_id.len() <= 64
            && job_id.chars().all(|c| c.is_ascii_alphanumeric());
        safe_id.then(|| ArtifactKey::new(job_id, attempt))
    }
}

/// A signed URL as the store makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedUrl {
    /// Served by the coordinator's own HTTP API: a path with its query
    /// (`/v1/blobs/…?expires=…&signature=…`); the service prefixes its
    /// public URL.
    Coordinator(String),
    /// Served by the store itself (an S3 presigned URL).
    External(String),
}

/// Which way a signed URL lets the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Get,
    Put,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Writes `data` at byte `offset` of the attempt's log. Bytes already
    /// stored are skipped, so a retried append never duplicates output.
    /// Returns the log's length afterwards.
    async fn append_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, BlobError>;

    /// The attempt's stored and durable lengths (zero when no log exists).
    /// Bytes past `durable` live only in this coordinator's memory: a crash
    /// loses them, and the agent resends them (`AppendLogsResponse`).
    async fn log_len(&self, job_id: &str, attempt: u64) -> Result<LogLen, BlobError>;

    /// Makes the attempt's appended bytes durable and readable from every
    /// coordinator, and forgets any state kept for it (called when the
    /// attempt completes). Stores that write through need nothing.
    async fn flush_log(&self, _job_id: &str, _attempt: u64) -> Result<(), BlobError> {
        Ok(())
    }

    /// [`BlobStore::flush_log`] for every attempt (at shutdown).
    async fn flush_all(&self) -> Result<(), BlobError> {
        Ok(())
    }

    /// Up to `max_len` bytes from `offset`, including bytes appended through
    /// this coordinator and not yet flushed; empty at the end or when no log
    /// exists.
    async fn read_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, BlobError>;

    /// A URL that lets its holder `access` the artifact until
    /// `expires_at_ms` (unix ms), and nothing else.
    async fn artifact_url(
        &self,
        key: &ArtifactKey,
        access: Access,
        expires_at_ms: i64,
    ) -> Result<SignedUrl, BlobError>;

    /// Size of the stored artifact; `None` when there is none.
    async fn artifact_size(&self, key: &ArtifactKey) -> Result<Option<u64>, BlobError>;

    /// Checks a signature made by [`BlobStore::artifact_url`] (the caller
    /// checks the expiry). Stores whose URLs point elsewhere say no.
    fn verify(
        &self,
        key: &ArtifactKey,
        access: Access,
        expires_at_ms: i64,
        signature: &str,
    ) -> bool;

    /// Stores an upload that came through a [`SignedUrl::Coordinator`]: all
    /// or nothing (a broken upload leaves the earlier artifact, if any).
    /// Returns the size stored.
    async fn put_artifact(
        &self,
        key: &ArtifactKey,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<u64, BlobError>;

    /// The artifact's bytes and size, for a [`SignedUrl::Coordinator`] GET.
    async fn open_artifact(
        &self,
        key: &ArtifactKey,
    ) -> Result<Option<(ByteStream, u64)>, BlobError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_keys_round_trip_and_reject_anything_else() {
        let key = ArtifactKey::new("01JOB", 3);
        assert_eq!(key.object_name(), "artifacts/01JOB/3.tar.zst");
        assert_eq!(ArtifactKey::parse(&key.object_name()), Some(key));
        for bad in [
            "artifacts/../3.tar.zst",
            "artifacts/01JOB/../../x/3.tar.zst",
            "artifacts/01JOB/x.tar.zst",
            "artifacts//3.tar.zst",
            "logs/01JOB/3.log",
            "artifacts/01JOB/3.tar",
        ] {
            assert_eq!(ArtifactKey::parse(bad), None, "{bad}");
        }
    }
}
