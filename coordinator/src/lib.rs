//! Drover's coordinator: hands out job leases to agents (gRPC), serves the
//! HTTP JSON API, and keeps all state in a [`store::Store`].
//!
//! [`Server::start`] binds both listeners and runs everything in the
//! background; [`run`] is the binary's entry point.

pub mod auth;
pub mod aws;
pub mod blob;
pub mod clock;
pub mod config;
pub mod cost;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
#[cfg(test)]
mod moto;
pub mod reaper;
pub mod scaler;
pub mod service;
pub mod store;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{
    ApiTokenConfig, AsgScaling, AwsConfig, BlobKind, Config, ConfigError, DynamoDbConfig,
    FargateScaling, JoinTokenConfig, PoolConfig, S3Config, ScalingConfig, Scope, StoreKind,
    WorkerCapacity,
};
pub use service::Service;

/// A running coordinator (gRPC + HTTP + reaper).
pub struct Server {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    service: Arc<Service>,
    scaler: Option<Arc<scaler::Scaler>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Opens the store, binds both listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        let store = open_store(&config).await?;
        let blobs = open_blobs(&config).await?;
        let service = Service::new(store, blobs, Arc::new(clock::SystemClock), config.clone());
        Self::start_with(service).await
    }

    /// Serves an already built service (tests choose store, blobs and clock).
    pub async fn start_with(service: Arc<Service>) -> anyhow::Result<Server> {
        let config = service.config().clone();
        // Before binding: a bad certificate or key leaves nothing listening.
        let tls = match config.tls_files()? {
            Some((cert, key)) => Some(tls::ServerTls::load(cert, key)?),
            None => None,
        };
        let grpc_listener = tokio::net::TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| {
                format!(
                    "binding the gRPC address {} (grpc_addr / DROVER_GRPC_ADDR)",
                    config.grpc_addr
                )
            })?;
        let http_listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| {
                format!(
                    "binding the HTTP address {} (http_addr / DROVER_HTTP_ADDR)",
                    config.http_addr
                )
            })?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        service.set_public_url(default_public_url(http_addr, tls.is_some()));
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let grpc = grpc::AgentGrpc::new(service.clone()).into_server();
        let mut grpc_server = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            grpc_server = grpc_server
                .tls_config(tls.grpc())
                .context("TLS for the gRPC listener (tls_cert_file / tls_key_file)")?;
        }
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            grpc_server
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
                .add_service(grpc)
                .serve_with_incoming_shutdown(
                    // Nagle off, as tonic's own listener has it: a response
                    // written in pieces must not wait for the peer's
                    // delayed ACK.
                    tonic::transport::server::TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(true)),
                    stop.cancelled_owned(),
                )
                .await
                .context("gRPC server")
        }));

        let app = http::router(service.clone());
        let stop = shutdown.clone().cancelled_owned();
        tasks.push(tokio::spawn(async move {
            use axum::serve::ListenerExt as _;
            let served = match tls {
                Some(tls) => {
                    axum::serve(tls.http_listener(http_listener), app)
                        .with_graceful_shutdown(stop)
                        .await
                }
                None => {
                    let http_listener = http_listener.tap_io(|tcp| {
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!("cannot set TCP_NODELAY on an HTTP connection: {e}");
                        }
                    });
                    axum::serve(http_listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                }
            };
            served.context("HTTP server")
        }));

        // One poller per coordinator: one look at each waiting pool's queue
        // wakes the claims that fit what is there, so backoffs that ended
        // and other coordinators' jobs are noticed without every idle agent
        // querying the store.
        let stop = shutdown.clone();
        let poller_service = service.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(service::CLAIM_POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => poller_service.poll_tick().await,
                }
            }
        }));

        let stop = shutdown.clone();
        let reaper_service = service.clone();
        tasks.push(tokio::spawn(async move {
            reaper::run(reaper_service, config.reaper_interval_ms, stop).await;
            Ok(())
        }));

        // Pools bound to an ASG or to Fargate: one scaler, under the leader
        // lease (any number of coordinators may run it; one acts).
        let scaler = if config.scaling_pools().next().is_some() {
            let cloud = scaler::Cloud::connect(&config.aws).await;
            let scaler = scaler::Scaler::new(service.clone(), cloud);
            let stop = shutdown.clone();
            let run = scaler.clone();
            tasks.push(tokio::spawn(async move {
                scaler::run(run, config.scaler_interval_ms, stop).await;
                Ok(())
            }));
            Some(scaler)
        } else {
            None
        };

        tracing::info!(%grpc_addr, %http_addr, data_dir = %config.data_dir.display(), "coordinator serving");
        Ok(Server {
            grpc_addr,
            http_addr,
            service,
            scaler,
            shutdown,
            tasks,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The scaler, when some pool is bound to an ASG or to Fargate.
    pub fn scaler(&self) -> Option<&Arc<scaler::Scaler>> {
        self.scaler.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish, stops the reaper.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.service.close_command_streams();
        self.shutdown.cancel();
        for task in self.tasks {
            // Long-polls and log follows end when their connections close.
            match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
                Ok(joined) => joined??,
                Err(_) => tracing::warn!("a server task did not stop within 5s; abandoning it"),
            }
        }
        // Buffered log output reaches the store before the process goes.
        if let Err(e) = self.service.flush_logs().await {
            tracing::warn!("flushing buffered logs at shutdown: {e}");
        }
        Ok(())
    }
}

/// `http(s)://<bound address>`, or the host name when bound to all
/// interfaces (an unspecified address is no use to an agent on another host).
fn default_public_url(http_addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if http_addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        format!("{scheme}://{host}:{}", http_addr.port())
    } else {
        format!("{scheme}://{http_addr}")
    }
}

/// The configured store backend.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn store::Store>> {
    Ok(match config.store {
        StoreKind::Sqlite => Arc::new(
            store::SqliteStore::open(&config.data_dir.join("drover.db"))
                .context("opening the SQLite store")?,
        ),
        StoreKind::Dynamodb => Arc::new(
            store::DynamoStore::connect(&config.dynamodb)
                .await
                .with_context(|| {
                    format!(
                        "connecting to the DynamoDB table {:?} (dynamodb.table / DROVER_DYNAMODB_TABLE)",
                        config.dynamodb.table
                    )
                })?,
        ),
    })
}

/// The configured blob store.
pub async fn open_blobs(config: &Config) -> anyhow::Result<Arc<dyn blob::BlobStore>> {
    Ok(match config.blobs {
        BlobKind::Local => Arc::new(blob::LocalBlobStore::new(config.data_dir.join("blobs"))),
        BlobKind::S3 => Arc::new(blob::S3BlobStore::connect(&config.s3).await),
    })
}

/// Creates the DynamoDB table, its indexes and TTL (`init-table`).
pub async fn init_table(config: &DynamoDbConfig) -> anyhow::Result<()> {
    let client = store::dynamodb::client_from_config(config).await;
    store::dynamodb::create_table(&client, &config.table)
        .await
        .with_context(|| format!("creating the DynamoDB table {:?}", config.table))?;
    Ok(())
}

/// The binary's entry point: serve until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    server.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_public_url_is_https_when_tls_is_on() {
        let addr: SocketAddr = "127.0.0.1:7080".parse().unwrap();
        assert_eq!(default_public_url(addr, false), "http://127.0.0.1:7080");
        assert_eq!(default_public_url(addr, true), "https://127.0.0.1:7080");
    }
}
