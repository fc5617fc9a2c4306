//! `AzureIoTHub.Device`.

use serde_json::{Map, Value, json};

/// A device identity as IoT Hub's registry describes it (the Device Info Table).
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    body: Map<String, Value>,
}

impl Device {
    /// A device from `info`, a JSON object (a `serde_json::Map` goes in as
    /// `Value::Object(map)`); without info, or without a `deviceId` in it, the agent's id
    /// is the device id. Without info every documented default is set. Info that is not
    /// an object is logged as an error and taken as none.
    ///
    /// ```no_run
    /// use tether_guest::azure_iot_hub::Device;
    /// let d = Device::new(Some(serde_json::json!({"deviceId": "sensor-1"})));
    /// assert_eq!(d.body()["deviceId"], "sensor-1");
    /// ```
    pub fn new(info: Option<Value>) -> Device {
        let info = match info {
            Some(Value::Object(info)) => Some(info),
            Some(other) => {
                crate::server::error(format!("Device::new: the device info must be a JSON object, not {other}; the defaults are used"));
                None
            }
            None => None,
        };
        let mut body = match info {
            Some(info) => info,
            None => match json!({
                "deviceId": null,
                "generationId": null,
                "etag": null,
                "connectionState": "Disconnected",
                "status": "Enabled",
                "statusReason": null,
                "connectionStateUpdatedTime": null,
                "statusUpdatedTime": null,
                "lastActivityTime": null,
                "cloudToDeviceMessageCount": 0,
                "authentication": {"symmetricKey": {"primaryKey": null, "secondaryKey": null}},
            }) {
                Value::Object(map) => map,
                _ => Map::new(),
            },
        };
        if !body.get("deviceId").is_some_and(Value::is_string) {
            body.insert("deviceId".into(), Value::String(crate::server::agent_id()));
        }
        Device { body }
    }

    /// The device connection string for `hostname` (imp: `connectionString`), from the
    /// device id and primary key. Empty parts if the registry gave no key.
    pub fn connection_string(&self, hostname: &str) -> String {
        let key = self.body.get("authentication").and_then(|a| a.pointer("/symmetricKey/primaryKey")).and_then(Value::as_str).unwrap_or("");
        format!("HostName={hostname};DeviceId={};SharedAccessKey={key}", self.device_id())
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        self.body.get("deviceId").and_then(Value::as_str).unwrap_or("")
    }

    /// The stored device properties (imp: `getBody`).
    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }

    pub(crate) fn from_body(body: Map<String, Value>) -> Device {
        Device { body }
    }
}
