//! Arbitrary bytes as the MQTT stream of one connection: decoded in input-derived chunks
//! exactly as the emulator does, then CONNECT credentials and PUBLISH topics go through the
//! username, SAS and property-bag parsers. Run: `cargo +nightly fuzz run mqtt_packet` in
//! hub-emulator/.
#![no_main]

use bytes::BytesMut;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;
use tether_hub_emulator::fuzzing::{PropertyBag, SasToken, Usernames, next_packet};

static USERNAMES: LazyLock<Usernames> =
    LazyLock::new(|| Usernames::new(&["localhost", "tether-hub"], "0ne00ABC123"));

fuzz_target!(|data: &[u8]| {
    let usernames = &*USERNAMES;
    // First byte picks the read size, so packet boundaries across reads are fuzzed too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match next_packet(&mut buf) {
                Ok(Some(packet)) => {
                    assert!(buf.len() < before);
                    inspect(&packet, usernames);
                }
                // Incomplete: nothing consumed, wait for the next read.
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                // The emulator closes the connection.
                Err(_) => return,
            }
        }
    }
});

fn inspect(packet: &Packet, usernames: &Usernames) {
    match packet {
        Packet::Connect(c) => {
            if let Some(login) = &c.login {
                let _ = usernames.classify(&c.client_id, &login.username);
                if let Ok(t) = SasToken::parse(&login.password) {
                    let _ = t.verify(&["c2VjcmV0"], 0);
                    let _ = t.covers(&["localhost".into()], &["devices", &c.client_id]);
                }
            }
            if let Some(will) = &c.last_will {
                topic_bag(&will.topic);
            }
        }
        Packet::Publish(p) => topic_bag(&p.topic),
        _ => {}
    }
}

/// The property bag of a telemetry topic, or the query part of any other topic.
fn topic_bag(topic: &str) {
    let bag = match topic.split_once("/messages/events/") {
        Some((_, bag)) => bag,
        None => topic.split_once('?').map_or("", |(_, q)| q),
    };
    if let Some(b) = PropertyBag::parse(bag) {
        let _ = b.counted_size();
    }
}
