//! SAS authentication of device connections and service requests against the registry
//! and the hub's policies. An `impl Shared` block above the state core, so the core
//! need not know about tokens.

use crate::sas::{SasError, SasToken};
use crate::state::Shared;
use crate::state::policy::Permission;

/// How a device authenticated its MQTT connection.
pub(crate) struct DeviceAuth {
    pub expiry: u64,
    /// `"device"` for device keys, `"hub"` for a hub policy (stamped on D2C messages).
    pub scope: &'static str,
    pub generation_id: String,
}

impl Shared {
    /// Checks a device's MQTT password: device keys, or a policy with DeviceConnect.
    pub fn authenticate_device(
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
