//! Logs as files under a local directory: `logs/<job>/<attempt>.log`.

use std::io::SeekFrom;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{BlobError, BlobStore};

pub struct LocalBlobStore {
    root: PathBuf,
    /// Appends are serialised so the offset check and the write are one step.
    append_lock: tokio::sync::Mutex<()>,
}

impl LocalBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBlobStore {
            root: root.into(),
            append_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn log_path(&self, job_id: &str, attempt: u64) -> PathBuf {
        // Job ids are ULIDs checked by the service; keep paths safe regardless.
        let safe: String = job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        self.root
            .join("logs")
            .join(safe)
            .join(format!("{attempt}.log"))
    }
}

fn io(e: std::io::Error) -> BlobError {
    BlobError::Io(e.to_string())
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn append_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, BlobError> {
        let path = self.log_path(job_id, attempt);
        let _guard = self.append_lock.lock().await;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io)?;
        let stored = file.metadata().await.map_err(io)?.len();
        if offset > stored {
            return Err(BlobError::Gap { offset, stored });
        }
        let skip = (stored - offset) as usize;
        if skip < data.len() {
            file.write_all(&data[skip..]).await.map_err(io)?;
            file.flush().await.map_err(io)?;
        }
        Ok(stored.max(offset + data.len() as u64))
    }

    async fn read_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, BlobError> {
        let path = self.log_path(job_id, attempt);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        file.seek(SeekFrom::Start(offset)).await.map_err(io)?;
        let mut buf = Vec::with_capacity(max_len.min(1 << 20));
        file.take(max_len as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retried_append_does_not_duplicate_and_gaps_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobStore::new(dir.path());
        assert_eq!(blobs.append_log("J1", 1, 0, b"hello ").await.unwrap(), 6);
        // The same chunk again (a retry) changes nothing.
        assert_eq!(blobs.append_log("J1", 1, 0, b"hello ").await.unwrap(), 6);
        // Overlapping chunk: only the new tail is written.
        assert_eq!(blobs.append_log("J1", 1, 3, b"lo world").await.unwrap(), 11);
        assert!(matches!(
            blobs.append_log("J1", 1, 20, b"x").await,
            Err(BlobError::Gap {
                offset: 20,
                stored: 11
            })
        ));
        assert_eq!(
            blobs.read_log("J1", 1, 0, 100).await.unwrap(),
            b"hello world"
        );
        assert_eq!(blobs.read_log("J1", 1, 6, 100).await.unwrap(), b"world");
        assert!(blobs.read_log("J1", 2, 0, 100).await.unwrap().is_empty());
    }
}
