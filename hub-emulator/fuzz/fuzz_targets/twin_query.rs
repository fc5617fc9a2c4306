//! Arbitrary text as a twin query (`POST /devices/query`) and as a continuation token:
//! refused or answered, never a panic or a stack overflow.
//! Run: `cargo +nightly fuzz run twin_query` in hub-emulator/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_hub_emulator::fuzzing::twin_query;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        twin_query(text);
    }
});
