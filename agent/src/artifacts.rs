//! A job's artifacts on the agent: inputs are downloaded and unpacked into
//! the attempt's input directory before the job starts; the output directory
//! is packed (tar + zstd) and uploaded afterwards. Both go through URLs the
//! coordinator signed (its own blob route, or S3 presigned URLs): the agent
//! holds no storage credentials.
//!
//! Errors are classified like runtime errors: what retrying cannot fix (an
//! input that is gone, an output too large or unreadable) is the job's
//! fault; network and server trouble is the infrastructure's.

use std::path::{Path, PathBuf};

use drover_proto::v1;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::runtime::{JobDirs, RuntimeError};

/// zstd level: fast, and most of the ratio.
const ZSTD_LEVEL: i32 = 3;

/// Strips the query (the signature) from a URL for messages.
fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn status_error(what: &str, url: &str, status: reqwest::StatusCode, body: &str) -> RuntimeError {
    let body = body.trim();
    let detail = if body.is_empty() {
        String::new()
    } else {
        format!(": {}", body.chars().take(300).collect::<String>())
    };
    let msg = format!("{what} {}: HTTP {status}{detail}", redact(url));
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        RuntimeError::Infra(msg)
    } else {
        RuntimeError::Job(msg)
    }
}

fn network_error(what: &str, url: &str, e: reqwest::Error) -> RuntimeError {
    // reqwest's message includes the URL; say it without the signature.
    RuntimeError::Infra(format!("{what} {}: {}", redact(url), e.without_url()))
}

/// Downloads every input and unpacks it into `dirs.input/<name>/`. An
/// input the coordinator could not provide fails the attempt with its reason.
pub async fn fetch_inputs(
    http: &reqwest::Client,
    dirs: &JobDirs,
    inputs: &[v1::InputArtifact],
) -> Result<(), RuntimeError> {
    for input in inputs {
        if !input.error.is_empty() {
            return Err(RuntimeError::Job(input.error.clone()));
        }
        // The coordinator validated the name (a name, or `<step>/<task>` for
        // a workflow's array step); never trust a path from the wire.
        if drover_proto::model::validate_input_name("inputs.name", &input.name).is_err() {
            return Err(RuntimeError::Job(format!(
                "input name {:?} is not a safe directory name",
                input.name
            )));
        }
        let archive = dirs
            .root
            .join(format!(".input-{}.tar.zst", input.name.replace('/', "-")));
        download(http, &input.url, &archive)
            .await
            .map_err(|e| prefix(&format!("input {}", input.name), e))?;
        let dest = dirs.input.join(&input.name);
        let unpacked = {
            let archive = archive.clone();
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || unpack(&archive, &dest)).await
        };
        let _ = tokio::fs::remove_file(&archive).await;
        match unpacked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(RuntimeError::Job(format!(
                    "input {}: the artifact is not a valid tar + zstd archive: {e}",
                    input.name
                )))
            }
            Err(e) => return Err(RuntimeError::Infra(format!("input {}: {e}", input.name))),
        }
        tracing::debug!(input = %input.name, dir = %dest.display(), "input unpacked");
    }
    Ok(())
}

fn prefix(what: &str, e: RuntimeError) -> RuntimeError {
    match e {
        RuntimeError::Job(m) => RuntimeError::Job(format!("{what}: {m}")),
        RuntimeError::Infra(m) => RuntimeError::Infra(format!("{what}: {m}")),
    }
}

async fn download(http: &reqwest::Client, url: &str, to: &Path) -> Result<(), RuntimeError> {
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| network_error("cannot download", url, e))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(status_error("cannot download", url, status, &body));
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| RuntimeError::Infra(format!("cannot write {}: {e}", to.display())))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| network_error("download broke off:", url, e))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| RuntimeError::Infra(format!("cannot write {}: {e}", to.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| RuntimeError::Infra(format!("cannot write {}: {e}", to.display())))?;
    Ok(())
}

/// Unpacks a tar + zstd archive into `dest`. Entries that would land outside
/// `dest` (absolute paths, `..`, through symlinks) are refused by `tar`.
pub fn unpack(archive: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let file = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(file)?);
    tar.set_overwrite(true);
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    tar.unpack(dest)
}

