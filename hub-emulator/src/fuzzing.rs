//! The emulator's parsers of untrusted input, reachable for the fuzz targets
//! (`hub-emulator/fuzz`) and `tests/fuzz_smoke.rs`. Not a stable API.

use std::time::SystemTime;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as MqttError;
use rumqttc::mqttbytes::v4::Packet;
use tokio::sync::watch;

pub use crate::messages::PropertyBag;
pub use crate::sas::{SasError, SasToken};

use crate::messages::C2dMessage;
use crate::state::{HubSettings, Shared};

/// Largest MQTT packet a connection reads.
pub const MAX_PACKET: usize = crate::mqtt::MAX_PACKET;

/// Takes the next packet off `buf` exactly as a connection does: `Ok(None)` while
/// incomplete, an error when the connection would be closed.
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
    crate::mqtt::next_packet(buf)
}

/// Percent-encodes a property-bag key or value as IoT Hub does.
pub fn encode_component(s: &str) -> String {
    crate::util::encode_component(s)
}

/// The topic a C2D message is delivered on (its property bag follows
/// `devices/{id}/messages/devicebound/`).
pub fn c2d_topic(device_id: &str, req: crate::C2dRequest) -> String {
    C2dMessage::new(req, SystemTime::now()).topic(device_id)
}

/// Whom a CONNECT claims to be, as the emulator reads client id and username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(String),
    Dps(String),
}

/// CONNECT username classification against fixed hub names and DPS scope.
pub struct Usernames(Shared);

impl Usernames {
    pub fn new(host_aliases: &[&str], scope_id: &str) -> Self {
        let settings = HubSettings {
            hostname: crate::HOSTNAME.into(),
            host_aliases: host_aliases.iter().map(|a| a.to_string()).collect(),
            scope_id: scope_id.into(),
            token_grace: Default::default(),
            persist_path: None,
        };
        Usernames(Shared::new(
            settings,
            Vec::new(),
            Default::default(),
            watch::channel(false).1,
        ))
    }

    /// `None` when the connection would be refused with CONNACK 5 before any SAS check.
    pub fn classify(&self, client_id: &str, username: &str) -> Option<Identity> {
        crate::mqtt::classify(&self.0, client_id, username).map(|t| match t {
            crate::mqtt::Target::Device(d) => Identity::Device(d),
            crate::mqtt::Target::Dps(r) => Identity::Dps(r),
        })
    }
}

/// Runs `text` as `POST /devices/query` would: parsed and, when in the subset, evaluated
/// over a few sample twins; the same text is also tried as a continuation token. `false`
/// when the query is refused.
pub fn twin_query(text: &str) -> bool {
    use serde_json::json;
    let twins = [
        json!({"deviceId": "a", "status": "enabled", "connectionState": "Connected",
               "tags": {"site": "north", "floor": 1, "deep": {"x": [1, {"y": null}]}},
               "properties": {"desired": {"rate": 5, "$version": 2},
                              "reported": {"temp": 20.5, "ok": true, "fw": "1.0", "$version": 3}}}),
        json!({"deviceId": "b", "status": "disabled", "connectionState": "Disconnected",
               "tags": {"site": "south", "floor": "1"},
               "properties": {"desired": {"$version": 1}, "reported": {"temp": -3, "fw": null}}}),
        json!({"deviceId": "c", "properties": {"desired": {}, "reported": {}}}),
    ];
    let _ = crate::query::page(twins.to_vec(), Some(text), 2);
    match crate::query::Query::parse(text) {
        Ok(q) => {
            let _ = q.item_type();
            let _ = q.run(twins);
            true
        }
        Err(_) => false,
    }
}
