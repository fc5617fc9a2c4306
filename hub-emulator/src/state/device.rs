//! A device identity as the registry keeps it, with its twin and C2D queue, and the
//! registry's JSON views of it. Plain data below the state core, which holds the
//! registry; also home of the device id rule the control API and REST API share.

use std::collections::VecDeque;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::messages::C2dMessage;
use crate::state::session::Subs;
use crate::twin::Twin;
use crate::util::{NULL_DATE, iso8601, new_key};

/// Device ids: ≤128 ASCII alphanumerics and `- . + % _ # * ? ! ( ) , = @ $ ' : ;`.
pub(crate) fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+%_#*?!(),=@$':;".contains(c))
}

/// A device identity with its twin and C2D queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Device {
    pub id: String,
    pub generation_id: String,
    pub etag: u64,
    pub enabled: bool,
    pub status_reason: Option<String>,
    pub status_updated: String,
    pub auth_type: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    /// X.509 thumbprints (hex SHA-1 or SHA-256) of a `selfSigned` device.
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: bool,
    pub connection_state_updated: String,
    pub last_activity: String,
    pub twin: Twin,
    pub c2d: VecDeque<C2dMessage>,
    /// Subscriptions kept by a CleanSession=0 session between connections.
    pub persistent_subs: Option<Subs>,
    /// Tokens with `se` at or below this are refused (control API "expire token").
    pub token_floor: u64,
}

impl Device {
    pub fn new(
        id: &str,
        etag: u64,
        primary_key: Option<String>,
        secondary_key: Option<String>,
    ) -> Self {
        let now = iso8601(SystemTime::now());
        let ticks = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() / 100)
            + 621_355_968_000_000_000;
        Device {
            id: id.into(),
            generation_id: ticks.to_string(),
            etag,
            enabled: true,
            status_reason: None,
            status_updated: NULL_DATE.into(),
            auth_type: "sas".into(),
            primary_key: Some(primary_key.unwrap_or_else(new_key)),
            secondary_key: Some(secondary_key.unwrap_or_else(new_key)),
            primary_thumbprint: None,
            secondary_thumbprint: None,
            iot_edge: false,
            connection_state_updated: NULL_DATE.into(),
            last_activity: NULL_DATE.into(),
            twin: Twin::new(&now),
            c2d: VecDeque::new(),
            persistent_subs: None,
            token_floor: 0,
        }
    }

    /// Device etags are base64 of a decimal string (`ODgxNTgwOA==` = "8815808").
    pub fn etag(&self) -> String {
        crate::util::b64(self.etag.to_string().as_bytes())
    }

    pub fn keys(&self) -> Vec<&str> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    fn thumbprints_json(&self) -> Value {
        json!({
            "primaryThumbprint": self.primary_thumbprint,
            "secondaryThumbprint": self.secondary_thumbprint,
        })
    }

    /// The registry JSON (swagger `Device`).
    pub fn identity_json(&self, connected: bool) -> Value {
        json!({
            "deviceId": self.id,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": if connected { "Connected" } else { "Disconnected" },
            "status": if self.enabled { "enabled" } else { "disabled" },
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.connection_state_updated,
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": self.last_activity,
            "cloudToDeviceMessageCount": self.c2d.len(),
            "authentication": {
                "symmetricKey": { "primaryKey": self.primary_key, "secondaryKey": self.secondary_key },
                "x509Thumbprint": self.thumbprints_json(),
                "type": self.auth_type,
            },
            "capabilities": { "iotEdge": self.iot_edge },
        })
    }

    /// The service-side twin JSON.
    pub fn twin_json(&self, connected: bool) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("deviceId".into(), self.id.clone().into());
        m.insert("etag".into(), self.twin.etag().into());
        m.insert("deviceEtag".into(), self.etag().into());
        m.insert(
            "status".into(),
            (if self.enabled { "enabled" } else { "disabled" }).into(),
        );
        m.insert(
            "statusUpdateTime".into(),
            self.status_updated.clone().into(),
        );
        m.insert(
            "connectionState".into(),
            (if connected {
                "Connected"
            } else {
                "Disconnected"
            })
            .into(),
        );
        m.insert("lastActivityTime".into(), self.last_activity.clone().into());
        m.insert("cloudToDeviceMessageCount".into(), self.c2d.len().into());
        m.insert("authenticationType".into(), self.auth_type.clone().into());
        m.insert("x509Thumbprint".into(), self.thumbprints_json());
        m.insert("modelId".into(), "".into());
        m.extend(self.twin.service_members());
        m.insert("capabilities".into(), json!({ "iotEdge": self.iot_edge }));
        Value::Object(m)
    }
}
