//! One module per group of commands; [`run`] dispatches a parsed command line.

pub mod agents;
pub mod artifacts;
pub mod jobs;
pub mod pools;
pub mod submit;

use std::future::Future;

use serde::Serialize;

use crate::args::{Cli, Command};
use crate::client::Client;
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
        Command::Show { job } => jobs::show(&client, job, json).await?,
        Command::Logs(args) => jobs::logs(&client, args, json).await?,
        Command::Cancel { job } => jobs::cancel(&client, job, json).await?,
        Command::Retry { job } => jobs::retry(&client, job, json).await?,
        Command::Agents => agents::list(&client, json).await?,
        Command::Drain { agent } => agents::drain(&client, agent, json).await?,
        Command::Artifacts { action } => artifacts::run(&client, action, json).await?,
        Command::Pools { action } => pools::run(&client, action.as_ref(), json).await?,
        Command::Dev(_) => unreachable!("handled above"),
    }
    Ok(EXIT_OK)
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
    Client::new(&resolved.addr, resolved.token)
}

/// Pretty JSON on stdout, one document.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
