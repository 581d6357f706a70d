//! Blobs in one S3 bucket under a prefix:
//!
//! - `<prefix>artifacts/<job>/<attempt>.tar.zst`, moved by agents and the CLI
//!   through presigned URLs (agents never get bucket credentials).
//! - `<prefix>logs/<job>/<attempt>/<start:020>-<end:020>`: S3 cannot append,
//!   so each coordinator buffers an attempt's appended bytes and writes one
//!   segment when the buffer reaches `log_segment_bytes` or its oldest byte
//!   waited `log_flush_ms`, and when the attempt completes. Never one object
//!   per chunk.
//!
//! Offsets keep the append contract across coordinators: the bytes at an
//! offset are the same whoever writes them, so segments of two coordinators
//! may overlap (a reader takes each byte from any segment holding it) but
//! never disagree, and the end offset in the name keeps two segments with
//! one start from replacing each other. A coordinator with no state for an
//! attempt learns its stored length from the listed segments.
//!
//! What the buffer costs: bytes acknowledged to an agent and not yet flushed
//! live only in this coordinator's memory until the next flush (at most
//! `log_flush_ms`); a graceful shutdown flushes them, a crash loses them from
//! here. They are not lost from the log: `log_len` tells the agent which
//! bytes are durable (`flushed`), the agent keeps the rest, and the next
//! coordinator it reaches answers its next chunk with a gap, which the agent
//! fills by resending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::Client;

use super::{Access, ArtifactKey, BlobError, BlobStore, ByteStream, LogLen, SignedUrl};
use crate::config::S3Config;

/// Longest validity S3 accepts for a presigned URL.
const MAX_URL_SECS: i64 = 7 * 86_400;
/// An attempt's state is forgotten after this long without appends (its
/// buffer flushed): attempts that end without `Complete` (requeues).
const IDLE_FORGET: Duration = Duration::from_secs(600);

pub struct S3BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    bucket: String,
    /// Empty or ending in `/`.
    prefix: String,
    segment_bytes: usize,
    flush_age: Duration,
    logs: Mutex<HashMap<AttemptKey, SharedLog>>,
}

/// One attempt's state; its lock serialises the attempt's appends and flushes.
type SharedLog = Arc<tokio::sync::Mutex<LogState>>;
/// `(job id, attempt)`.
type AttemptKey = (String, u64);

/// What this coordinator knows of one attempt's log.
struct LogState {
    /// False until the stored length has been learnt from S3.
    loaded: bool,
    /// Bytes known to be stored in S3 (the end of the segments).
    flushed: u64,
    /// Bytes appended after `flushed`, not yet written.
    buffer: Vec<u8>,
    /// When the oldest buffered byte arrived.
    since: Option<Instant>,
    last_append: Instant,
}

impl LogState {
    fn end(&self) -> u64 {
        self.flushed + self.buffer.len() as u64
    }
}

/// One log object.
#[derive(Debug, Clone)]
struct Segment {
    key: String,
    start: u64,
    end: u64,
}

fn s3_err<E>(op: &str, e: SdkError<E>) -> BlobError
where
    E: std::error::Error + 'static,
{
    BlobError::Io(format!("S3 {op}: {}", DisplayErrorContext(&e)))
}

/// Job ids are ULIDs checked by the service; keep keys safe regardless.
fn safe_id(job_id: &str) -> String {
    job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// A normalised key prefix: empty, or ending in exactly one `/`.
fn normalise_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// An S3 client from the standard AWS chain (env, profile, IMDS, ECS),
/// pointed at `config.endpoint` when set.
pub async fn client_from_config(config: &S3Config) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(crate::store::dynamodb::https_client());
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Client::from_conf(lean(builder, shared.retry_config(), config).build())
}

