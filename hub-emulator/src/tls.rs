//! The emulator's TLS identity: a CA and a `localhost` server certificate, generated with
//! rcgen on first start and reused afterwards, so a client trusts the CA file once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, ServerConfig, SignatureScheme};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::HubError;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

/// Certificates loaded from (or freshly written to) the state directory.
pub(crate) struct TlsMaterial {
    pub ca_path: PathBuf,
    pub ca_pem: String,
    pub server_config: Arc<ServerConfig>,
    /// The MQTT listener's config: like `server_config`, but asking for a client
    /// certificate (X.509 devices).
    pub mqtt_config: Arc<ServerConfig>,
}

impl TlsMaterial {
    /// Loads the CA and server certificate from `dir`, generating all four files if any
    /// is missing (a lone CA without its server cert would be useless to reuse).
    pub fn load_or_create(dir: &Path) -> Result<Self, HubError> {
        std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
        let files = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY].map(|f| dir.join(f));
        if !files.iter().all(|f| f.exists()) {
            generate(dir)?;
        }
        let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| HubError::io(p, e));
        let ca_pem = read(&files[0])?;
        let server_pem = read(&files[2])?;
        let server_key = read(&files[3])?;

        let mut chain = CertificateDer::pem_slice_iter(server_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HubError::Tls(format!("{}: {e}", files[2].display())))?;
        chain.extend(
            CertificateDer::pem_slice_iter(ca_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HubError::Tls(format!("{}: {e}", files[0].display())))?,
        );
        let key = PrivateKeyDer::from_pem_slice(server_key.as_bytes())
            .map_err(|e| HubError::Tls(format!("{}: {e}", files[3].display())))?;
        let builder = || {
            ServerConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| HubError::Tls(e.to_string()))
        };
        let mut config = builder()?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| HubError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut mqtt_config = builder()?
            .with_client_cert_verifier(Arc::new(AnyClientCert(crypto_provider())))
            .with_single_cert(chain, key)
            .map_err(|e| HubError::Tls(e.to_string()))?;
        mqtt_config.alpn_protocols = config.alpn_protocols.clone();
        Ok(TlsMaterial {
            ca_path: files[0].clone(),
            ca_pem,
            server_config: Arc::new(config),
            mqtt_config: Arc::new(mqtt_config),
        })
    }
}

/// The provider used for every rustls config in this crate. Chosen explicitly because the
/// workspace may enable both ring and aws-lc-rs, leaving rustls without a default.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The SHA-1 and SHA-256 thumbprints (uppercase hex) of a DER certificate: IoT Hub
/// matches a self-signed device's certificate by either.
pub(crate) fn thumbprints(der: &[u8]) -> [String; 2] {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02X}")).collect::<String>();
    [hex(&Sha1::digest(der)), hex(&Sha256::digest(der))]
}

/// Asks for a client certificate without requiring one or checking its issuer. The
/// handshake still proves the client holds the certificate's key (the signature checks
/// below); whether the certificate opens a device is decided at CONNECT against the
/// registry, since a self-signed device certificate has no issuer to verify here.
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Parses the certificate too: a malformed one fails the handshake here.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn generate(dir: &Path) -> Result<(), HubError> {
    let tls = |e: rcgen::Error| HubError::Tls(e.to_string());
    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Tether Hub Emulator CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate().map_err(tls)?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(tls)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).map_err(tls)?;

    write_file(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    write_file(&dir.join(SERVER_KEY), &server_key.serialize_pem(), true)?;
    write_file(&dir.join(SERVER_CERT), &server_cert.pem(), false)?;
    // The CA certificate last: its presence is what marks the set as complete.
    write_file(&dir.join(CA_CERT), &ca_cert.pem(), false)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), HubError> {
    std::fs::write(path, contents).map_err(|e| HubError::io(path, e))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| HubError::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = std::env::temp_dir().join(format!("tether-hub-tls-{}", crate::util::new_uuid()));
        let first = TlsMaterial::load_or_create(&dir).unwrap();
        let second = TlsMaterial::load_or_create(&dir).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        assert!(first.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
