//! In-memory harness: two links joined by byte pipes the test can cut, corrupt or rechunk.
#![allow(dead_code)]

use device_link::{Config, Link, OwnedEvent};

/// Deterministic xorshift64* PRNG: reproducible "random" tests without dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub type HostLink = Link<Vec<u8>>;

pub fn link(id: &str, window: u16, max_frame: usize) -> HostLink {
    let mut cfg = Config::new(id, "1.0.0");
    cfg.window = window;
    Link::with_capacity(&cfg, max_frame).unwrap()
}

/// Drains all bytes `from` wants to send.
pub fn take_tx(from: &mut HostLink) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let chunk = from.poll_transmit();
        if chunk.is_empty() {
            return out;
        }
        out.extend_from_slice(chunk);
        let n = chunk.len();
        from.transmitted(n);
    }
}

/// Feeds `bytes` to `to` in the given chunk sizes, collecting every event.
pub fn deliver(
    to: &mut HostLink,
    now: u64,
    bytes: &[u8],
    chunk: &mut dyn FnMut() -> usize,
) -> Vec<OwnedEvent> {
    let mut events = Vec::new();
    let mut rest = bytes;
    loop {
        while let Some(ev) = to.poll_event() {
            events.push(ev.to_owned());
        }
        if rest.is_empty() {
            return events;
        }
        let n = chunk().clamp(1, rest.len());
        let used = to.receive(now, &rest[..n]);
        rest = &rest[used..];
    }
}

pub struct Pair {
    pub a: HostLink,
    pub b: HostLink,
    pub now: u64,
    pub a_events: Vec<OwnedEvent>,
    pub b_events: Vec<OwnedEvent>,
}

impl Pair {
    pub fn new(window: u16) -> Pair {
        Pair {
            a: link("host", window, 1024),
            b: link("dev-1", window, 512),
            now: 0,
            a_events: vec![],
            b_events: vec![],
        }
    }

    /// A pair that has completed its handshake, with the handshake events cleared.
    pub fn connected(window: u16) -> Pair {
        let mut p = Pair::new(window);
        p.tick(0);
        p.exchange();
        assert!(p.a.is_connected() && p.b.is_connected());
        p.a_events.clear();
        p.b_events.clear();
        p
    }

    pub fn tick(&mut self, now: u64) {
        self.now = now;
        self.a.tick(now);
        self.b.tick(now);
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(ev) = self.a.poll_event() {
            self.a_events.push(ev.to_owned());
        }
        while let Some(ev) = self.b.poll_event() {
            self.b_events.push(ev.to_owned());
        }
    }

    /// Moves bytes both ways until neither side has anything to send.
    pub fn exchange(&mut self) {
        self.exchange_with(&mut |_, _| {});
    }

    /// Like `exchange`, letting `mangle(a_to_b, bytes)` alter bytes in flight.
    pub fn exchange_with(&mut self, mangle: &mut dyn FnMut(bool, &mut Vec<u8>)) {
        for _ in 0..100 {
            let mut ab = take_tx(&mut self.a);
            let mut ba = take_tx(&mut self.b);
            if ab.is_empty() && ba.is_empty() {
                return;
            }
            mangle(true, &mut ab);
            mangle(false, &mut ba);
            let now = self.now;
            self.b_events
                .extend(deliver(&mut self.b, now, &ab, &mut || usize::MAX));
            self.a_events
                .extend(deliver(&mut self.a, now, &ba, &mut || usize::MAX));
        }
        panic!("links never went quiet");
    }
}
