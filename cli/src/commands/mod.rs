//! One module per group of commands; [`run`] dispatches a parsed command line.

pub mod agents;
pub mod artifacts;
pub mod jobs;
pub mod pools;
pub mod submit;
pub mod workflows;

use std::future::Future;

use serde::Serialize;

use crate::args::{Cli, Command};
use crate::client::{ApiFailure, Client};
use crate::config;
use crate::error::EXIT_OK;

/// Runs the command; returns the process exit code. `shutdown` stops
/// long-running commands (`drover dev`) cleanly.
pub async fn run(
    cli: Cli,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<i32> {
    if let Command::Dev(args) = &cli.command {
        return crate::dev::run(args.clone(), shutdown).await;
    }
    let client = connect(&cli)?;
    let json = cli.json;
    match &cli.command {
        Command::Submit(args) => return submit::run(&client, args, json).await,
        Command::Jobs(args) => jobs::list(&client, args, json).await?,
        Command::Run(args) => return workflows::run(&client, args, json, shutdown).await,
        Command::Runs(args) => workflows::list(&client, args, json).await?,
        Command::Show { id } => show(&client, id, json).await?,
        Command::Logs(args) => jobs::logs(&client, args, json).await?,
        Command::Cancel { id } => cancel(&client, id, json).await?,
        Command::Retry { job } => jobs::retry(&client, job, json).await?,
        Command::Agents => agents::list(&client, json).await?,
        Command::Drain { agent } => agents::drain(&client, agent, json).await?,
        Command::Artifacts { action } => artifacts::run(&client, action, json).await?,
        Command::Pools { action } => pools::run(&client, action.as_ref(), json).await?,
        Command::Dev(_) => unreachable!("handled above"),
    }
    Ok(EXIT_OK)
}

/// `drover show ID`: a job, or else a workflow run (both ids are ULIDs: the
/// job is asked for first, the run on a 404).
async fn show(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    match client.get_job(id).await {
        Ok(job) => jobs::show_job(client, job, json).await,
        Err(err) if ApiFailure::is_not_found(&err) => match client.get_workflow(id).await {
            Ok(run) => workflows::show(&run, json),
            Err(err) if ApiFailure::is_not_found(&err) => Err(no_such_id(id)),
            Err(err) => Err(err),
        },
        Err(err) => Err(err),
    }
}

/// `drover cancel ID`: a job, or else every unfinished step of a run.
async fn cancel(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    match client.cancel_job(id).await {
        Ok(job) => jobs::print_cancelled(&job, json),
        Err(err) if ApiFailure::is_not_found(&err) => {
            match workflows::cancel(client, id, json).await {
                Err(err) if ApiFailure::is_not_found(&err) => Err(no_such_id(id)),
                other => other,
            }
        }
        Err(err) => Err(err),
    }
}

fn no_such_id(id: &str) -> anyhow::Error {
    anyhow::anyhow!("no job or workflow run has the id {id:?} (see `drover jobs`, `drover runs`)")
}

/// A client for the coordinator named by flags, environment or cli.toml.
pub fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let cwd = std::env::current_dir()?;
    let resolved = config::resolve(
        cli.addr.as_deref(),
        cli.token.as_deref(),
        &config::process_env,
        &cwd,
    )?;
    tracing::debug!(addr = %resolved.addr, source = ?resolved.source, "coordinator");
    let ca_file = cli.ca_file.clone().or(resolved.ca_file);
    Client::with_ca_file(&resolved.addr, resolved.token, ca_file.as_deref())
}

/// Pretty JSON on stdout, one document.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
