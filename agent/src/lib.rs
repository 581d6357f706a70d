//! Drover's agent (DESIGN §6): registers a session with the coordinator,
//! claims jobs that fit its free resources, runs them through a [`Runtime`],
//! streams their output, heartbeats (fencing itself when its session may have
//! expired), drains on request, and reports its health over HTTP. On AWS its
//! [`Platform`] adds identity labels, interruption handling, scale-in
//! protection and idle self-termination.
//!
//! [`Platform`]: platform::Platform
//!
//! [`Runtime`]: runtime::Runtime

mod agent;
pub mod artifacts;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod fence;
pub mod gpu;
mod health;
mod job;
pub mod metrics;
pub mod platform;
pub mod resources;
pub mod runtime;
pub mod session;

pub use agent::{run, Agent};
pub use config::{AgentConfig, ConfigError};
