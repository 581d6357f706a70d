//! Blobs as files under a local directory: `logs/<job>/<attempt>.log` and
//! `artifacts/<job>/<attempt>.tar.zst`. Artifacts move through the
//! coordinator's `/v1/blobs/…` route under URLs signed with HMAC-SHA256 by a
//! key kept in `<root>/.signing-key`, so URLs stay valid across restarts.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Access, ArtifactKey, BlobError, BlobStore, ByteStream, LogLen, SignedUrl};

/// Where the coordinator serves local blobs.
pub const BLOB_ROUTE: &str = "/v1/blobs/";

pub struct LocalBlobStore {
    root: PathBuf,
    /// Appends are serialised so the offset check and the write are one step.
    append_lock: tokio::sync::Mutex<()>,
    signing_key: [u8; 32],
}

impl LocalBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let signing_key = load_or_create_key(&root).unwrap_or_else(|e| {
            tracing::warn!(
                dir = %root.display(),
                "cannot keep the blob signing key on disk ({e}); artifact URLs will not survive a restart"
            );
            rand::random()
        });
        LocalBlobStore {
            root,
            append_lock: tokio::sync::Mutex::new(()),
            signing_key,
        }
    }

    fn artifact_path(&self, key: &ArtifactKey) -> PathBuf {
        // ArtifactKey::parse admits only alphanumeric job ids; keep paths
        // safe for keys made elsewhere too.
        let safe: String = key
            .job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        self.root
            .join("artifacts")
            .join(safe)
            .join(format!("{}.tar.zst", key.attempt))
    }

    fn signature(&self, key: &ArtifactKey, access: Access, expires_at_ms: i64) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.signing_key).expect("HMAC takes keys of any size");
        let method = match access {
            Access::Get => "GET",
            Access::Put => "PUT",
        };
        mac.update(format!("{method}\n{}\n{expires_at_ms}", key.object_name()).as_bytes());
        hex::encode(mac.finalize().into_bytes())
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

/// The signing key in `<root>/.signing-key` (created, mode 0600, on first use).
fn load_or_create_key(root: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(".signing-key");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            return Ok(key);
        }
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is not a 32-byte key; remove it to make a new one",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(root)?;
    let key: [u8; 32] = rand::random();
    let tmp = root.join(format!(".signing-key.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&key)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(key)
}

/// Compares without an early exit, so a signature cannot be guessed byte by
/// byte from response times.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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

    /// Appends are written through: every stored byte is durable.
    async fn log_len(&self, job_id: &str, attempt: u64) -> Result<LogLen, BlobError> {
        let stored = match tokio::fs::metadata(self.log_path(job_id, attempt)).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(e)),
        };
        Ok(LogLen {
            stored,
            durable: stored,
        })
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

    async fn artifact_url(
        &self,
        key: &ArtifactKey,
        access: Access,
        expires_at_ms: i64,
    ) -> Result<SignedUrl, BlobError> {
        let signature = self.signature(key, access, expires_at_ms);
        Ok(SignedUrl::Coordinator(format!(
            "{BLOB_ROUTE}{}?expires={expires_at_ms}&signature={signature}",
            key.object_name()
        )))
    }

    async fn artifact_size(&self, key: &ArtifactKey) -> Result<Option<u64>, BlobError> {
        match tokio::fs::metadata(self.artifact_path(key)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    fn verify(
        &self,
        key: &ArtifactKey,
        access: Access,
        expires_at_ms: i64,
        signature: &str,
    ) -> bool {
        same(&self.signature(key, access, expires_at_ms), signature)
    }

    async fn put_artifact(
        &self,
        key: &ArtifactKey,
        mut body: ByteStream,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        let path = self.artifact_path(key);
        let dir = path.parent().expect("artifact paths have a parent");
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        // Written aside, then renamed: readers never see half an archive.
        let tmp = dir.join(format!(".{}.{}.part", key.attempt, rand::random::<u64>()));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io)?;
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(io)?;
                size += chunk.len() as u64;
                if size > max_bytes {
                    return Err(BlobError::TooLarge { max_bytes });
                }
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.sync_all().await.map_err(io)?;
            tokio::fs::rename(&tmp, &path).await.map_err(io)?;
            Ok(size)
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        written
    }

    async fn open_artifact(
        &self,
        key: &ArtifactKey,
    ) -> Result<Option<(ByteStream, u64)>, BlobError> {
        let file = match tokio::fs::File::open(self.artifact_path(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let size = file.metadata().await.map_err(io)?.len();
        let stream = tokio_util::io::ReaderStream::new(file).boxed();
        Ok(Some((stream, size)))
    }
}

/// The log and URL contract is checked by `blob/conformance.rs`; these are
/// the local store's own guarantees (uploads through the coordinator).
#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
        .boxed()
    }

    async fn read_all(stream: ByteStream) -> Vec<u8> {
        stream.map(|c| c.unwrap().to_vec()).concat().await
    }

    #[tokio::test]
    async fn artifacts_are_stored_whole_and_signatures_bind_key_access_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobStore::new(dir.path());
        let key = ArtifactKey::new("J1", 2);
        assert_eq!(blobs.artifact_size(&key).await.unwrap(), None);
        assert!(blobs.open_artifact(&key).await.unwrap().is_none());

        let SignedUrl::Coordinator(url) =
            blobs.artifact_url(&key, Access::Put, 1000).await.unwrap()
        else {
            panic!("local URLs are served by the coordinator");
        };
        let signature = url.rsplit_once("signature=").unwrap().1.to_string();
        assert!(url.starts_with("/v1/blobs/artifacts/J1/2.tar.zst?expires=1000&"));
        assert!(blobs.verify(&key, Access::Put, 1000, &signature));
        assert!(
            !blobs.verify(&key, Access::Get, 1000, &signature),
            "a PUT URL is not a GET URL"
        );
        assert!(
            !blobs.verify(&key, Access::Put, 2000, &signature),
            "expiry is signed"
        );
        assert!(!blobs.verify(&ArtifactKey::new("J1", 3), Access::Put, 1000, &signature));

        // Too large: refused, nothing stored.
        let err = blobs.put_artifact(&key, body(&[b"abc", b"def"]), 5).await;
        assert!(matches!(err, Err(BlobError::TooLarge { max_bytes: 5 })));
        assert_eq!(blobs.artifact_size(&key).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/J1"))
                .unwrap()
                .count(),
            0,
            "no partial file left"
        );

        assert_eq!(
            blobs
                .put_artifact(&key, body(&[b"abc", b"def"]), 6)
                .await
                .unwrap(),
            6
        );
        assert_eq!(blobs.artifact_size(&key).await.unwrap(), Some(6));
        let (stream, size) = blobs.open_artifact(&key).await.unwrap().unwrap();
        assert_eq!(size, 6);
        assert_eq!(read_all(stream).await, b"abcdef");

        // A broken upload leaves the earlier artifact in place.
        let broken: ByteStream = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"xy")),
            Err(std::io::Error::other("connection reset")),
        ])
        .boxed();
        assert!(blobs.put_artifact(&key, broken, 100).await.is_err());
        let (stream, _) = blobs.open_artifact(&key).await.unwrap().unwrap();
        assert_eq!(read_all(stream).await, b"abcdef");

        // The key survives a restart: old URLs still verify.
        let again = LocalBlobStore::new(dir.path());
        assert!(again.verify(&key, Access::Put, 1000, &signature));
    }
}
