//! TLS trust for agents' outgoing connections: the public web roots plus the CAs the host
//! operator configured (e.g. the hub emulator's). Agents cannot widen it except per MQTT
//! connection with `ca-pem`, which adds to it for that connection only.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Errors reading CA certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// PEM text without a usable certificate.
    #[error("no valid CA certificate in {0}")]
    NoCertificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The host's trusted roots.
pub(crate) struct TlsTrust {
    roots: RootCertStore,
    base: Arc<ClientConfig>,
}

impl TlsTrust {
    pub fn new(ca_files: &[impl AsRef<Path>]) -> Result<TlsTrust, TlsError> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for path in ca_files {
            let path = path.as_ref();
            let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
            add_pem(&mut roots, &pem, &path.display().to_string())?;
        }
        let base = Arc::new(build(roots.clone())?);
        Ok(TlsTrust { roots, base })
    }

    /// A client configuration trusting the host's roots and, if given, `extra_pem`.
    pub fn client_config(&self, extra_pem: Option<&str>) -> Result<Arc<ClientConfig>, TlsError> {
        match extra_pem {
            None => Ok(self.base.clone()),
            Some(pem) => {
                let mut roots = self.roots.clone();
                add_pem(&mut roots, pem.as_bytes(), "the agent's ca-pem")?;
                Ok(Arc::new(build(roots)?))
            }
        }
    }
}

fn add_pem(roots: &mut RootCertStore, pem: &[u8], origin: &str) -> Result<(), TlsError> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|_| TlsError::NoCertificate(origin.to_owned()))?;
        roots.add(cert).map_err(|_| TlsError::NoCertificate(origin.to_owned()))?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsError::NoCertificate(origin.to_owned()));
    }
    Ok(())
}

fn build(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    // An explicit provider: rustls refuses to guess when more than one is compiled in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The base configuration, for reqwest.
impl TlsTrust {
    pub fn base(&self) -> ClientConfig {
        (*self.base).clone()
    }
}