/// Settings every S3 client of the store gets: explicit retries with
/// backoff ([`crate::aws::retry_config`] over the AWS chain's `chain`), path
/// style when asked, and checksums only where S3 requires them (a presigned
/// PUT must not carry the checksum of an empty body).
pub(crate) fn lean(
    builder: aws_sdk_s3::config::Builder,
    chain: Option<&aws_config::retry::RetryConfig>,
    config: &S3Config,
) -> aws_sdk_s3::config::Builder {
    builder
        .retry_config(crate::aws::retry_config(chain, config.max_attempts))
        .force_path_style(config.force_path_style)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
}

impl S3BlobStore {
    /// Connects with the standard AWS chain.
    pub async fn connect(config: &S3Config) -> S3BlobStore {
        S3BlobStore::new(client_from_config(config).await, config)
    }

    /// A store on `client`; starts the background flusher (needs a Tokio
    /// runtime), which ends when the store is dropped.
    pub fn new(client: Client, config: &S3Config) -> S3BlobStore {
        let inner = Arc::new(Inner {
            client,
            bucket: config.bucket.clone(),
            prefix: normalise_prefix(&config.prefix),
            segment_bytes: config.log_segment_bytes.max(1),
            flush_age: Duration::from_millis(config.log_flush_ms),
            logs: Mutex::new(HashMap::new()),
        });
        let tick = (inner.flush_age / 4).max(Duration::from_millis(25));
        tokio::spawn(flusher(Arc::downgrade(&inner), tick));
        S3BlobStore { inner }
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }
}

/// Writes buffers whose oldest byte is `flush_age` old; forgets idle attempts.
async fn flusher(inner: Weak<Inner>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for (key, state) in inner.attempts() {
            let mut st = state.lock().await;
            if st.since.is_some_and(|t| t.elapsed() >= inner.flush_age) {
                if let Err(e) = inner.flush(&key.0, key.1, &mut st).await {
                    tracing::warn!(job = %key.0, attempt = key.1, "writing a log segment (will retry): {e}");
                }
            }
            if st.buffer.is_empty() && st.last_append.elapsed() >= IDLE_FORGET {
                drop(st);
                inner.forget(&key, &state);
            }
        }
    }
}

