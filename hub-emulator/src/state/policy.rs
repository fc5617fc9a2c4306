//! Hub-level shared access policies (`iothubowner`, `service`, ...) and their
//! permissions. Plain data below the state core, so the core can hold the policy list
//! and the authentication code can check tokens against it.

use serde::{Deserialize, Serialize};

use crate::util::new_key;

/// Shared access policy permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Permission {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

/// A hub-level shared access policy (`iothubowner`, `service`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub permissions: Vec<Permission>,
}

impl Policy {
    fn new(name: &str, permissions: &[Permission]) -> Self {
        Policy {
            name: name.into(),
            primary_key: new_key(),
            secondary_key: new_key(),
            permissions: permissions.to_vec(),
        }
    }

    /// IoT Hub's default policies.
    pub(crate) fn defaults() -> Vec<Policy> {
        use Permission::*;
        vec![
            Policy::new(
                "iothubowner",
                &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
            ),
            Policy::new("service", &[ServiceConnect]),
            Policy::new("device", &[DeviceConnect]),
            Policy::new("registryRead", &[RegistryRead]),
            Policy::new("registryReadWrite", &[RegistryRead, RegistryWrite]),
        ]
    }

    pub(crate) fn allows(&self, p: Permission) -> bool {
        // RegistryReadWrite implies RegistryRead.
        self.permissions.contains(&p)
            || (p == Permission::RegistryRead
                && self.permissions.contains(&Permission::RegistryWrite))
    }
}
