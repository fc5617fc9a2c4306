//! IoT Hub's MQTT topics: those the client subscribes to and publishes on, the property
//! bags they carry, and how the topic of an incoming message is read. Pure string work,
//! kept apart so the wire format is in one place and tested on the host.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;

use super::state::Feature;
use crate::azure_iot_hub::shared_access_signature::push_uri_encoded;

const TWIN_RES: &str = "$iothub/twin/res/";
const TWIN_GET: &str = "$iothub/twin/GET/";
const TWIN_REPORTED: &str = "$iothub/twin/PATCH/properties/reported/";
const TWIN_DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";
const METHOD_POST: &str = "$iothub/methods/POST/";
const METHOD_RES: &str = "$iothub/methods/res/";

/// Topics of a feature, in subscription order.
pub(super) fn feature_topics(device_id: &str, feature: Feature) -> Vec<String> {
    match feature {
        Feature::Messages => vec![format!("devices/{device_id}/messages/devicebound/#")],
        Feature::Twin => vec![format!("{TWIN_DESIRED}#"), format!("{TWIN_RES}#")],
        Feature::Methods => vec![format!("{METHOD_POST}#")],
    }
}

/// Topics to subscribe again after a token refresh: those of the `enabled` features, the
/// twin's responses before its desired patches, as the client has always re-subscribed.
pub(super) fn resubscribe_topics(device_id: &str, enabled: impl IntoIterator<Item = Feature>) -> Vec<String> {
    enabled
        .into_iter()
        .flat_map(|feature| {
            let mut topics = feature_topics(device_id, feature);
            if feature == Feature::Twin {
                topics.reverse();
            }
            topics
        })
        .collect()
}

const TELEMETRY: [&str; 2] = ["devices/", "/messages/events/"];

/// A device-to-cloud message with its properties, written into one string: this runs for
/// every message sent.
pub(super) fn telemetry(device_id: &str, properties: &BTreeMap<String, String>) -> String {
    let encoded: usize = properties.iter().map(|(k, v)| 3 * (k.len() + v.len()) + 2).sum();
    let mut topic = String::with_capacity(TELEMETRY[0].len() + device_id.len() + TELEMETRY[1].len() + encoded);
    topic.extend([TELEMETRY[0], device_id, TELEMETRY[1]]);
    push_properties(&mut topic, properties);
    topic
}

/// A device-to-cloud message with its property bag, encoded already.
pub(super) fn telemetry_with_bag(device_id: &str, bag: &str) -> String {
    [TELEMETRY[0], device_id, TELEMETRY[1], bag].concat()
}

/// A message's size as IoT Hub counts it against its limit: body, property names and
/// values.
pub(super) fn message_size(body: &[u8], properties: &BTreeMap<String, String>) -> usize {
    body.len() + properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// A twin retrieve.
pub(super) fn twin_get(rid: &str) -> String {
    format!("{TWIN_GET}?$rid={rid}")
}

/// A reported-properties update.
pub(super) fn twin_reported(rid: u64) -> String {
    format!("{TWIN_REPORTED}?$rid={rid}")
}

/// The reply to direct method call `rid`.
pub(super) fn method_response(status: i32, rid: &str) -> String {
    format!("{METHOD_RES}{status}/?$rid={rid}")
}

/// What an incoming message is, by its topic.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inbound<'a> {
    /// A cloud-to-device message; its property bag, still encoded.
    CloudToDevice(&'a str),
    /// A desired-properties patch.
    Desired,
    /// `$iothub/twin/res/{status}/?$rid={rid}[&$version=N]`.
    TwinResponse { status: i32, rid: String },
    /// `$iothub/methods/POST/{name}/?$rid={rid}`.
    MethodCall { name: &'a str, rid: String },
    /// A twin response or method call topic without its status, name or request id; says
    /// which.
    Malformed(&'static str),
    /// A topic the client never subscribes to.
    Other,
}

/// Reads the topic of a message received by `device_id`.
pub(super) fn inbound<'a>(device_id: &str, topic: &'a str) -> Inbound<'a> {
    let c2d_prefix = format!("devices/{device_id}/messages/devicebound/");
    if let Some(bag) = topic.strip_prefix(&c2d_prefix) {
        Inbound::CloudToDevice(bag)
    } else if topic.starts_with(TWIN_DESIRED) {
        Inbound::Desired
    } else if let Some(rest) = topic.strip_prefix(TWIN_RES) {
        let response = split_rid(rest).and_then(|(status, rid)| Some(Inbound::TwinResponse { status: status.parse().ok()?, rid }));
        response.unwrap_or(Inbound::Malformed("twin response"))
    } else if let Some(rest) = topic.strip_prefix(METHOD_POST) {
        split_rid(rest).map_or(Inbound::Malformed("direct method"), |(name, rid)| Inbound::MethodCall { name, rid })
    } else {
        Inbound::Other
    }
}

/// `{segment}/?$rid={rid}[&...]` into the segment and the decoded request id.
fn split_rid(rest: &str) -> Option<(&str, String)> {
    let (segment, query) = rest.split_once('/')?;
    let rid = decode_properties(query.trim_start_matches('?')).remove("$rid")?;
    Some((segment, rid))
}

/// `k=v&k2=v2`, both sides URI-encoded, as IoT Hub's property bags are.
pub(super) fn encode_properties(props: &BTreeMap<String, String>) -> String {
    let mut bag = String::new();
    push_properties(&mut bag, props);
    bag
}

fn push_properties(out: &mut String, props: &BTreeMap<String, String>) {
    for (i, (k, v)) in props.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        push_uri_encoded(out, k);
        out.push('=');
        push_uri_encoded(out, v);
    }
}

