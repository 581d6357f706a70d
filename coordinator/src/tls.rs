//! TLS on both listeners when `tls_cert_file` and `tls_key_file` are set.
//! The files are read and checked once, before anything binds: gRPC gets
//! them through tonic, HTTP through a rustls acceptor in front of axum.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const CERT_SETTING: &str = "tls_cert_file (DROVER_TLS_CERT_FILE)";
const KEY_SETTING: &str = "tls_key_file (DROVER_TLS_KEY_FILE)";

/// Why the configured certificate and key cannot be served. Messages name
/// the setting and the file, never the key's content.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Certificate(#[from] drover_proto::tls::PemFileError),
    #[error("{KEY_SETTING}: cannot read {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{KEY_SETTING}: {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): give the key of the certificate in tls_cert_file")]
    NoKey { path: PathBuf },
    #[error("{KEY_SETTING}: {key} is not the private key of the certificate in {cert} ({reason}): give the matching pair")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The checked certificate chain and key.
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    http: TlsAcceptor,
}

impl ServerTls {
    /// Reads both files and checks that the key is the certificate's.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls, TlsSetupError> {
        let chain = drover_proto::tls::read_certificates(cert_file, CERT_SETTING)?;
        let key_pem = std::fs::read(key_file).map_err(|source| TlsSetupError::ReadKey {
            path: key_file.to_path_buf(),
            source,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsSetupError::NoKey {
            path: key_file.to_path_buf(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain.certs, key))
            .map_err(|e| TlsSetupError::Mismatch {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert_pem: chain.pem,
            key_pem,
            http: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The same pair for tonic (which offers h2 only).
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Wraps the HTTP listener: accepted connections are TLS streams.
    pub fn http_listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: self.http.clone(),
            handshakes: JoinSet::new(),
        }
    }
}

/// An [`axum::serve::Listener`] that yields connections once their TLS
/// handshake is done. Handshakes run concurrently, so a slow client does
/// not hold up the others.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        // Nagle off, as on the gRPC listener.
                        if let Err(e) = tcp.set_nodelay(true) {
                            tracing::debug!("cannot set TCP_NODELAY on an HTTPS connection: {e}");
                        }
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    // Out of file descriptors and the like: as axum's own
                    // listener does, wait a little rather than spin.
                    Err(e) => {
                        tracing::warn!("accepting an HTTPS connection: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
