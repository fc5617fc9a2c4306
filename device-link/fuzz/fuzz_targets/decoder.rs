//! Arbitrary bytes into the stream decoder (in input-derived chunks), the frame parser, a
//! link, and the payload decoder. Run: `cargo +nightly fuzz run decoder` in device-link/.
#![no_main]

use device_link::{Config, Event, Frame, FrameDecoder, Link, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the chunk size, so chunk boundaries are fuzzed too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);

    let mut dec = FrameDecoder::new([0u8; 300]);
    for mut piece in data.chunks(chunk) {
        while !piece.is_empty() {
            let (used, out) = dec.feed(piece);
            assert!(used > 0);
            piece = &piece[used..];
            if let Some(Ok(content)) = out {
                let _ = Frame::parse(content);
            }
        }
    }

    let mut link = Link::with_capacity(&Config::new("fuzz", "0"), 256).expect("valid config");
    link.tick(0);
    let mut rest = data;
    let mut now = 0;
    while !rest.is_empty() {
        let used = link.receive(now, &rest[..chunk.min(rest.len())]);
        rest = &rest[used..];
        while let Some(ev) = link.poll_event() {
            if let Event::Message(m) = ev {
                let _ = Value::decode(m.payload);
            }
        }
        now += 100;
        link.tick(now);
        let n = link.poll_transmit().len();
        link.transmitted(n);
    }

    let _ = Value::decode(data);
});
