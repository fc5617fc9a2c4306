//! Bounded, stable-Rust stand-in for the cargo-fuzz targets in `fuzz/`: a seeded PRNG feeds
//! a few hundred thousand random and mutated inputs to the emulator's parsers of untrusted
//! input (MQTT packet decoding, property bags, CONNECT usernames, SAS tokens, twin
//! queries). Nothing may
//! panic, and valid inputs must still parse, round-tripping where that is meaningful.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, LastWill, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter, Unsubscribe,
};
use tether_hub_emulator::C2dRequest;
use tether_hub_emulator::fuzzing::{
    Identity, PropertyBag, SasToken, Usernames, c2d_topic, encode_component, next_packet,
    twin_query,
};
use tether_hub_emulator::generate_sas_token;

const HOSTS: [&str; 4] = [
    "localhost",
    "127.0.0.1",
    "tether-hub",
    "tether-hub.azure-devices.net",
];
const SCOPE: &str = "0ne00ABC123";
const KEY: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
/// Far in the future, so generated tokens verify.
const EXPIRY: u64 = 4_000_000_000;

/// Deterministic xorshift64* PRNG: reproducible "random" tests without dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Up to `max` characters drawn from `chars`.
    fn string(&mut self, chars: &[char], max: usize) -> String {
        let n = self.below(max + 1);
        (0..n).map(|_| *self.pick(chars)).collect()
    }
    /// A few byte-level mutations: bit flips, deletions, insertions, splices.
    fn mutate(&mut self, mut v: Vec<u8>, corpus: &[Vec<u8>]) -> Vec<u8> {
        for _ in 0..1 + self.below(4) {
            match self.below(5) {
                0 if !v.is_empty() => {
                    let j = self.below(v.len());
                    v[j] ^= 1 << self.below(8);
                }
                1 if !v.is_empty() => {
                    let j = self.below(v.len());
                    v.remove(j);
                }
                2 => {
                    let j = self.below(v.len() + 1);
                    v.insert(j, self.next() as u8);
                }
                3 if !v.is_empty() => {
                    let j = self.below(v.len());
                    v[j] = *self.pick(b"%&=/?$.:\x00\xff\x7f\x80");
                }
                _ => {
                    let j = self.below(corpus.len());
                    v.extend_from_slice(&corpus[j]);
                }
            }
        }
        v
    }
}

/// Characters that matter to the parsers, plus multi-byte UTF-8.
const CHARS: &[char] = &[
    'a', 'Z', '0', '9', '-', '.', '_', '~', ':', '/', '?', '&', '=', '%', '$', '#', '+', ' ', 'é',
    '€', '😀', '\u{0}',
];
const ID_CHARS: &[char] = &['a', 'z', 'A', '0', '7', '-', '.', '_', ':'];

fn encode(p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).expect("encode");
    out.to_vec()
}

fn device_connect(id: &str, host: &str, will: bool) -> Packet {
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.clean_session = false;
    let token =
        generate_sas_token(&format!("{host}/devices/{id}"), KEY, None, EXPIRY).expect("token");
    c.login = Some(Login::new(
        format!("{host}/{id}/?api-version=2021-04-12&DeviceClientType=py%2F2.14.0"),
        token,
    ));
    if will {
        c.last_will = Some(LastWill::new(
            format!("devices/{id}/messages/events/gone=1"),
            "bye",
            QoS::AtLeastOnce,
            false,
        ));
    }
    Packet::Connect(c)
}

/// Valid packets of every kind a device or DPS client sends.
fn packets() -> Vec<Packet> {
    let mut dps = Connect::new("reg-1");
    let token = generate_sas_token(
        &format!("{SCOPE}/registrations/reg-1"),
        KEY,
        Some("registration"),
        EXPIRY,
    )
    .expect("token");
    dps.login = Some(Login::new(
        format!("{SCOPE}/registrations/reg-1/api-version=2019-03-31"),
        token,
    ));
    let publish = |topic: &str, qos, payload: &[u8], pkid| {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        Packet::Publish(p)
    };
    let mut subscribe = Subscribe::new("$iothub/twin/res/#", QoS::AtMostOnce);
    subscribe.pkid = 2;
    subscribe.filters.push(SubscribeFilter::new(
        "devices/d1/messages/devicebound/#".into(),
        QoS::AtLeastOnce,
    ));
    let mut unsubscribe = Unsubscribe::new("$iothub/methods/POST/#");
    unsubscribe.pkid = 3;
    vec![
        device_connect("d1", "localhost", false),
        device_connect("dev-2.a_b:c", "tether-hub.azure-devices.net:8883", true),
        Packet::Connect(dps),
        publish(
            "devices/d1/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&color=red&flag",
            QoS::AtLeastOnce,
            b"{\"t\":21.5}",
            7,
        ),
        publish("devices/d1/messages/events/", QoS::AtMostOnce, b"x", 0),
        publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, b"", 0),
        publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            QoS::AtLeastOnce,
            b"{\"fw\":\"1.0\"}",
            9,
        ),
        publish("$iothub/methods/res/200/?$rid=3", QoS::AtMostOnce, b"{}", 0),
        publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=4",
            QoS::AtLeastOnce,
            b"{\"registrationId\":\"reg-1\"}",
            1,
        ),
        Packet::Subscribe(subscribe),
        Packet::Unsubscribe(unsubscribe),
        Packet::PubAck(PubAck::new(5)),
        Packet::PingReq,
        Packet::Disconnect,
    ]
}

