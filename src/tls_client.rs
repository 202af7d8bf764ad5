//! rustls client configurations for the connections gitplane makes over TLS (PostgreSQL with
//! `sslmode=require`, `gitplane ssh-proxy wss://`): the roots of one PEM file when one is named,
//! else the system's.

use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Certificate { path: String, why: String },
    #[error("no trusted root certificates")]
    NoRoots,
    #[error("{0}")]
    Rustls(String),
}

/// Trusts the certificates in `ca_file` (PEM), or the system's roots when it is None.
pub fn trusting(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| TlsConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let bad = |why: String| TlsConfigError::Certificate {
                    path: shown.clone(),
                    why,
                };
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoRoots);
    }
    with_roots(roots)
}

/// A configuration over exactly these roots (empty for a connection that never starts TLS).
pub fn with_roots(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
