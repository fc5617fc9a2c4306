//! Authentication of device connections (SAS or X.509 thumbprint) and service requests
//! against the registry and the hub's policies. An `impl Shared` block above the state
//! core, so the core need not know about tokens.

use crate::sas::{SasError, SasToken};
use crate::state::Shared;
use crate::state::policy::Permission;
use crate::x509::{ChainError, verify_device_chain};

/// `DeviceAuth::expiry` of a certificate connection: it has no token to expire.
pub(crate) const NO_TOKEN_EXPIRY: u64 = u64::MAX;

/// How a device authenticated its MQTT connection.
pub(crate) struct DeviceAuth {
    /// When the SAS token expires; [`NO_TOKEN_EXPIRY`] for a certificate.
    pub expiry: u64,
    /// `"device"` for device keys, `"hub"` for a hub policy (stamped on D2C messages).
    pub scope: &'static str,
    /// `"sas"` or `"x509Certificate"`, and who issued the credential, as IoT Hub stamps
    /// them in `iothub-connection-auth-method`.
    pub kind: &'static str,
    pub issuer: &'static str,
    pub generation_id: String,
}

/// Why a device connection was refused. Every variant maps to CONNACK 5.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeviceAuthError {
    #[error(transparent)]
    Sas(#[from] SasError),
    #[error("X.509 device presented no client certificate (certificates are read on the MQTT/TLS port only, not over WebSocket)")]
    NoCertificate,
    #[error("client certificate matches neither registered thumbprint")]
    ThumbprintMismatch,
    #[error("certificateAuthority device, but no CA is registered (POST /emulator/cas)")]
    NoCaRegistered,
    #[error(transparent)]
    Chain(#[from] ChainError),
}

impl Shared {
    /// Checks a device's credentials by its registry type: the TLS client certificate
    /// chain (`client_chain`, DER, leaf first) of an X.509 device, else the MQTT password
    /// (device keys, or a policy with DeviceConnect). A SAS device's certificate is
    /// ignored, as on Azure.
    pub fn authenticate_device(
        &self,
        device_id: &str,
        password: &str,
        client_chain: &[Vec<u8>],
    ) -> Result<DeviceAuth, DeviceAuthError> {
        {
            let st = self.lock();
            let device =
                st.p.devices
                    .get(device_id)
                    .filter(|d| d.enabled)
                    .ok_or(SasError::UnknownDevice)?;
            match device.auth_type.as_str() {
                "selfSigned" => {
                    let cert = client_chain.first().ok_or(DeviceAuthError::NoCertificate)?;
                    let registered = [&device.primary_thumbprint, &device.secondary_thumbprint];
                    let matched = crate::tls::thumbprints(cert).iter().any(|t| {
                        registered
                            .iter()
                            .filter_map(|r| r.as_deref())
                            .any(|r| r.eq_ignore_ascii_case(t))
                    });
                    if !matched {
                        return Err(DeviceAuthError::ThumbprintMismatch);
                    }
                    return Ok(DeviceAuth {
                        expiry: NO_TOKEN_EXPIRY,
                        scope: "device",
                        kind: "x509Certificate",
                        issuer: "external",
                        generation_id: device.generation_id.clone(),
                    });
                }
                "certificateAuthority" => {
                    if st.p.cas.is_empty() {
                        return Err(DeviceAuthError::NoCaRegistered);
                    }
                    if client_chain.is_empty() {
                        return Err(DeviceAuthError::NoCertificate);
                    }
                    verify_device_chain(
                        device_id,
                        client_chain,
                        st.p.cas.values(),
                        self.now_secs(),
                    )?;
                    return Ok(DeviceAuth {
                        expiry: NO_TOKEN_EXPIRY,
                        scope: "device",
                        kind: "x509Certificate",
                        issuer: "external",
                        generation_id: device.generation_id.clone(),
                    });
                }
                _ => {}
            }
        }
        Ok(self.authenticate_device_sas(device_id, password)?)
    }

    fn authenticate_device_sas(
        &self,
        device_id: &str,
        password: &str,
    ) -> Result<DeviceAuth, SasError> {
        let token = SasToken::parse(password)?;
        if !token.covers(&self.host_aliases, &["devices", device_id]) {
            return Err(SasError::WrongResource);
        }
        let st = self.lock();
        let device =
            st.p.devices
                .get(device_id)
                .filter(|d| d.enabled)
                .ok_or(SasError::UnknownDevice)?;
        let now = self.now_secs();
        let scope = match &token.key_name {
            None => {
                token.verify(&device.keys(), now)?;
                "device"
            }
            Some(name) => {
                let policy = st.policy(name).ok_or(SasError::UnknownKeyName)?;
                if !policy.allows(Permission::DeviceConnect) {
                    return Err(SasError::Forbidden);
                }
                token.verify(&[&policy.primary_key, &policy.secondary_key], now)?;
                "hub"
            }
        };
        if token.expiry <= device.token_floor {
            return Err(SasError::Expired);
        }
        Ok(DeviceAuth {
            expiry: token.expiry,
            scope,
            kind: "sas",
            issuer: "iothub",
            generation_id: device.generation_id.clone(),
        })
    }

    /// Checks a service `Authorization` header for any of `permissions` on `path`.
    pub fn authenticate_service(
        &self,
        header: &str,
        path: &[&str],
        permissions: &[Permission],
    ) -> Result<(), SasError> {
        let token = SasToken::parse(header)?;
        if !token.covers(&self.host_aliases, path) {
            return Err(SasError::WrongResource);
        }
        let st = self.lock();
        let policy = token
            .key_name
            .as_deref()
            .and_then(|n| st.policy(n))
            .ok_or(SasError::UnknownKeyName)?;
        token.verify(
            &[&policy.primary_key, &policy.secondary_key],
            self.now_secs(),
        )?;
        if !permissions.iter().any(|p| policy.allows(*p)) {
            return Err(SasError::Forbidden);
        }
        Ok(())
    }
}