/// Runs a decoded packet's strings through the parsers the emulator applies to them.
fn exercise(packet: &Packet, usernames: &Usernames) {
    match packet {
        Packet::Connect(c) => {
            let (user, pass) = c
                .login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_str()))
                .unwrap_or_default();
            let _ = usernames.classify(&c.client_id, user);
            let _ = check_token(pass);
            if let Some(w) = &c.last_will {
                exercise_topic(&w.topic);
            }
        }
        Packet::Publish(p) => exercise_topic(&p.topic),
        _ => {}
    }
}

fn exercise_topic(topic: &str) {
    let bag = match topic.split_once("/messages/events/") {
        Some((_, bag)) => bag,
        None => topic.split_once('?').map_or("", |(_, q)| q),
    };
    if let Some(b) = PropertyBag::parse(bag) {
        let _ = b.counted_size();
    }
}

/// Parses and checks a token; true if it parsed.
fn check_token(token: &str) -> bool {
    let Ok(t) = SasToken::parse(token) else {
        return false;
    };
    let _ = t.verify(&[KEY, "not base64", ""], 1);
    let hosts: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    let _ = t.covers(&hosts, &["devices", "d1"]);
    let _ = t.covers_hostless(&[SCOPE, "registrations", "reg-1"]);
    true
}

/// Feeds `input` in random chunks, decoding as a connection does. Returns the packets
/// decoded before the stream ended or broke.
fn decode_stream(input: &[u8], rng: &mut Rng, usernames: &Usernames) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            let before = buf.len();
            match next_packet(&mut buf) {
                Ok(Some(p)) => {
                    assert!(buf.len() < before, "a packet must consume bytes");
                    exercise(&p, usernames);
                    out.push(p);
                }
                Ok(None) => {
                    // An incomplete packet stays buffered for the next read.
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => return out,
            }
        }
    }
    out
}

#[test]
fn valid_packets_round_trip_in_any_chunking() {
    let usernames = Usernames::new(&HOSTS, SCOPE);
    let packets = packets();
    let mut stream = Vec::new();
    for p in &packets {
        let bytes = encode(p);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(next_packet(&mut buf).expect("valid").as_ref(), Some(p));
        assert!(buf.is_empty());
        stream.extend(bytes);
    }
    let mut rng = Rng::new(1);
    for _ in 0..2_000 {
        assert_eq!(decode_stream(&stream, &mut rng, &usernames), packets);
    }
}

#[test]
fn random_and_mutated_packet_streams_never_panic() {
    let usernames = Usernames::new(&HOSTS, SCOPE);
    let corpus: Vec<Vec<u8>> = packets().iter().map(encode).collect();
    let mut rng = Rng::new(0x4D51_5454);
    let mut decoded = 0;
    for i in 0..300_000 {
        let input = match i % 4 {
            0 => rng.bytes_below(200),
            // A valid fixed header of a random type with a random body.
            1 => {
                let mut v = vec![rng.next() as u8, 0];
                v.extend(rng.bytes_below(120));
                v[1] = (v.len() - 2) as u8;
                v
            }
            _ => {
                let seed = rng.pick(&corpus).clone();
                rng.mutate(seed, &corpus)
            }
        };
        decoded += decode_stream(&input, &mut rng, &usernames).len();
    }
    // Mutations keep most streams decodable far enough to reach the parsers behind.
    assert!(decoded > 100_000, "only {decoded} packets decoded");
}

