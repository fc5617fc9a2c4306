//! Arbitrary CONNECT credentials: the input is split at the first two NUL bytes into
//! client id, username and password, which go through username classification and SAS
//! token parsing and checking. Run: `cargo +nightly fuzz run credentials` in hub-emulator/.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether_hub_emulator::fuzzing::{Identity, SasToken, Usernames};

static USERNAMES: LazyLock<Usernames> =
    LazyLock::new(|| Usernames::new(&["localhost", "tether-hub"], "0ne00ABC123"));

fuzz_target!(|data: &[u8]| {
    let usernames = &*USERNAMES;
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let (client_id, username, password) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let identity = usernames.classify(client_id, username);
    // Whoever is recognised is who the client id says.
    if let Some(Identity::Device(id) | Identity::Dps(id)) = &identity {
        assert_eq!(id, client_id);
    }
    if let Ok(t) = SasToken::parse(password) {
        let _ = t.verify(&["c2VjcmV0", "%%"], 0);
        let _ = t.covers(&["localhost".into()], &["devices", client_id]);
        let _ = t.covers_hostless(&["0ne00ABC123", "registrations", client_id]);
    }
});
