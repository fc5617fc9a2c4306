//! Message property bags in MQTT topics (protocol notes §1.4): parsing what devices send
//! as telemetry, and encoding C2D messages the way IoT Hub delivers them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::util::{encode_component, iso8601, parse_query};

/// D2C messages larger than this (body + property names and values) close the connection.
pub(crate) const MAX_D2C_BYTES: usize = 256 * 1024;
/// C2D body limit (64 KB).
pub(crate) const MAX_C2D_BYTES: usize = 64 * 1024;
/// IoT Hub's per-device C2D queue depth.
pub(crate) const MAX_C2D_QUEUE: usize = 50;
/// C2D default time to live (1 hour) and maximum (2 days).
pub(crate) const C2D_DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub(crate) const C2D_MAX_TTL: Duration = Duration::from_secs(2 * 24 * 3600);
/// Deliveries (PUBLISH without PUBACK) before a message is dead-lettered.
pub(crate) const C2D_MAX_DELIVERY_COUNT: u32 = 10;
/// How long a delivered C2D message waits for its PUBACK before IoT Hub delivers it again.
pub(crate) const C2D_LOCK: Duration = Duration::from_secs(60);

/// Short system-property keys used in topics and their long names.
const SYSTEM_PROPERTIES: [(&str, &str); 8] = [
    ("$.mid", "messageId"),
    ("$.cid", "correlationId"),
    ("$.uid", "userId"),
    ("$.ct", "contentType"),
    ("$.ce", "contentEncoding"),
    ("$.exp", "absoluteExpiryTime"),
    ("$.ctime", "creationTimeUtc"),
    ("$.to", "to"),
];

/// A telemetry property bag split into application and system properties.
#[derive(Debug, Default, PartialEq)]
pub struct PropertyBag {
    pub app: BTreeMap<String, Option<String>>,
    pub system: BTreeMap<String, String>,
}

impl PropertyBag {
    /// Parses `k=v&k2&$.ct=...`; `None` if the encoding is broken (not UTF-8 after decoding).
    pub fn parse(bag: &str) -> Option<Self> {
        let mut out = PropertyBag::default();
        for (k, v) in parse_query(bag)? {
            if let Some(&(_, long)) = SYSTEM_PROPERTIES.iter().find(|(short, _)| *short == k) {
                out.system.insert(long.to_string(), v.unwrap_or_default());
            } else if k.starts_with("$.") {
                out.system.insert(k, v.unwrap_or_default());
            } else {
                out.app.insert(k, v);
            }
        }
        Some(out)
    }

    /// Size as IoT Hub counts it: property names and values (system values only).
    pub fn counted_size(&self) -> usize {
        self.app
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
            .sum::<usize>()
            + self.system.values().map(String::len).sum::<usize>()
    }
}

/// A cloud-to-device message to enqueue (control API or in-process).
#[derive(Debug, Clone, Default)]
pub struct C2dRequest {
    pub body: Vec<u8>,
    /// Generated (UUID) when absent.
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// `none` (default), `positive`, `negative` or `full`.
    pub ack: Option<String>,
    /// Time to live; default 1 hour, at most 2 days.
    pub ttl: Option<Duration>,
    /// Application properties; `None` is a property without value.
    pub properties: BTreeMap<String, Option<String>>,
}

/// A queued C2D message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct C2dMessage {
    pub message_id: String,
    pub body: Vec<u8>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: String,
    pub properties: BTreeMap<String, Option<String>>,
    pub expiry_unix_ms: u64,
    pub delivery_count: u32,
    /// Packet id of the unacknowledged PUBLISH carrying it, while delivered.
    #[serde(skip)]
    pub in_flight: Option<u16>,
    /// When the delivery's lock expires and the message is delivered again.
    #[serde(skip)]
    pub locked_until: Option<SystemTime>,
}

impl C2dMessage {
    pub fn new(req: C2dRequest, now: SystemTime) -> Self {
        let ttl = req.ttl.unwrap_or(C2D_DEFAULT_TTL).min(C2D_MAX_TTL);
        C2dMessage {
            message_id: req.message_id.unwrap_or_else(crate::util::new_uuid),
            body: req.body,
            correlation_id: req.correlation_id,
            content_type: req.content_type,
            content_encoding: req.content_encoding,
            ack: req.ack.unwrap_or_else(|| "none".into()),
            properties: req.properties,
            expiry_unix_ms: (now + ttl)
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            delivery_count: 0,
            in_flight: None,
            locked_until: None,
        }
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            >= self.expiry_unix_ms
    }

    /// `devices/{id}/messages/devicebound/%24.mid=..&%24.to=..&...&iothub-ack=..&app=..`
    pub fn topic(&self, device_id: &str) -> String {
        let mut pairs: Vec<(String, Option<String>)> =
            vec![("$.mid".into(), Some(self.message_id.clone()))];
        pairs.push((
            "$.to".into(),
            Some(format!("/devices/{device_id}/messages/devicebound")),
        ));
        let optional = [
            ("$.cid", &self.correlation_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
        ];
        pairs.extend(
            optional
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Some(v.clone())))),
        );
        pairs.push((
            "$.exp".into(),
            Some(iso8601(
                UNIX_EPOCH + Duration::from_millis(self.expiry_unix_ms),
            )),
        ));
        pairs.push(("iothub-ack".into(), Some(self.ack.clone())));
        pairs.extend(self.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        let bag: Vec<String> = pairs
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{}={}", encode_component(k), encode_component(v)),
                None => encode_component(k),
            })
            .collect();
        format!("devices/{device_id}/messages/devicebound/{}", bag.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_python_sdk_bag() {
        let bag = PropertyBag::parse(
            "%24.mid=abc&%24.ct=application%2Fjson&%24.ce=utf-8&color=red&empty=&nul",
        )
        .unwrap();
        assert_eq!(bag.system["messageId"], "abc");
        assert_eq!(bag.system["contentType"], "application/json");
        assert_eq!(bag.app["color"], Some("red".into()));
        assert_eq!(bag.app["empty"], Some(String::new()));
        assert_eq!(bag.app["nul"], None);
        assert!(PropertyBag::parse("a=%C3%28").is_none());
    }

    #[test]
    fn garbage_property_bags_never_panic() {
        for input in crate::util::garbage(7, 20_000, 40, b"%$.=&ab2F\xc3\x28 ") {
            if let Ok(s) = std::str::from_utf8(&input) {
                let _ = PropertyBag::parse(s);
            }
        }
    }

    #[test]
    fn c2d_topic_encodes_like_iot_hub() {
        let mut req = C2dRequest {
            body: b"hi".to_vec(),
            message_id: Some("m1".into()),
            ..Default::default()
        };
        req.properties.insert("a b".into(), Some("x/y".into()));
        req.properties.insert("flag".into(), None);
        let m = C2dMessage::new(req, UNIX_EPOCH);
        assert_eq!(
            m.topic("d1"),
            "devices/d1/messages/devicebound/%24.mid=m1&%24.to=%2Fdevices%2Fd1%2Fmessages%2Fdevicebound&%24.exp=1970-01-01T01%3A00%3A00.0000000Z&iothub-ack=none&a%20b=x%2Fy&flag"
        );
    }
}
