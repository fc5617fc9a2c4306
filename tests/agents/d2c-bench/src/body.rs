//! The d2c benchmark's message body, shared by the agent and the bench's native sender
//! (tests/benches/d2c.rs includes this file), so both send the same bytes built the same way.

/// The benchmark's message body: 100 bytes of JSON, numbered.
pub fn body(i: usize) -> String {
    // Built by hand rather than with `format!` and a padding loop: the senders' own work per
    // message should be small beside what is measured (the profile found the loop at 10 % of
    // a Tether message).
    const REST: &str = ",\"temperature\":21.5,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}";
    let mut s = String::with_capacity(100);
    s.push_str("{\"seq\":");
    for place in (0..8).rev() {
        s.push(char::from(b'0' + (i / 10usize.pow(place) % 10) as u8));
    }
    s.push_str(REST);
    s
}