impl Inner {
    fn attempts(&self) -> Vec<(AttemptKey, SharedLog)> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn state(&self, job_id: &str, attempt: u64) -> SharedLog {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.entry((job_id.to_string(), attempt))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(LogState {
                    loaded: false,
                    flushed: 0,
                    buffer: Vec::new(),
                    since: None,
                    last_append: Instant::now(),
                }))
            })
            .clone()
    }

    fn existing_state(&self, job_id: &str, attempt: u64) -> Option<SharedLog> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.get(&(job_id.to_string(), attempt)).cloned()
    }

    /// Removes the attempt's entry if it is still `state`.
    fn forget(&self, key: &AttemptKey, state: &SharedLog) {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if logs.get(key).is_some_and(|s| Arc::ptr_eq(s, state)) {
            logs.remove(key);
        }
    }

    fn log_dir(&self, job_id: &str, attempt: u64) -> String {
        format!("{}logs/{}/{attempt}/", self.prefix, safe_id(job_id))
    }

    fn artifact_key(&self, key: &ArtifactKey) -> String {
        format!(
            "{}{}",
            self.prefix,
            ArtifactKey::new(&safe_id(&key.job_id), key.attempt).object_name()
        )
    }

    /// The attempt's segments, by start offset.
    async fn segments(&self, job_id: &str, attempt: u64) -> Result<Vec<Segment>, BlobError> {
        let dir = self.log_dir(job_id, attempt);
        let mut segments = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&dir)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_err("ListObjectsV2", e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let Some((start, end)) = key
                    .strip_prefix(&dir)
                    .and_then(|name| name.split_once('-'))
                    .and_then(|(s, e)| Some((s.parse().ok()?, e.parse().ok()?)))
                else {
                    continue;
                };
                if end > start {
                    segments.push(Segment {
                        key: key.to_string(),
                        start,
                        end,
                    });
                }
            }
        }
        segments.sort_by_key(|s| (s.start, s.end));
        Ok(segments)
    }

    /// The stored length: the furthest end of the segments.
    async fn stored_len(&self, job_id: &str, attempt: u64) -> Result<u64, BlobError> {
        Ok(self
            .segments(job_id, attempt)
            .await?
            .iter()
            .map(|s| s.end)
            .max()
            .unwrap_or(0))
    }

    /// Re-learns the stored length (another coordinator may have written
    /// further); buffered bytes it covers are dropped.
    async fn refresh(
        &self,
        job_id: &str,
        attempt: u64,
        st: &mut LogState,
    ) -> Result<(), BlobError> {
        let stored = self.stored_len(job_id, attempt).await?;
        if !st.loaded || stored > st.flushed {
            let covered = stored
                .saturating_sub(st.flushed)
                .min(st.buffer.len() as u64) as usize;
            st.buffer.drain(..covered);
            if st.buffer.is_empty() {
                st.since = None;
            }
            st.flushed = stored.max(st.flushed);
            st.loaded = true;
        }
        Ok(())
    }

    /// Writes the buffer as one segment.
    async fn flush(&self, job_id: &str, attempt: u64, st: &mut LogState) -> Result<(), BlobError> {
        if st.buffer.is_empty() {
            return Ok(());
        }
        let (start, end) = (st.flushed, st.end());
        let key = format!("{}{start:020}-{end:020}", self.log_dir(job_id, attempt));
        let body = bytes::Bytes::copy_from_slice(&st.buffer);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("text/plain; charset=utf-8")
            .body(body.into())
            .send()
            .await
            .map_err(|e| s3_err("PutObject", e))?;
        st.flushed = end;
        st.buffer.clear();
        st.since = None;
        Ok(())
    }

    /// Bytes `[from, to)` of one segment.
    async fn read_segment(
        &self,
        segment: &Segment,
        from: u64,
        to: u64,
    ) -> Result<Vec<u8>, BlobError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&segment.key)
            .range(format!(
                "bytes={}-{}",
                from - segment.start,
                to - segment.start - 1
            ))
            .send()
            .await
            .map_err(|e| s3_err("GetObject", e))?;
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| BlobError::Io(format!("S3 GetObject: reading {}: {e}", segment.key)))?
            .into_bytes();
        // A store that ignored the range answers the whole object.
        let want = (to - from) as usize;
        Ok(
            if data.len() as u64 == segment.end - segment.start && data.len() != want {
                data[(from - segment.start) as usize..(to - segment.start) as usize].to_vec()
            } else {
                data.to_vec()
            },
        )
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn append_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, BlobError> {
        let inner = &self.inner;
        let state = inner.state(job_id, attempt);
        let mut st = state.lock().await;
        if !st.loaded {
            inner.refresh(job_id, attempt, &mut st).await?;
        }
        if offset > st.end() {
            // Another coordinator may have stored more since we looked.
            inner.refresh(job_id, attempt, &mut st).await?;
            if offset > st.end() {
                return Err(BlobError::Gap {
                    offset,
                    stored: st.end(),
                });
            }
        }
        let skip = (st.end() - offset) as usize;
        if skip < data.len() {
            let fresh = &data[skip..];
            // Memory stays bounded when S3 is unreachable: refuse (the agent
            // retries the same chunk) rather than buffer without end.
            if st.buffer.len() + fresh.len() > 4 * inner.segment_bytes {
                inner.flush(job_id, attempt, &mut st).await?;
            }
            st.buffer.extend_from_slice(fresh);
            st.since.get_or_insert_with(Instant::now);
        }
        st.last_append = Instant::now();
        if st.buffer.len() >= inner.segment_bytes {
            if let Err(e) = inner.flush(job_id, attempt, &mut st).await {
                tracing::warn!(job = %job_id, attempt, "writing a log segment (will retry): {e}");
            }
        }
        Ok(st.end())
    }

    /// Durable: the end of the segments as this coordinator last saw or
    /// wrote them (listed when it has no state for the attempt).
    async fn log_len(&self, job_id: &str, attempt: u64) -> Result<LogLen, BlobError> {
        let state = self.inner.state(job_id, attempt);
        let mut st = state.lock().await;
        if !st.loaded {
            self.inner.refresh(job_id, attempt, &mut st).await?;
        }
        Ok(LogLen {
            stored: st.end(),
            durable: st.flushed,
        })
    }

    async fn flush_log(&self, job_id: &str, attempt: u64) -> Result<(), BlobError> {
        let Some(state) = self.inner.existing_state(job_id, attempt) else {
            return Ok(());
        };
        let mut st = state.lock().await;
        self.inner.flush(job_id, attempt, &mut st).await?;
        drop(st);
        self.inner.forget(&(job_id.to_string(), attempt), &state);
        Ok(())
    }

    async fn flush_all(&self) -> Result<(), BlobError> {
        let mut first_error = None;
        for ((job_id, attempt), state) in self.inner.attempts() {
            let mut st = state.lock().await;
            if let Err(e) = self.inner.flush(&job_id, attempt, &mut st).await {
                tracing::warn!(job = %job_id, attempt, "writing a log segment: {e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn read_log(
        &self,
        job_id: &str,
        attempt: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, BlobError> {
        // The local buffer is read before the listing: bytes flushed in
        // between are then in one or the other.
        let local = match self.inner.existing_state(job_id, attempt) {
            Some(state) => {
                let st = state.lock().await;
                let from = offset.max(st.flushed);
                let to = (offset + max_len as u64).min(st.end());
                (st.loaded && from < to).then(|| {
                    let skip = (from - st.flushed) as usize;
                    (from, st.buffer[skip..skip + (to - from) as usize].to_vec())
                })
            }
            None => None,
        };
        let limit = offset + max_len as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut segments: Option<Vec<Segment>> = None;
        while pos < limit {
            if let Some((start, bytes)) = &local {
                if (*start..*start + bytes.len() as u64).contains(&pos) {
                    let skip = (pos - start) as usize;
                    let take = ((limit - pos) as usize).min(bytes.len() - skip);
                    out.extend_from_slice(&bytes[skip..skip + take]);
                    pos += take as u64;
                    continue;
                }
            }
            if segments.is_none() {
                segments = Some(self.inner.segments(job_id, attempt).await?);
            }
            // Of the segments holding `pos`, the one reaching furthest.
            let Some(segment) = segments
                .iter()
                .flatten()
                .filter(|s| s.start <= pos && pos < s.end)
                .max_by_key(|s| s.end)
            else {
                break;
            };
            let to = segment.end.min(limit);
            let bytes = self.inner.read_segment(segment, pos, to).await?;
            if bytes.is_empty() {
                break;
            }
            pos += bytes.len() as u64;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    async fn artifact_url(
        &self,
        key: &ArtifactKey,
        access: Access,
        expires_at_ms: i64,
    ) -> Result<SignedUrl, BlobError> {
        // Signed from now (whole seconds, as X-Amz-Date has them) so that
        // X-Amz-Date + X-Amz-Expires is the given expiry, to the second.
        let now_s = unix_ms(SystemTime::now()).div_euclid(1000);
        let secs = (expires_at_ms.div_euclid(1000) - now_s).clamp(1, MAX_URL_SECS);
        let presigning = PresigningConfig::builder()
            .start_time(UNIX_EPOCH + Duration::from_secs(now_s as u64))
            .expires_in(Duration::from_secs(secs as u64))
            .build()
            .map_err(|e| BlobError::Io(format!("presigning: {e}")))?;
        let object = self.inner.artifact_key(key);
        let (bucket, client) = (&self.inner.bucket, &self.inner.client);
        let request = match access {
            Access::Put => client
                .put_object()
                .bucket(bucket)
                .key(object)
                .presigned(presigning)
                .await
                .map_err(|e| s3_err("presigning PutObject", e))?,
            Access::Get => client
                .get_object()
                .bucket(bucket)
                .key(object)
                .presigned(presigning)
                .await
                .map_err(|e| s3_err("presigning GetObject", e))?,
        };
        Ok(SignedUrl::External(request.uri().to_string()))
    }

    /// Listed rather than HEADed: a HEAD of a missing key answers 403 unless
    /// the role may list the whole bucket, while a listing under the exact
    /// key needs `s3:ListBucket` only for the coordinator's own prefix.
    async fn artifact_size(&self, key: &ArtifactKey) -> Result<Option<u64>, BlobError> {
        let object = self.inner.artifact_key(key);
        let out = self
            .inner
            .client
            .list_objects_v2()
            .bucket(&self.inner.bucket)
            .prefix(&object)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| s3_err("ListObjectsV2", e))?;
        Ok(out
            .contents()
            .iter()
            .find(|o| o.key() == Some(object.as_str()))
            .map(|o| o.size().unwrap_or(0).max(0) as u64))
    }

    /// S3 checks its own presigned URLs; the coordinator's route serves none.
    fn verify(&self, _: &ArtifactKey, _: Access, _: i64, _: &str) -> bool {
        false
    }

    async fn put_artifact(&self, _: &ArtifactKey, _: ByteStream, _: u64) -> Result<u64, BlobError> {
        Err(BlobError::Unsupported)
    }

    async fn open_artifact(&self, _: &ArtifactKey) -> Result<Option<(ByteStream, u64)>, BlobError> {
        Err(BlobError::Unsupported)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A store on a fresh bucket in this process's moto server, with small
    /// segments and a short flush age so tests see both.
    pub(crate) async fn fresh_store() -> S3BlobStore {
        fresh_store_with(|_| {}).await
    }

    pub(crate) async fn fresh_store_with(tune: impl FnOnce(&mut S3Config)) -> S3BlobStore {
        let mut config = S3Config {
            bucket: format!("drover-{}", ulid::Ulid::new().to_string().to_lowercase()),
            endpoint: Some(crate::moto::endpoint().to_string()),
            force_path_style: true,
            log_segment_bytes: 4096,
            log_flush_ms: 200,
            ..S3Config::default()
        };
        tune(&mut config);
        let client = moto_client(&config);
        client
            .create_bucket()
            .bucket(&config.bucket)
            .send()
            .await
            .expect("creating a bucket in moto");
        S3BlobStore::new(client, &config)
    }

    /// A second store on the same bucket: another coordinator.
    pub(crate) fn another_coordinator(
        store: &S3BlobStore,
        tune: impl FnOnce(&mut S3Config),
    ) -> S3BlobStore {
        let mut config = S3Config {
            bucket: store.inner.bucket.clone(),
            prefix: store.inner.prefix.clone(),
            log_segment_bytes: store.inner.segment_bytes,
            log_flush_ms: store.inner.flush_age.as_millis() as u64,
            force_path_style: true,
            ..S3Config::default()
        };
        tune(&mut config);
        S3BlobStore::new(moto_client(&config), &config)
    }

    fn moto_client(config: &S3Config) -> Client {
        let builder = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(crate::moto::region())
            .credentials_provider(crate::moto::credentials())
            .endpoint_url(crate::moto::endpoint())
            .http_client(crate::store::dynamodb::https_client());
        Client::from_conf(lean(builder, None, config).build())
    }

    async fn objects(store: &S3BlobStore, job_id: &str, attempt: u64) -> Vec<(u64, u64)> {
        store
            .inner
            .segments(job_id, attempt)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.start, s.end))
            .collect()
    }

    #[tokio::test]
    async fn logs_are_written_per_segment_never_per_chunk() {
        let store = fresh_store_with(|c| c.log_flush_ms = 60_000).await;
        // 100 small chunks of 100 bytes: one segment per 4096 bytes.
        for i in 0..100u64 {
            store
                .append_log("J1", 1, i * 100, &[b'a' + (i % 26) as u8; 100])
                .await
                .unwrap();
        }
        assert_eq!(
            objects(&store, "J1", 1).await,
            vec![(0, 4100), (4100, 8200)]
        );
        // The unflushed tail is readable here, and written on completion.
        assert_eq!(
            store.read_log("J1", 1, 0, 20_000).await.unwrap().len(),
            10_000
        );
        store.flush_log("J1", 1).await.unwrap();
        assert_eq!(
            objects(&store, "J1", 1).await,
            vec![(0, 4100), (4100, 8200), (8200, 10_000)]
        );
        assert!(
            store.inner.existing_state("J1", 1).is_none(),
            "state forgotten"
        );
    }

    #[tokio::test]
    async fn a_follower_on_another_coordinator_sees_output_once_the_flush_age_passes() {
        let writer = fresh_store().await;
        let reader = another_coordinator(&writer, |_| {});
        writer.append_log("J1", 1, 0, b"hello ").await.unwrap();
        assert!(reader.read_log("J1", 1, 0, 100).await.unwrap().is_empty());
        // No flush is asked for: the writer's flusher writes the segment by
        // itself once its oldest byte is `log_flush_ms` old.
        let start = Instant::now();
        loop {
            if reader.read_log("J1", 1, 0, 100).await.unwrap() == b"hello " {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never flushed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn coordinators_taking_turns_keep_one_log_without_duplicates() {
        let a = fresh_store_with(|c| c.log_flush_ms = 60_000).await;
        let b = another_coordinator(&a, |_| {});
        a.append_log("J1", 1, 0, b"one ").await.unwrap();
        a.flush_all().await.unwrap();
        // B learns the length from S3: a retried chunk is skipped, a gap refused.
        assert_eq!(b.append_log("J1", 1, 0, b"one ").await.unwrap(), 4);
        assert!(matches!(
            b.append_log("J1", 1, 9, b"x").await,
            Err(BlobError::Gap {
                offset: 9,
                stored: 4
            })
        ));
        assert_eq!(b.append_log("J1", 1, 4, b"two ").await.unwrap(), 8);
        b.flush_log("J1", 1).await.unwrap();
        // A's state is stale (it knows 4 bytes): the agent resends from 4,
        // A writes a segment overlapping B's, and readers see each byte once.
        assert_eq!(a.append_log("J1", 1, 4, b"two ").await.unwrap(), 8);
        assert_eq!(a.append_log("J1", 1, 8, b"three").await.unwrap(), 13);
        a.flush_all().await.unwrap();
        assert_eq!(objects(&a, "J1", 1).await, vec![(0, 4), (4, 8), (4, 13)]);
        for store in [&a, &b] {
            assert_eq!(
                store.read_log("J1", 1, 0, 100).await.unwrap(),
                b"one two three"
            );
            assert_eq!(store.read_log("J1", 1, 5, 5).await.unwrap(), b"wo th");
        }
        // A chunk past A's stale end re-learns the length instead of refusing.
        assert_eq!(b.append_log("J1", 1, 13, b" four").await.unwrap(), 18);
        b.flush_log("J1", 1).await.unwrap();
        assert_eq!(a.append_log("J1", 1, 16, b"ur five").await.unwrap(), 23);
        a.flush_log("J1", 1).await.unwrap();
        assert_eq!(
            b.read_log("J1", 1, 0, 100).await.unwrap(),
            b"one two three four five"
        );
    }

    #[tokio::test]
    async fn presigned_urls_work_until_their_expiry_and_are_refused_after() {
        let store = fresh_store().await;
        let key = ArtifactKey::new("J1", 1);
        // A few seconds: both URLs are used well within them.
        let expires_at_ms = unix_ms(SystemTime::now()) + 4_000;
        let url = |access| {
            let store = &store;
            let key = &key;
            async move {
                match store
                    .artifact_url(key, access, expires_at_ms)
                    .await
                    .unwrap()
                {
                    SignedUrl::External(url) => url,
                    other => panic!("S3 signs its own URLs: {other:?}"),
                }
            }
        };
        let (put, get) = (url(Access::Put).await, url(Access::Get).await);
        let http = reqwest::Client::new();
        let status = |resp: &reqwest::Response| resp.status().as_u16();
        let resp = http.put(&put).body("first").send().await.unwrap();
        assert_eq!(status(&resp), 200, "{}", resp.text().await.unwrap());
        let resp = http.get(&get).send().await.unwrap();
        assert_eq!(status(&resp), 200);
        assert_eq!(resp.text().await.unwrap(), "first");

        // X-Amz-Date + X-Amz-Expires is at most `expires_at_ms`.
        let wait_ms = expires_at_ms + 500 - unix_ms(SystemTime::now());
        tokio::time::sleep(Duration::from_millis(wait_ms.max(0) as u64)).await;
        for resp in [
            http.put(&put).body("second").send().await.unwrap(),
            http.get(&get).send().await.unwrap(),
        ] {
            assert_eq!(status(&resp), 403);
            let body = resp.text().await.unwrap();
            assert!(
                body.contains("<Code>AccessDenied</Code>")
                    && body.contains("<Message>Request has expired</Message>"),
                "{body}"
            );
        }
        let stored = store
            .client()
            .get_object()
            .bucket(&store.inner.bucket)
            .key(store.inner.artifact_key(&key))
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        assert_eq!(&stored[..], b"first", "the expired PUT changed nothing");
    }

    /// Two coordinators (services) on one table and one bucket, with a
    /// long flush age, and a running attempt leased through A.
    async fn two_services_and_a_running_attempt() -> (
        Arc<crate::Service>,
        Arc<crate::Service>,
        crate::store::LeaseRef,
        tempfile::TempDir,
    ) {
        use drover_proto::model::{JobSpec, Resources};
        use drover_proto::v1;

        use crate::store::{SqliteStore, Store};
        use crate::Service;

        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
        let blobs_a = fresh_store_with(|c| c.log_flush_ms = 60_000).await;
        let blobs_b = another_coordinator(&blobs_a, |_| {});
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config::dev(dir.path());
        let join_token = config.join_tokens[0].token.clone();
        let clock = Arc::new(crate::clock::SystemClock);
        let a = Service::new(
            store.clone(),
            Arc::new(blobs_a),
            clock.clone(),
            config.clone(),
        );
        let b = Service::new(store, Arc::new(blobs_b), clock, config);

        let registered = a
            .register(v1::RegisterRequest {
                join_token,
                agent: Some(v1::AgentInfo {
                    agent_id: "a1".into(),
                    pool: "default".into(),
                    capacity: Some(v1::Resources {
                        cpu_millis: 1000,
                        memory_mib: 1024,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let session = a
            .authenticate(&registered.session_id, Some(&registered.session_token))
            .await
            .unwrap();
        b.submit(vec![JobSpec::command(["true"])]).await.unwrap();
        let free = Resources {
            cpu_millis: 1000,
            memory_mib: 1024,
            ..Resources::default()
        };
        let lease = a.claim(&session, free, 1, 0).await.unwrap().remove(0).lease;
        a.report_started(&session, &lease).await.unwrap();
        (a, b, lease, dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_a_crashed_coordinator_lost_is_resent_and_only_fencing_rejects() {
        use drover_proto::v1;
        use futures::StreamExt;

        use crate::error::ServiceError;
        use crate::service::Appended;
        use crate::store::{Completion, LeaseRef, OutcomeKind};

        let (a, b, lease, _dir) = two_services_and_a_running_attempt().await;
        let chunk = |offset: u64, data: &[u8]| v1::LogChunk {
            offset,
            data: data.to_vec(),
            ..Default::default()
        };
        let answer = a
            .append_logs(&lease, vec![chunk(0, b"first ")], false)
            .await
            .unwrap();
        let buffered = Appended {
            stored: 6,
            durable: 0,
            resend_from: None,
        };
        assert_eq!(answer, buffered, "A holds the bytes in memory only");
        // A stops without flushing (a crash); the agent's next chunk reaches B.
        drop(a);
        let answer = b
            .append_logs(&lease, vec![chunk(6, b"second ")], false)
            .await
            .expect("a gap is not a lost lease");
        let resend = Appended {
            stored: 0,
            durable: 0,
            resend_from: Some(0),
        };
        assert_eq!(answer, resend);
        // The agent resends what was not durable; its last call flushes.
        let answer = b
            .append_logs(
                &lease,
                vec![chunk(0, b"first "), chunk(6, b"second\n")],
                true,
            )
            .await
            .unwrap();
        let durable = Appended {
            stored: 13,
            durable: 13,
            resend_from: None,
        };
        assert_eq!(answer, durable);
        // Another attempt's calls are still fenced.
        let stale = LeaseRef {
            attempt: lease.attempt + 1,
            ..lease.clone()
        };
        let fenced = b
            .append_logs(&stale, vec![chunk(13, b"x")], false)
            .await
            .unwrap_err();
        assert!(
            matches!(fenced, ServiceError::FailedPrecondition(_)),
            "{fenced}"
        );
        b.complete(
            &lease,
            Completion {
                outcome: OutcomeKind::Succeeded,
                exit_code: Some(0),
                reason: String::new(),
            },
        )
        .await
        .unwrap();
        let log = b
            .log_stream(lease.job_id.clone(), lease.attempt, false)
            .map(|part| part.unwrap().to_vec())
            .concat()
            .await;
        assert_eq!(log, b"first second\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logs_written_through_one_service_are_read_through_another() {
        use drover_proto::model::JobState;
        use drover_proto::v1;
        use futures::StreamExt;

        use crate::store::{Completion, OutcomeKind};
        use crate::Service;

        // A long flush age: only the completion makes A's output durable.
        let (a, b, lease, _dir) = two_services_and_a_running_attempt().await;
        let job_id = lease.job_id.clone();
        // A follower on B, from before the first byte.
        let follower = tokio::spawn(
            b.log_stream(job_id.clone(), lease.attempt, true)
                .map(|part| part.unwrap().to_vec())
                .concat(),
        );

        let mut expected = Vec::new();
        for i in 0..50 {
            let line = format!("line {i} of the job's output\n").into_bytes();
            let chunk = v1::LogChunk {
                offset: expected.len() as u64,
                data: line.clone(),
                ..Default::default()
            };
            // Every chunk sent twice, as an agent's retry would.
            a.append_logs(&lease, vec![chunk.clone(), chunk], false)
                .await
                .unwrap();
            expected.extend(line);
        }
        let read = |s: &Arc<Service>| {
            s.log_stream(job_id.clone(), lease.attempt, false)
                .map(|part| part.unwrap().to_vec())
                .concat()
        };
        assert_eq!(read(&a).await, expected, "A reads what it buffered");
        a.complete(
            &lease,
            Completion {
                outcome: OutcomeKind::Succeeded,
                exit_code: Some(0),
                reason: String::new(),
            },
        )
        .await
        .unwrap();
        assert_eq!(b.get_job(&job_id).await.unwrap().state, JobState::Succeeded);
        assert_eq!(read(&b).await, expected, "B reads the finished log");
        let followed = tokio::time::timeout(Duration::from_secs(10), follower)
            .await
            .expect("the follower on B ends with the attempt")
            .unwrap();
        assert_eq!(followed, expected, "B's follower saw every byte once");
    }
}