#[test]
fn property_bags_round_trip_and_garbage_never_panics() {
    let mut rng = Rng::new(0xBA6);
    let valid = [
        "%24.mid=abc&%24.ct=application%2Fjson&%24.ce=utf-8&color=red&empty=&nul",
        "%24.cid=c1&%24.uid=u&%24.exp=2030-01-01T00%3A00%3A00Z&%24.to=%2Fdevices%2Fd&%24.x=1",
        "AzIoTHub_FaultOperationType=KillTcp&AzIoTHub_FaultOperationDelayInSecs=1",
        "a%20b=x%2Fy&%C3%A9=%E2%82%AC",
    ];
    let corpus: Vec<Vec<u8>> = valid.iter().map(|s| s.as_bytes().to_vec()).collect();
    for v in valid {
        assert!(PropertyBag::parse(v).is_some(), "{v}");
    }
    for i in 0..200_000 {
        // Application properties, encoded as devices do, parse back unchanged.
        if i % 4 == 0 {
            let mut props = BTreeMap::new();
            for _ in 0..rng.below(5) {
                let key = format!("k{}", rng.string(CHARS, 8));
                let value = (rng.below(4) != 0).then(|| rng.string(CHARS, 12));
                props.insert(key, value);
            }
            let bag: Vec<String> = props
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{}={}", encode_component(k), encode_component(v)),
                    None => encode_component(k),
                })
                .collect();
            let parsed = PropertyBag::parse(&bag.join("&")).expect("valid bag");
            assert_eq!(parsed.app, props);
            assert!(parsed.system.is_empty());
            continue;
        }
        let input = if i % 4 == 1 {
            rng.bytes_below(80)
        } else {
            let seed = rng.pick(&corpus).clone();
            rng.mutate(seed, &corpus)
        };
        if let Some(bag) = std::str::from_utf8(&input)
            .ok()
            .and_then(PropertyBag::parse)
        {
            let _ = bag.counted_size();
        }
    }
}

#[test]
fn c2d_topics_parse_back_as_property_bags() {
    let mut rng = Rng::new(0xC2D);
    for _ in 0..20_000 {
        let mut properties = BTreeMap::new();
        for _ in 0..rng.below(4) {
            let key = format!("p{}", rng.string(CHARS, 6));
            let value = (rng.below(3) != 0).then(|| rng.string(CHARS, 10));
            properties.insert(key, value);
        }
        let message_id = rng.string(CHARS, 10);
        let correlation_id = (rng.below(2) == 0).then(|| rng.string(CHARS, 10));
        let device_id = format!("d{}", rng.string(ID_CHARS, 10));
        let topic = c2d_topic(
            &device_id,
            C2dRequest {
                message_id: Some(message_id.clone()),
                correlation_id: correlation_id.clone(),
                ack: Some("full".into()),
                properties: properties.clone(),
                ..Default::default()
            },
        );
        let bag = topic
            .strip_prefix(&format!("devices/{device_id}/messages/devicebound/"))
            .expect("prefix");
        let parsed = PropertyBag::parse(bag).expect("valid bag");
        assert_eq!(parsed.system["messageId"], message_id);
        assert_eq!(parsed.system.get("correlationId"), correlation_id.as_ref());
        assert_eq!(
            parsed.system["to"],
            format!("/devices/{device_id}/messages/devicebound")
        );
        let mut expected = properties;
        expected.insert("iothub-ack".into(), Some("full".into()));
        assert_eq!(parsed.app, expected);
    }
}

#[test]
fn usernames_classify_and_garbage_never_panics() {
    let usernames = Usernames::new(&HOSTS, SCOPE);
    let mut rng = Rng::new(0x05E7);
    let mut corpus = Vec::new();
    for _ in 0..5_000 {
        let id = format!("{}a", rng.string(ID_CHARS, 12));
        let host = rng.pick(&HOSTS).to_string();
        let host = if rng.below(2) == 0 {
            host
        } else {
            format!("{host}:8883")
        };
        let tail = *rng.pick(&["", "/", "/?api-version=2021-04-12", "/?a=%2F&b"]);
        let user = format!("{host}/{id}{tail}");
        assert_eq!(
            usernames.classify(&id, &user),
            Some(Identity::Device(id.clone())),
            "{user}"
        );
        let dps = format!("{SCOPE}/registrations/{id}/api-version=2019-03-31");
        assert_eq!(usernames.classify(&id, &dps), Some(Identity::Dps(id)));
        corpus.push(user.into_bytes());
        corpus.push(dps.into_bytes());
    }
    for i in 0..200_000 {
        let input = if i % 3 == 0 {
            rng.bytes_below(60)
        } else {
            let seed = rng.pick(&corpus).clone();
            rng.mutate(seed, &corpus)
        };
        let user = String::from_utf8_lossy(&input);
        let client_id = user.split('/').nth(1 + rng.below(2)).unwrap_or("");
        let _ = usernames.classify(client_id, &user);
    }
}

