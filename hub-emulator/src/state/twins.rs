//! Twin reads and updates that go through the shared state: the device's GET and
//! reported patch over MQTT, and desired-property notifications to a listening
//! session. Above the state core; the twin document rules are in `crate::twin`.

use std::time::SystemTime;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;
use serde_json::Value;

use crate::events::EventKind;
use crate::state::session::SessionCmd;
use crate::state::{Shared, State};
use crate::twin::TwinError;
use crate::util::iso8601;

impl State {
    /// Sends a desired-properties notification if the device listens for them. Called
    /// with the lock held by the update, so notifications go out in version order.
    pub fn notify_desired(&self, device_id: &str, notification: &Value) {
        if let Some(s) = self.sessions.get(device_id).filter(|s| s.subs.desired) {
            let version = notification
                .get("$version")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
            let _ = s.tx.send(SessionCmd::Publish(Publish::new(
                topic,
                QoS::AtMostOnce,
                notification.to_string(),
            )));
        }
    }
}

impl Shared {
    /// Device twin GET over MQTT.
    pub fn twin_device_view(&self, device_id: &str) -> Option<Value> {
        self.lock()
            .p
            .devices
            .get(device_id)
            .map(|d| d.twin.device_view())
    }

    /// Reported-properties patch from a device; returns the new reported version.
    pub fn patch_reported(&self, device_id: &str, patch: &Value) -> Result<u64, TwinError> {
        let now = iso8601(SystemTime::now());
        let version = {
            let mut st = self.lock();
            let device =
                st.p.devices
                    .get_mut(device_id)
                    .ok_or(TwinError::NotAnObject)?;
            device.twin.patch_reported(patch, &now)?
        };
        self.changed();
        let mut recorded = patch.clone();
        if let Some(m) = recorded.as_object_mut() {
            m.insert("$version".into(), version.into());
        }
        self.events.record(
            device_id,
            EventKind::TwinChange {
                section: "reported",
                version,
                patch: recorded,
            },
        );
        Ok(version)
    }
}
