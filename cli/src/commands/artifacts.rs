//! `drover artifacts get`: download a job's artifact, or unpack it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_proto::model::Artifact;
use serde::Serialize;

use crate::args::ArtifactsAction;
use crate::client::Client;
use crate::commands::print_json;

pub async fn run(client: &Client, action: &ArtifactsAction, json: bool) -> anyhow::Result<()> {
    match action {
        ArtifactsAction::Get {
            job,
            output,
            extract,
        } => get(client, job, output.as_deref(), extract.as_deref(), json).await,
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Fetched<'a> {
    job_id: &'a str,
    attempt: u64,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<String>,
}

async fn get(
    client: &Client,
    job: &str,
    output: Option<&Path>,
    extract: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let artifact = client.artifact(job).await?;
    let to_stdout = output.is_some_and(|p| p == Path::new("-"));
    if to_stdout {
        let mut out = std::io::stdout().lock();
        download(client, &artifact, &mut out, false).await?;
        out.flush()?;
        return Ok(());
    }
    match extract {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let archive = tempfile_in(dir)?;
            let result = async {
                let mut file = std::fs::File::create(&archive)
                    .with_context(|| format!("cannot write {}", archive.display()))?;
                download(client, &artifact, &mut file, !json).await?;
                file.sync_all()?;
                drover_agent::artifacts::unpack(&archive, dir)
                    .with_context(|| format!("cannot unpack the artifact into {}", dir.display()))
            }
            .await;
            let _ = std::fs::remove_file(&archive);
            result?;
            report(&artifact, None, Some(dir), json)
        }
        None => {
            let file_name = output
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(format!("{}.tar.zst", artifact.job_id)));
            let partial = file_name.with_extension("zst.part");
            let result = async {
                let mut file = std::fs::File::create(&partial)
                    .with_context(|| format!("cannot write {}", partial.display()))?;
                download(client, &artifact, &mut file, !json).await?;
                file.sync_all()?;
                std::fs::rename(&partial, &file_name)
                    .with_context(|| format!("cannot write {}", file_name.display()))
            }
            .await;
            if result.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            result?;
            report(&artifact, Some(&file_name), None, json)
        }
    }
}

fn tempfile_in(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(dir.join(format!(".drover-artifact-{}.part", std::process::id())))
}

fn report(
    artifact: &Artifact,
    file: Option<&Path>,
    dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&Fetched {
            job_id: &artifact.job_id,
            attempt: artifact.attempt,
            bytes: artifact.bytes,
            file: file.map(|f| f.display().to_string()),
            dir: dir.map(|d| d.display().to_string()),
        });
    }
    match (file, dir) {
        (Some(file), _) => println!(
            "{} ({} bytes, job {} attempt {})",
            file.display(),
            artifact.bytes,
            artifact.job_id,
            artifact.attempt
        ),
        (_, Some(dir)) => println!(
            "unpacked into {} (job {} attempt {})",
            dir.display(),
            artifact.job_id,
            artifact.attempt
        ),
        _ => {}
    }
    Ok(())
}

/// Streams the artifact into `out`, with progress on stderr when asked.
async fn download(
    client: &Client,
    artifact: &Artifact,
    out: &mut impl Write,
    progress: bool,
) -> anyhow::Result<u64> {
    let mut response = client.download(&artifact.url).await?;
    let tty = progress && std::io::stderr().is_terminal();
    let mut done = 0u64;
    let mut last = Instant::now();
    while let Some(chunk) = response
        .chunk()
        .await
        .context("the download broke off; run the command again")?
    {
        out.write_all(&chunk)?;
        done += chunk.len() as u64;
        if tty && last.elapsed() >= Duration::from_millis(200) {
            last = Instant::now();
            eprint!("\r  {done} / {} bytes", artifact.bytes);
        }
    }
    if tty {
        eprintln!("\r  {done} / {} bytes", artifact.bytes);
    }
    if done != artifact.bytes {
        anyhow::bail!(
            "the download ended after {done} of {} bytes; run the command again",
            artifact.bytes
        );
    }
    Ok(done)
}
