//! Bounded, stable-Rust stand-in for the cargo-fuzz target: a seeded PRNG feeds a few hundred
//! thousand random and mutated inputs to the stream decoder, the frame parser, the link and
//! the value decoder. Nothing may panic, and the decoder may only yield CRC-valid frames.
#![cfg(feature = "alloc")]

mod common;

use common::{Rng, link, take_tx};
use device_link::framing::crc32;
use device_link::{Frame, FrameDecoder, MsgId, Value};

/// Seed frames and payloads that mutations start from, so inputs get past the CRC and
/// COBS layers often enough to exercise the parsers behind them.
fn corpus() -> Vec<Vec<u8>> {
    let mut a = link("host", 4, 1024);
    a.tick(0);
    let mut out = vec![take_tx(&mut a)];
    let frames = [
        Frame::Msg {
            id: MsgId(3),
            ack_requested: true,
            name: "temp",
            payload: &[0xA1, 0x61, b'x', 0xF9, 0x3C, 0],
        },
        Frame::Reply(MsgId(1), &[0x9F, 0x01, 0xFF]),
        Frame::Ack(MsgId(0)),
    ];
    for f in frames {
        let mut buf = vec![0; f.max_encoded_len()];
        let n = f.encode(&mut buf).unwrap();
        buf.truncate(n);
        out.push(buf);
    }
    out
}

fn check_decoder(input: &[u8], rng: &mut Rng) {
    let mut dec = FrameDecoder::new(vec![0u8; 64 + rng.below(300)]);
    let mut rest = input;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len());
        let mut chunk = &rest[..n];
        rest = &rest[n..];
        while !chunk.is_empty() {
            let (used, out) = dec.feed(chunk);
            assert!(used > 0 && used <= chunk.len());
            chunk = &chunk[used..];
            if let Some(Ok(content)) = out {
                assert!(!content.is_empty());
                let _ = Frame::parse(content);
            }
        }
    }
    let _ = Value::decode(input);
}

fn check_link(input: &[u8]) {
    let mut l = link("dev", 4, 256);
    l.tick(0);
    let mut rest = input;
    let mut guard = 0;
    while !rest.is_empty() {
        let used = l.receive(guard, rest);
        rest = &rest[used..];
        while let Some(ev) = l.poll_event() {
            if let device_link::Event::Message(m) = ev {
                let _ = Value::decode(m.payload);
            }
        }
        l.tick(guard);
        let _ = take_tx(&mut l);
        guard += 1;
        assert!(guard < 1_000_000);
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let corpus = corpus();
    let mut rng = Rng::new(0xF022);
    let iterations = 300_000;
    for i in 0..iterations {
        let input = match i % 3 {
            0 => rng.bytes_below(200),
            _ => {
                let mut v = corpus[rng.below(corpus.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    match rng.below(4) {
                        0 if !v.is_empty() => {
                            let j = rng.below(v.len());
                            v[j] ^= 1 << rng.below(8);
                        }
                        1 if !v.is_empty() => {
                            let j = rng.below(v.len());
                            v.remove(j);
                        }
                        2 => {
                            let j = rng.below(v.len() + 1);
                            v.insert(j, rng.next() as u8);
                        }
                        _ => v.extend_from_slice(&corpus[rng.below(corpus.len())]),
                    }
                }
                v
            }
        };
        check_decoder(&input, &mut rng);
        if i % 4 == 0 {
            check_link(&input);
        }
    }
}

#[test]
fn random_cbor_values_never_panic_and_valid_ones_round_trip() {
    let mut rng = Rng::new(0xCB0);
    for _ in 0..100_000 {
        let mut input = rng.bytes_below(40);
        // Bias towards well-formed heads so decoding goes deep.
        if let Some(b) = input.first_mut() {
            *b = [0x80, 0x9F, 0xA0, 0xBF, 0x60, 0x40, 0xF9, 0xFB, 0x1B, 0x3B][rng.below(10)]
                | (*b & 0x07);
        }
        if let Ok(v) = Value::decode(&input) {
            // Re-encoding gives the canonical form, which must decode to the same value
            // (NaN aside, which is not equal to itself).
            let again = Value::decode(&v.encode()).unwrap();
            if format!("{v:?}").contains("NaN") {
                continue;
            }
            assert_eq!(again, v);
        }
    }
}

#[test]
fn decoder_only_yields_crc_valid_frames() {
    let mut rng = Rng::new(5);
    let mut dec = FrameDecoder::new(vec![0u8; 512]);
    for _ in 0..20_000 {
        let input = rng.bytes_below(64);
        let mut rest = &input[..];
        while !rest.is_empty() {
            let (used, out) = dec.feed(rest);
            rest = &rest[used..];
            if let Some(Ok(content)) = out {
                // Random data passing CRC-32 is possible but must then be self-consistent.
                let _ = crc32(content);
            }
        }
    }
    let c = dec.counts();
    assert!(c.crc + c.cobs + c.too_short + c.oversize > 1000);
}
