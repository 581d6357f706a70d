//! TLS pieces the three binaries share: reading a PEM certificate file with
//! errors that name the setting, and telling a TLS failure apart from an
//! unreachable coordinator so the message can name the fix.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, Error as TlsError};

/// A PEM file named by a setting that cannot be used. Messages name the
/// setting and the path, never the file's content.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    #[error("{setting}: cannot read {path}: {source}")]
    Read {
        setting: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting}: {path} holds no PEM certificate: give a file with -----BEGIN CERTIFICATE----- blocks")]
    NoCertificate { setting: String, path: PathBuf },
    #[error(
        "{setting}: {path} is not valid PEM: give a file with -----BEGIN CERTIFICATE----- blocks"
    )]
    Malformed { setting: String, path: PathBuf },
}

/// A certificate file: its PEM text (what tonic and reqwest take) and the
/// certificates in it, at least one.
#[derive(Debug, Clone)]
pub struct PemCertificates {
    pub pem: Vec<u8>,
    pub certs: Vec<CertificateDer<'static>>,
}

/// Reads the certificates of `path`; `setting` names where the path came
/// from, e.g. `tls_ca_file (DROVER_TLS_CA_FILE)`.
pub fn read_certificates(path: &Path, setting: &str) -> Result<PemCertificates, PemFileError> {
    let pem = std::fs::read(path).map_err(|source| PemFileError::Read {
        setting: setting.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PemFileError::Malformed {
            setting: setting.to_string(),
            path: path.to_path_buf(),
        })?;
    if certs.is_empty() {
        return Err(PemFileError::NoCertificate {
            setting: setting.to_string(),
            path: path.to_path_buf(),
        });
    }
    Ok(PemCertificates { pem, certs })
}

/// When TLS is why a connection to `url` failed, what to do about it;
/// `ca_setting` names the client's CA setting. `None`: not a TLS problem
/// this can tell.
pub fn diagnose(err: &(dyn StdError + 'static), url: &str, ca_setting: &str) -> Option<String> {
    let https = url.starts_with("https://");
    for e in causes(err) {
        if let Some(tls) = e.downcast_ref::<TlsError>() {
            return Some(match tls {
                TlsError::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "the coordinator's TLS certificate does not name the host of {url}: connect by a name or address the certificate holds"
                ),
                TlsError::InvalidCertificate(why) => format!(
                    "the coordinator's TLS certificate was not trusted ({why:?}): if a private CA issued it, set {ca_setting} to that CA's PEM file"
                ),
                TlsError::InvalidMessage(_) if https => format!(
                    "{url} did not answer in TLS: if the coordinator serves plain HTTP (no tls_cert_file), use an http:// URL"
                ),
                other => format!("TLS with {url} failed: {other}"),
            });
        }
    }
    // Plain HTTP to a TLS port: the answer is a TLS alert, or the connection
    // is dropped, rather than HTTP.
    let plaintext_to_tls = !https
        && causes(err).any(|e| {
            // Which one depends on timing: the server's close can reach
            // the client while it still writes its request.
            let dropped = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                )
            });
            let text = e.to_string();
            dropped
                || text.contains("invalid HTTP version")
                || text.contains("connection closed")
                || text.contains("connection reset")
                || text.contains("frame with invalid size")
                || text.contains("h2 protocol error")
        });
    plaintext_to_tls.then(|| {
        format!("{url} broke off the connection: if the coordinator serves TLS (tls_cert_file), use an https:// URL")
    })
}

/// `err` and its sources, looking inside `io::Error`s, whose `source()`
/// skips the error they wrap.
fn causes<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    let mut next = Some(err);
    std::iter::from_fn(move || {
        let e = next?;
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
        Some(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Wrapper(#[source] std::io::Error);

    fn wrapped(tls: TlsError) -> Wrapper {
        Wrapper(std::io::Error::new(std::io::ErrorKind::InvalidData, tls))
    }

    #[test]
    fn an_unknown_issuer_names_the_ca_setting() {
        let err = wrapped(TlsError::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let hint = diagnose(&err, "https://c:7070", "tls_ca_file (DROVER_TLS_CA_FILE)").unwrap();
        assert!(hint.contains("not trusted"), "{hint}");
        assert!(hint.contains("DROVER_TLS_CA_FILE"), "{hint}");
    }

    #[test]
    fn a_plaintext_answer_to_https_says_use_http() {
        let err = wrapped(TlsError::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        let hint = diagnose(&err, "https://c:7080", "--ca-file").unwrap();
        assert!(hint.contains("http://"), "{hint}");
    }

    #[test]
    fn other_errors_are_not_tls() {
        let err = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(diagnose(&err, "https://c:7080", "--ca-file").is_none());
        assert!(diagnose(&err, "http://c:7080", "--ca-file").is_none());
    }

    #[test]
    fn a_connection_dropped_mid_request_on_http_says_use_https() {
        // What a TLS port's close looks like when it lands while the
        // client still writes: a broken pipe, not an answer.
        for kind in [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionReset,
        ] {
            let err = Wrapper(std::io::Error::new(kind, "stream closed"));
            let hint = diagnose(&err, "http://c:7070", "--ca-file").unwrap();
            assert!(hint.contains("https://"), "{hint}");
            assert!(diagnose(&err, "https://c:7070", "--ca-file").is_none());
        }
    }

    #[test]
    fn certificate_files_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("drover-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let err = read_certificates(&empty, "tls_ca_file").unwrap_err();
        assert!(matches!(err, PemFileError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("tls_ca_file"), "{err}");
        let missing = read_certificates(&dir.join("missing.pem"), "--ca-file").unwrap_err();
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
