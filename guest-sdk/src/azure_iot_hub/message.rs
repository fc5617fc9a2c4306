//! `AzureIoTHub.Message`.

use std::collections::BTreeMap;

/// A device-to-cloud or cloud-to-device message: a body and application properties.
///
/// ```
/// use tether_guest::azure_iot_hub::Message;
/// let m = Message::with_properties("22.5", [("unit", "C")]);
/// assert_eq!(m.body(), b"22.5");
/// assert_eq!(m.properties()["unit"], "C");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    body: Vec<u8>,
    properties: BTreeMap<String, String>,
}

impl Message {
    /// A message with no properties.
    pub fn new(body: impl Into<Vec<u8>>) -> Message {
        Message { body: body.into(), properties: BTreeMap::new() }
    }

    /// A message with properties (system properties such as `$.ct` are allowed).
    pub fn with_properties<K: Into<String>, V: Into<String>>(body: impl Into<Vec<u8>>, properties: impl IntoIterator<Item = (K, V)>) -> Message {
        Message { body: body.into(), properties: properties.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// The properties (imp: `getProperties`). Received messages carry those IoT Hub set.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// Sets a property (the outbox gives messages their id this way).
    pub(crate) fn set_property(&mut self, name: &str, value: String) {
        self.properties.insert(name.to_owned(), value);
    }

    /// The body (imp: `getBody`).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
