//! CA-signed X.509 devices: the CAs registered through the control API, and the check
//! IoT Hub makes at connect (the chain leads to a verified CA, the leaf's CN is the
//! device id).

use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A CA certificate registered as verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RegisteredCa {
    /// The certificate as registered (PEM).
    pub pem: String,
    pub subject: String,
}

/// Why a CA certificate was not registered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    #[error("expected exactly one PEM certificate")]
    NotOnePem,
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
    #[error("not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotCa,
}

/// Why a CA-signed device's certificate chain was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("no client certificate presented")]
    NoCertificate,
    #[error("the certificate does not chain to a registered CA: {0}")]
    Untrusted(webpki::Error),
    #[error("the certificate's CN {0:?} is not the device id")]
    WrongCommonName(Option<String>),
}

impl RegisteredCa {
    /// Reads one CA certificate from PEM; returns it with its SHA-256 thumbprint.
    pub fn parse(pem: &str) -> Result<(String, RegisteredCa), CaError> {
        let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
        let der = match (certs.next(), certs.next()) {
            (Some(Ok(der)), None) => der,
            _ => return Err(CaError::NotOnePem),
        };
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| CaError::Unreadable(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::NotCa);
        }
        // webpki must accept it as a trust anchor too, or no chain could ever use it.
        webpki::anchor_from_trusted_cert(&der).map_err(|e| CaError::Unreadable(e.to_string()))?;
        let [_, sha256] = crate::tls::thumbprints(&der);
        Ok((
            sha256,
            RegisteredCa {
                pem: pem.to_string(),
                subject: cert.subject().to_string(),
            },
        ))
    }
}

/// Checks a CA-signed device's chain (leaf first, as the client sent it): it must lead
/// to one of `cas` and be valid at `now` (Unix seconds, the hub's clock), with the
/// leaf's CN equal to `device_id`.
pub(crate) fn verify_device_chain<'a>(
    device_id: &str,
    chain: &[Vec<u8>],
    cas: impl Iterator<Item = &'a RegisteredCa>,
    now: u64,
) -> Result<(), ChainError> {
    let (leaf, intermediates) = chain.split_first().ok_or(ChainError::NoCertificate)?;
    let ca_ders: Vec<CertificateDer<'static>> = cas
        .filter_map(|ca| CertificateDer::from_pem_slice(ca.pem.as_bytes()).ok())
        .collect();
    let anchors: Vec<_> = ca_ders
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let provider = crate::tls::crypto_provider();
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der).map_err(ChainError::Untrusted)?;
    end_entity
        .verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            &intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(ChainError::Untrusted)?;
    let cn = X509Certificate::from_der(leaf).ok().and_then(|(_, cert)| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    });
    if cn.as_deref() != Some(device_id) {
        return Err(ChainError::WrongCommonName(cn));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_several_certificates_are_refused() {
        assert!(matches!(RegisteredCa::parse(""), Err(CaError::NotOnePem)));
        assert!(matches!(
            RegisteredCa::parse("junk"),
            Err(CaError::NotOnePem)
        ));
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            RegisteredCa::parse(broken),
            Err(CaError::Unreadable(_))
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        assert!(RegisteredCa::parse(&pem).is_ok());
        let two = format!("{pem}{pem}");
        assert!(matches!(RegisteredCa::parse(&two), Err(CaError::NotOnePem)));
    }

    #[test]
    fn an_empty_chain_is_no_certificate() {
        let r = verify_device_chain("d", &[], std::iter::empty(), 0);
        assert!(matches!(r, Err(ChainError::NoCertificate)));
    }
}
