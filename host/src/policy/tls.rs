//! TLS trust for agents' outgoing connections: the public web roots plus the CAs the host
//! operator configured (e.g. the hub emulator's). Agents cannot widen it except per MQTT
//! connection with `ca-pem`, which adds to it for that connection only.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
    /// A client certificate without a certificate, or without a usable key.
    #[error("client certificate: {0}")]
    ClientCertificate(String),
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

    /// A client configuration trusting the host's roots and, if given, `extra_pem`;
    /// presenting `identity` (certificate chain PEM, key PEM) if the server asks.
    pub fn client_config(&self, extra_pem: Option<&str>, identity: Option<(&str, &str)>) -> Result<Arc<ClientConfig>, TlsError> {
        if extra_pem.is_none() && identity.is_none() {
            return Ok(self.base.clone());
        }
        let mut roots = self.roots.clone();
        if let Some(pem) = extra_pem {
            add_pem(&mut roots, pem.as_bytes(), "the agent's ca-pem")?;
        }
        let identity = identity.map(|(cert, key)| client_identity(cert, key)).transpose()?;
        Ok(Arc::new(build_with(roots, identity)?))
    }
}

/// The chain and key of a client certificate, checked to be usable.
fn client_identity(cert_pem: &str, key_pem: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ClientCertificate(format!("cert-pem is not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::ClientCertificate("cert-pem holds no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::ClientCertificate(format!("key-pem holds no usable private key (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    Ok((chain, key))
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
    build_with(roots, None)
}

fn build_with(roots: RootCertStore, identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>) -> Result<ClientConfig, TlsError> {
    // An explicit provider: rustls refuses to guess when more than one is compiled in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        // rustls checks here that the key matches the certificate's public key.
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::ClientCertificate(format!("the key does not fit the certificate: {e}"))),
    }
}

/// The base configuration, for reqwest.
impl TlsTrust {
    pub fn base(&self) -> ClientConfig {
        (*self.base).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_that_cannot_be_used_is_refused_with_its_reason() {
        let trust = TlsTrust::new(&[] as &[&str]).unwrap();
        let refused = |cert: &str, key: &str| match trust.client_config(None, Some((cert, key))) {
            Err(TlsError::ClientCertificate(why)) => why,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert!(refused("", "").contains("no CERTIFICATE block"));
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(refused(cert, "not a key").contains("no usable private key"));
        assert!(trust.client_config(None, None).is_ok());
    }
}
