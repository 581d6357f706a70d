//! Drover's wire types.
//!
//! - [`v1`]: the generated `drover.v1` AgentService (gRPC, agents only).
//! - [`model`]: the domain types of the HTTP JSON API (jobs, events, agents,
//!   pools), shared by the coordinator and the CLI so the two cannot drift.
//! - [`workflow`]: workflow files, their validation and expansion into jobs.
//! - [`ErrorCode`]: the one mapping from error kinds to gRPC and HTTP codes.
//! - [`tls`]: certificate files and TLS failures, named for the user.

pub mod model;
pub mod tls;
pub mod workflow;

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("drover.v1");
}

mod error_code;
pub use error_code::ErrorCode;