/// Parses a property bag (or a topic's query); undecodable parts are skipped.
pub(super) fn decode_properties(bag: &str) -> BTreeMap<String, String> {
    bag.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode_str(k).decode_utf8().ok()?.into_owned();
            let v = percent_decode_str(v).decode_utf8().ok()?.into_owned();
            Some((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_bags_round_trip() {
        let props: BTreeMap<String, String> = [("$.ct", "application/json"), ("k", "a b&c")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let bag = encode_properties(&props);
        assert_eq!(bag, "%24.ct=application%2Fjson&k=a%20b%26c");
        assert_eq!(decode_properties(&bag), props);
        assert_eq!(decode_properties("%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&k=v")["$.to"], "/devices/dev1/messages/deviceBound");
        assert!(decode_properties("").is_empty());
        assert_eq!(telemetry("dev1", &props), format!("devices/dev1/messages/events/{bag}"));
    }

    #[test]
    fn incoming_topics_are_recognised() {
        assert_eq!(inbound("dev1", "devices/dev1/messages/devicebound/%24.to=x&color=blue"), Inbound::CloudToDevice("%24.to=x&color=blue"));
        assert_eq!(inbound("dev1", "devices/dev2/messages/devicebound/"), Inbound::Other);
        assert_eq!(inbound("dev1", "$iothub/twin/PATCH/properties/desired/?$version=8"), Inbound::Desired);
        assert_eq!(inbound("dev1", "$iothub/twin/res/204/?$rid=3&$version=6"), Inbound::TwinResponse { status: 204, rid: "3".into() });
        assert_eq!(inbound("dev1", "$iothub/twin/res/abc/?$rid=3"), Inbound::Malformed("twin response"));
        assert_eq!(inbound("dev1", "$iothub/twin/res/200"), Inbound::Malformed("twin response"));
        assert_eq!(inbound("dev1", "$iothub/methods/POST/blink/?$rid=a%20b"), Inbound::MethodCall { name: "blink", rid: "a b".into() });
        assert_eq!(inbound("dev1", "$iothub/methods/POST/blink/"), Inbound::Malformed("direct method"));
    }

    #[test]
    fn outgoing_topics() {
        assert_eq!(feature_topics("dev1", Feature::Messages), ["devices/dev1/messages/devicebound/#"]);
        assert_eq!(resubscribe_topics("dev1", [Feature::Twin, Feature::Methods]), ["$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#"]);
        assert_eq!(twin_get("0"), "$iothub/twin/GET/?$rid=0");
        assert_eq!(twin_reported(1), "$iothub/twin/PATCH/properties/reported/?$rid=1");
        assert_eq!(method_response(200, "7"), "$iothub/methods/res/200/?$rid=7");
    }
}
