//! Where logs (and later artifacts) live. Logs are one object per attempt,
//! appended in order by fenced `AppendLogs` calls.

use async_trait::async_trait;

pub mod local;
pub use local::LocalBlobStore;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A chunk starts past the end of what is stored: an earlier chunk is missing.
    #[error("log chunk at offset {offset} leaves a gap: {stored} bytes are stored; resend from {stored}")]
    Gap { offset: u64, stored: u64 },
    #[error("blob store: {0}")]
    Io(String),
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

    /// Up to `max_len` bytes from `offset`; empty at the end or when no log exists.
    async fn read_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, BlobError>;
}