#[test]
fn sas_tokens_round_trip_and_garbage_never_panics() {
    let mut rng = Rng::new(0x5A5);
    let hosts: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    let mut corpus = Vec::new();
    let mut parsed = 0;
    for _ in 0..3_000 {
        let key: [u8; 32] = std::array::from_fn(|_| rng.next() as u8);
        let key = B64.encode(key);
        let id = format!("{}a", rng.string(ID_CHARS, 12));
        let host = rng.pick(&HOSTS);
        let skn = (rng.below(3) == 0).then(|| rng.string(CHARS, 8));
        let expiry = 1 + rng.next() % EXPIRY;
        let token = generate_sas_token(
            &format!("{host}/devices/{id}"),
            &key,
            skn.as_deref(),
            expiry,
        )
        .expect("token");
        let t = SasToken::parse(&token).expect("valid token");
        assert_eq!(t.expiry, expiry);
        assert_eq!(t.key_name, skn);
        assert!(t.verify(&[&key], expiry - 1).is_ok());
        assert!(t.verify(&[KEY], 0).is_err());
        assert!(t.covers(&hosts, &["devices", &id]));
        assert!(!t.covers(&hosts, &["devices", &format!("{id}x")]));
        corpus.push(token.into_bytes());
    }
    for i in 0..200_000 {
        let input = if i % 3 == 0 {
            let mut v = b"SharedAccessSignature ".to_vec();
            v.extend(rng.bytes_below(80));
            v
        } else {
            let seed = rng.pick(&corpus).clone();
            rng.mutate(seed, &corpus)
        };
        parsed += usize::from(check_token(&String::from_utf8_lossy(&input)));
    }
    assert!(parsed > 8_000, "only {parsed} mutated tokens parsed");
}

#[test]
fn twin_queries_in_the_subset_parse_and_garbage_never_panics() {
    let mut rng = Rng::new(0x5E1EC7);
    let valid = [
        "SELECT * FROM devices",
        "SELECT TOP 2 * FROM devices WHERE tags.site = 'north' AND NOT properties.reported.temp >= 30",
        "select deviceId, tags.site AS s, properties.reported.fw from devices where status <> 'disabled'",
        "SELECT * FROM devices WHERE deviceId IN ['a', \"b\"] OR tags.floor NIN [1, 2.5, -3, null, true]",
        "SELECT * FROM devices WHERE IS_DEFINED(properties.desired.rate) AND (tags.floor < 2 OR tags.floor > '0')",
        "SELECT tags.site, COUNT() AS n FROM devices WHERE deviceId != 'x' GROUP BY tags.site",
        "SELECT COUNT() AS numberOfDevices FROM devices",
        "SELECT DeviceId, LastActivityTime FROM devices WHERE connectionState = 'Disconnected'",
    ];
    for v in valid {
        assert!(twin_query(v), "{v}");
    }
    let corpus: Vec<Vec<u8>> = valid.iter().map(|s| s.as_bytes().to_vec()).collect();
    // Token soup: the query language's own words and symbols in random order.
    let words = [
        "SELECT",
        "TOP",
        "*",
        "FROM",
        "devices",
        "devices.modules",
        "WHERE",
        "AND",
        "OR",
        "NOT",
        "IN",
        "NIN",
        "IS_DEFINED",
        "COUNT()",
        "AS",
        "GROUP",
        "BY",
        "(",
        ")",
        "[",
        "]",
        ",",
        ".",
        "=",
        "!=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "+",
        "-",
        "'a'",
        "\"b\"",
        "1",
        "2.5",
        "-0",
        "1e400",
        "null",
        "true",
        "tags",
        "tags.site",
        "properties.reported.temp",
        "deviceId",
        "$",
        "@x",
        ";",
        "--",
        "/*",
        "'",
        "\\",
    ];
    let mut accepted = 0;
    for i in 0..60_000 {
        let input = if i % 3 == 0 {
            let n = rng.below(24);
            (0..n)
                .map(|_| *rng.pick(&words))
                .collect::<Vec<_>>()
                .join(" ")
                .into_bytes()
        } else if i % 3 == 1 {
            rng.bytes_below(60)
        } else {
            let seed = rng.pick(&corpus).clone();
            rng.mutate(seed, &corpus)
        };
        if let Ok(text) = std::str::from_utf8(&input) {
            accepted += usize::from(twin_query(text));
        }
    }
    // The mutations keep some queries valid, so evaluation is exercised too.
    assert!(accepted > 100, "{accepted}");
}
