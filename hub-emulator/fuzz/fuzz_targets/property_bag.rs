//! Arbitrary text as a D2C property bag; whatever parses must survive re-encoding: its
//! application properties, encoded as IoT Hub encodes them, parse back unchanged.
//! Run: `cargo +nightly fuzz run property_bag` in hub-emulator/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_hub_emulator::fuzzing::{PropertyBag, encode_component};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(bag) = PropertyBag::parse(text) else {
        return;
    };
    let _ = bag.counted_size();
    let encoded: Vec<String> = bag
        .app
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{}={}", encode_component(k), encode_component(v)),
            None => encode_component(k),
        })
        .collect();
    let again = PropertyBag::parse(&encoded.join("&")).expect("re-encoded bag parses");
    // Empty keys are dropped by the re-encoding (`&&`), and `$.` keys are system
    // properties, so compare the rest.
    let kept = |b: &PropertyBag| {
        b.app
            .iter()
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(kept(&again), kept(&bag));
});
