//! The [`BlobStore`] conformance suite: every backend must pass these same
//! test functions; `blob_conformance!` expands them for a backend.
//!
//! Signed URLs are used the way their holders use them: a
//! [`SignedUrl::External`] with reqwest, a [`SignedUrl::Coordinator`] through
//! the checks of the coordinator's `/v1/blobs/…` route.

use futures::StreamExt;

use super::{
    Access, ArtifactKey, BlobError, BlobStore, ByteStream, LogLen, S3BlobStore, SignedUrl,
};
use crate::blob::LocalBlobStore;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The query parameter `name` of `url`.
fn param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// When a signed URL stops working, as the URL itself says (unix ms).
fn expiry_in_url(url: &SignedUrl) -> i64 {
    match url {
        SignedUrl::Coordinator(path) => param(path, "expires").unwrap().parse().unwrap(),
        SignedUrl::External(url) => {
            // SigV4: X-Amz-Date (yyyymmddThhmmssZ) + X-Amz-Expires seconds.
            let date = param(url, "X-Amz-Date").expect("X-Amz-Date");
            let expires: i64 = param(url, "X-Amz-Expires").unwrap().parse().unwrap();
            let num = |r: std::ops::Range<usize>| -> i64 { date[r].parse().unwrap() };
            let days = days_from_civil(num(0..4), num(4..6), num(6..8));
            let secs = days * 86_400 + num(9..11) * 3600 + num(11..13) * 60 + num(13..15);
            (secs + expires) * 1000
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The route's checks: a known object, a valid signature, not expired.
fn coordinator_route<B: BlobStore>(blobs: &B, path: &str, access: Access) -> ArtifactKey {
    let (object, _) = path
        .strip_prefix(super::local::BLOB_ROUTE)
        .and_then(|p| p.split_once('?'))
        .expect("a blob route URL");
    let key = ArtifactKey::parse(object).expect("an artifact object");
    let expires: i64 = param(path, "expires").unwrap().parse().unwrap();
    let signature = param(path, "signature").unwrap();
    assert!(blobs.verify(&key, access, expires, &signature), "signature");
    assert!(expires >= now_ms(), "expired");
    key
}

async fn upload<B: BlobStore>(blobs: &B, url: SignedUrl, data: &'static [u8]) {
    match url {
        SignedUrl::External(url) => {
            let resp = reqwest::Client::new()
                .put(&url)
                .header(reqwest::header::CONTENT_LENGTH, data.len())
                .header(reqwest::header::CONTENT_TYPE, "application/zstd")
                .body(data)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            assert!(
                status.is_success(),
                "PUT {url}: {status}: {}",
                resp.text().await.unwrap()
            );
        }
        SignedUrl::Coordinator(path) => {
            let key = coordinator_route(blobs, &path, Access::Put);
            let body: ByteStream =
                futures::stream::iter([Ok(bytes::Bytes::from_static(data))]).boxed();
            assert_eq!(
                blobs.put_artifact(&key, body, 1 << 20).await.unwrap(),
                data.len() as u64
            );
        }
    }
}

async fn download<B: BlobStore>(blobs: &B, url: SignedUrl) -> Vec<u8> {
    match url {
        SignedUrl::External(url) => {
            let resp = reqwest::get(&url).await.unwrap();
            assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
            resp.bytes().await.unwrap().to_vec()
        }
        SignedUrl::Coordinator(path) => {
            let key = coordinator_route(blobs, &path, Access::Get);
            let (stream, _) = blobs.open_artifact(&key).await.unwrap().unwrap();
            stream.map(|c| c.unwrap().to_vec()).concat().await
        }
    }
}

pub async fn retried_append_does_not_duplicate_and_gaps_are_rejected<B: BlobStore>(blobs: B) {
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
    assert_eq!(blobs.read_log("J1", 1, 6, 3).await.unwrap(), b"wor");
    assert!(blobs.read_log("J1", 1, 11, 100).await.unwrap().is_empty());
    assert!(blobs.read_log("J1", 2, 0, 100).await.unwrap().is_empty());
    assert!(blobs.read_log("J2", 1, 0, 100).await.unwrap().is_empty());
}

pub async fn read_after_flush_returns_every_byte_once<B: BlobStore>(blobs: B) {
    // 20,000 bytes in chunks of 700, each sent twice (a retry) and the
    // second time overlapping the next chunk's start.
    let log: Vec<u8> = (0..20_000u32)
        .map(|i| b"0123456789abcdef\n"[i as usize % 17])
        .collect();
    for start in (0..log.len()).step_by(700) {
        let end = (start + 700).min(log.len());
        blobs
            .append_log("J1", 3, start as u64, &log[start..end])
            .await
            .unwrap();
        let retry_end = (end + 50).min(log.len());
        let stored = blobs
            .append_log("J1", 3, start as u64, &log[start..retry_end])
            .await
            .unwrap();
        assert_eq!(stored, retry_end as u64);
    }
    let read_all = |chunk: usize| {
        let blobs = &blobs;
        async move {
            let mut out = Vec::new();
            loop {
                let part = blobs
                    .read_log("J1", 3, out.len() as u64, chunk)
                    .await
                    .unwrap();
                if part.is_empty() {
                    return out;
                }
                assert!(part.len() <= chunk);
                out.extend(part);
            }
        }
    };
    assert!(read_all(4096).await == log, "before the flush");
    let len = blobs.log_len("J1", 3).await.unwrap();
    assert!(len.stored == 20_000 && len.durable <= len.stored, "{len:?}");
    blobs.flush_log("J1", 3).await.unwrap();
    assert_eq!(
        blobs.log_len("J1", 3).await.unwrap(),
        LogLen {
            stored: 20_000,
            durable: 20_000
        },
        "a flush makes every stored byte durable"
    );
    assert!(read_all(4096).await == log, "after the flush");
    assert!(read_all(999).await == log, "in odd pieces");
    assert_eq!(
        blobs.read_log("J1", 3, 19_990, 100).await.unwrap(),
        &log[19_990..]
    );
    // Appends after a flush continue the same log.
    assert_eq!(
        blobs.append_log("J1", 3, 20_000, b"tail").await.unwrap(),
        20_004
    );
    assert!(matches!(
        blobs.append_log("J1", 3, 20_010, b"x").await,
        Err(BlobError::Gap { stored: 20_004, .. })
    ));
    blobs.flush_log("J1", 3).await.unwrap();
    blobs.flush_all().await.unwrap();
    let tail = [&log[19_998..], b"tail"].concat();
    assert_eq!(blobs.read_log("J1", 3, 19_998, 100).await.unwrap(), tail);
    // Flushing an attempt nobody wrote is fine.
    blobs.flush_log("J9", 1).await.unwrap();
}

/// What a store reports durable is what the store started again after a
/// crash (nothing flushed at shutdown) holds; a chunk past that is refused
/// as a gap until the rest is resent. Returns whether the gap happened.
pub async fn durable_bytes_survive_a_crash<B: BlobStore>(
    blobs: B,
    restarted: impl Fn(&B) -> B,
) -> bool {
    assert_eq!(blobs.log_len("J1", 1).await.unwrap(), LogLen::default());
    assert_eq!(blobs.append_log("J1", 1, 0, b"hello ").await.unwrap(), 6);
    assert_eq!(blobs.append_log("J1", 1, 6, b"world").await.unwrap(), 11);
    let before = blobs.log_len("J1", 1).await.unwrap();
    assert!(before.stored == 11 && before.durable <= 11, "{before:?}");
    let after = restarted(&blobs);
    let seen = after.log_len("J1", 1).await.unwrap();
    assert!(
        seen.durable >= before.durable,
        "durable bytes were lost: {before:?} before the crash, {seen:?} after"
    );
    assert_eq!(seen.stored, seen.durable, "only durable bytes survive");
    let kept = seen.stored as usize;
    assert_eq!(
        after.read_log("J1", 1, 0, 100).await.unwrap(),
        &b"hello world"[..kept]
    );
    // The agent's next chunk; on a gap it resends from where the store is.
    let gap = match after.append_log("J1", 1, 11, b"!").await {
        Ok(stored) => {
            assert_eq!((kept, stored), (11, 12));
            false
        }
        Err(BlobError::Gap { offset, stored }) => {
            assert_eq!((offset, stored), (11, kept as u64));
            let rest = &b"hello world!"[kept..];
            assert_eq!(after.append_log("J1", 1, stored, rest).await.unwrap(), 12);
            true
        }
        Err(e) => panic!("appending after the crash: {e}"),
    };
    after.flush_log("J1", 1).await.unwrap();
    let whole = LogLen {
        stored: 12,
        durable: 12,
    };
    assert_eq!(after.log_len("J1", 1).await.unwrap(), whole);
    let again = restarted(&after);
    assert_eq!(again.log_len("J1", 1).await.unwrap(), whole);
    assert_eq!(
        again.read_log("J1", 1, 0, 100).await.unwrap(),
        b"hello world!"
    );
    gap
}

pub async fn artifacts_round_trip_through_signed_urls<B: BlobStore>(blobs: B) {
    let key = ArtifactKey::new("J1", 2);
    let expires = now_ms() + 600_000;
    assert_eq!(blobs.artifact_size(&key).await.unwrap(), None);
    let put = blobs
        .artifact_url(&key, Access::Put, expires)
        .await
        .unwrap();
    upload(&blobs, put, b"an archive").await;
    assert_eq!(blobs.artifact_size(&key).await.unwrap(), Some(10));
    let get = blobs
        .artifact_url(&key, Access::Get, expires)
        .await
        .unwrap();
    assert_eq!(download(&blobs, get).await, b"an archive");
    // Another attempt has its own artifact.
    assert_eq!(
        blobs
            .artifact_size(&ArtifactKey::new("J1", 3))
            .await
            .unwrap(),
        None
    );
    // A new upload replaces the artifact whole.
    let put = blobs
        .artifact_url(&key, Access::Put, expires)
        .await
        .unwrap();
    upload(&blobs, put, b"v2").await;
    let get = blobs
        .artifact_url(&key, Access::Get, expires)
        .await
        .unwrap();
    assert_eq!(download(&blobs, get).await, b"v2");
}

pub async fn signed_urls_say_when_they_expire<B: BlobStore>(blobs: B) {
    let key = ArtifactKey::new("J1", 1);
    for access in [Access::Put, Access::Get] {
        for ttl_ms in [60_000, 3_600_000] {
            let expires = now_ms() + ttl_ms;
            let url = blobs.artifact_url(&key, access, expires).await.unwrap();
            if let SignedUrl::External(url) = &url {
                assert!(
                    !url.to_ascii_lowercase().contains("checksum"),
                    "a presigned URL must not fix a body checksum: {url}"
                );
            }
            let said = expiry_in_url(&url);
            assert!(
                said <= expires && expires - said < 1000,
                "{access:?} URL for {expires} says it expires at {said}: {url:?}"
            );
        }
    }
}

/// Expands every conformance test for one backend.
macro_rules! blob_conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            blob_conformance!(@tests $make;
                retried_append_does_not_duplicate_and_gaps_are_rejected,
                read_after_flush_returns_every_byte_once,
                artifacts_round_trip_through_signed_urls,
                signed_urls_say_when_they_expire,
            );
        }
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let (blobs, _keep) = $make.await;
                super::$test(blobs).await;
            }
        )*
    };
}

blob_conformance!(local, async {
    let dir = tempfile::tempdir().unwrap();
    (LocalBlobStore::new(dir.path()), dir)
});
blob_conformance!(s3, async {
    let blobs: S3BlobStore = crate::blob::s3::tests::fresh_store().await;
    (blobs, ())
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_durable_bytes_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let restarted = |_: &LocalBlobStore| LocalBlobStore::new(dir.path());
    let gap = durable_bytes_survive_a_crash(LocalBlobStore::new(dir.path()), restarted).await;
    assert!(!gap, "the local store writes through: nothing to resend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_durable_bytes_survive_a_crash() {
    use crate::blob::s3::tests::{another_coordinator, fresh_store_with};
    // Nothing is flushed by age during the test: the crash loses the buffer.
    let blobs = fresh_store_with(|c| c.log_flush_ms = 60_000).await;
    let restarted = |b: &S3BlobStore| another_coordinator(b, |_| {});
    let gap = durable_bytes_survive_a_crash(blobs, restarted).await;
    assert!(gap, "the buffered bytes died with the coordinator");
}

#[test]
fn civil_dates_count_days_from_the_epoch() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(days_from_civil(2024, 2, 29), 19_782);
}
