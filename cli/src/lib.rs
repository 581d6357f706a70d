//! The `drover` CLI as a library: the binary only parses and dispatches, so
//! tests (and `drover dev --demo`) drive the same code.
//!
//! - [`client`]: a typed client for the coordinator's HTTP JSON API.
//! - [`config`]: where the coordinator is (flags, env, `cli.toml`).
//! - [`commands`]: one function per command; [`commands::run`] dispatches.
//! - [`dev`]: `drover dev`, a coordinator and local agents in one process.

pub mod args;
pub mod client;
pub mod commands;
pub mod config;
pub mod dev;
pub mod error;
pub mod human;
pub mod table;

pub use args::Cli;
pub use client::{ApiFailure, Client, JobQuery};