/// Packs everything under `dir` into a tar + zstd archive at `archive`.
/// Symlinks are stored as links, never followed: a job must not be able to
/// pack the agent's host files by linking to them.
pub fn pack(dir: &Path, archive: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::create(archive)?;
    let encoder = zstd::stream::write::Encoder::new(file, ZSTD_LEVEL)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(".", dir)?;
    let file = tar.into_inner()?.finish()?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// The packed output directory of an attempt, ready to upload.
pub struct PackedOutput {
    pub path: PathBuf,
    pub bytes: u64,
}

pub async fn pack_output(dirs: &JobDirs) -> Result<PackedOutput, RuntimeError> {
    let path = dirs.root.join(".output.tar.zst");
    let (dir, to) = (dirs.output.clone(), path.clone());
    match tokio::task::spawn_blocking(move || pack(&dir, &to)).await {
        Ok(Ok(bytes)) => Ok(PackedOutput { path, bytes }),
        Ok(Err(e)) => Err(RuntimeError::Job(format!(
            "cannot pack the output directory: {e} (only regular files, directories and symlinks can be kept)"
        ))),
        Err(e) => Err(RuntimeError::Infra(format!(
            "cannot pack the output directory: {e}"
        ))),
    }
}

/// PUTs the archive to a signed upload URL.
pub async fn upload(
    http: &reqwest::Client,
    packed: &PackedOutput,
    url: &v1::ArtifactUploadUrlResponse,
) -> Result<(), RuntimeError> {
    if url.max_bytes > 0 && packed.bytes > url.max_bytes {
        return Err(RuntimeError::Job(format!(
            "the output is {} bytes packed, more than the coordinator accepts ({} bytes, max_artifact_bytes): write less to the output directory",
            packed.bytes, url.max_bytes
        )));
    }
    let file = tokio::fs::File::open(&packed.path)
        .await
        .map_err(|e| RuntimeError::Infra(format!("cannot read the packed output: {e}")))?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let response = http
        .put(&url.url)
        .header(reqwest::header::CONTENT_LENGTH, packed.bytes)
        .header(reqwest::header::CONTENT_TYPE, "application/zstd")
        .body(body)
        .send()
        .await
        .map_err(|e| network_error("cannot upload the output to", &url.url, e))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        // An expired URL (403) is worth another URL, not a failed job.
        let e = status_error("cannot upload the output to", &url.url, status, &body);
        return Err(match (status, e) {
            (reqwest::StatusCode::FORBIDDEN, RuntimeError::Job(m)) => RuntimeError::Infra(m),
            (_, e) => e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_round_trips_files_dirs_and_links_without_following_them() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub/deeper")).unwrap();
        std::fs::write(src.path().join("x"), b"42\n").unwrap();
        std::fs::write(src.path().join("sub/deeper/y"), vec![7u8; 100_000]).unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), b"host secret").unwrap();
        std::os::unix::fs::symlink(secret.path(), src.path().join("link")).unwrap();

        let work = tempfile::tempdir().unwrap();
        let archive = work.path().join("a.tar.zst");
        let bytes = pack(src.path(), &archive).unwrap();
        assert!(bytes > 0 && bytes < 100_000, "compressed: {bytes} bytes");
        let dest = work.path().join("out");
        unpack(&archive, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"42\n");
        assert_eq!(
            std::fs::read(dest.join("sub/deeper/y")).unwrap(),
            vec![7u8; 100_000]
        );
        let link = std::fs::symlink_metadata(dest.join("link")).unwrap();
        assert!(link.file_type().is_symlink(), "the link is kept as a link");
        let raw = zstd::stream::decode_all(std::fs::File::open(&archive).unwrap()).unwrap();
        assert!(
            !raw.windows(11).any(|w| w == b"host secret"),
            "the link's target was not packed"
        );
    }

    #[test]
    fn unpack_refuses_entries_outside_the_destination() {
        let work = tempfile::tempdir().unwrap();
        let archive = work.path().join("evil.tar.zst");
        {
            let file = std::fs::File::create(&archive).unwrap();
            let encoder = zstd::stream::write::Encoder::new(file, 3).unwrap();
            let mut tar = tar::Builder::new(encoder);
            let data = b"pwned";
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            // Bypass the builder's own path checks: write the name raw.
            header.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../escaped.t");
            header.set_cksum();
            tar.append(&header, &data[..]).unwrap();
            tar.into_inner().unwrap().finish().unwrap();
        }
        let dest = work.path().join("in");
        let _ = unpack(&archive, &dest);
        assert!(
            !work.path().join("escaped.t").exists(),
            "an entry with .. must not land outside the destination"
        );
    }
}
