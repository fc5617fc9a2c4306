//! `device-bench`: the device channel's numbers over a pty. The simulator board runs in a
//! thread on the pty master; this program is the host end on the slave, with the host's
//! link settings (256 KiB frames, default window and heartbeats). Prints a table.
//!
//! Measures, per direction: messages/s and payload MB/s for 16-byte and 1 KiB payloads,
//! wire efficiency (payload bytes / bytes on the wire in that direction), the share of a
//! 115200-baud line that would carry payload, and round-trip latency (request → reply).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use device_link::link::OwnedEvent;
use device_link::{Config, Link, Value};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

#[derive(Parser)]
struct Args {
    /// Messages per throughput run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Round trips for the latency run.
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
}

/// The host end of the link, over the pty slave.
struct HostEnd {
    file: File,
    link: Link<Vec<u8>>,
    start: Instant,
    wire_out: u64,
    wire_in: u64,
    buf: Vec<u8>,
}

impl HostEnd {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Writes what the link has, waits up to `timeout_ms` for input, feeds it; returns events.
    fn step(&mut self, timeout_ms: u16) -> anyhow::Result<Vec<OwnedEvent>> {
        let now = self.now();
        self.link.tick(now);
        let out = self.link.poll_transmit();
        let mut written = 0;
        if !out.is_empty() {
            match self.file.write(out) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.link.transmitted(written);
        self.wire_out += written as u64;
        let mut flags = PollFlags::POLLIN;
        if !self.link.poll_transmit().is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        poll(&mut [PollFd::new(self.file.as_fd(), flags)], PollTimeout::from(timeout_ms))?;
        let mut events = Vec::new();
        let n = match self.file.read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        self.wire_in += n as u64;
        let mut used = 0;
        while used < n {
            used += self.link.receive(now, &self.buf[used..n]);
            while let Some(e) = self.link.poll_event() {
                events.push(e.to_owned());
            }
        }
        while let Some(e) = self.link.poll_event() {
            events.push(e.to_owned());
        }
        Ok(events)
    }

    /// Steps until `done` says so (it sees every event), or fails after 60 s.
    fn until(&mut self, mut done: impl FnMut(&mut Link<Vec<u8>>, &OwnedEvent) -> bool, mut idle: impl FnMut(&mut Link<Vec<u8>>)) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            idle(&mut self.link);
            for e in self.step(1)? {
                if done(&mut self.link, &e) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("benchmark step timed out");
            }
        }
    }

    /// Sends a request and waits for its reply.
    fn request(&mut self, name: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let id = loop {
            match self.link.send(name, payload, true) {
                Ok(id) => break id,
                Err(_) => {
                    self.step(1)?;
                }
            }
        };
        let mut reply = Vec::new();
        self.until(
            |_, e| match e {
                OwnedEvent::Reply(r, p) if *r == id => {
                    reply = p.clone();
                    true
                }
                _ => false,
            },
            |_| {},
        )?;
        Ok(reply)
    }
}

/// A payload of exactly `len` bytes of CBOR: one byte string.
fn payload_of(len: usize) -> Vec<u8> {
    let head = match len {
        0..=24 => 1,
        25..=256 => 2,
        _ => 3,
    };
    Value::Bytes(vec![0xA5; len - head]).encode()
}

struct Row {
    what: String,
    msgs_per_s: f64,
    mb_per_s: f64,
    efficiency: f64,
}

/// Host → device: `n` messages `sink` with `len`-byte payloads, then a request that is
/// answered once all were handled.
fn to_device(end: &mut HostEnd, n: usize, len: usize, ack: bool) -> anyhow::Result<Row> {
    let payload = payload_of(len);
    assert_eq!(payload.len(), len);
    let before = end.request("get-sink", &[])?;
    let base = Value::decode(&before)?.as_i64().unwrap_or(0);
    let (out0, t0) = (end.wire_out, Instant::now());
    let mut sent = 0;
    if ack {
        let mut answered = 0;
        end.until(
            |_, e| {
                answered += usize::from(matches!(e, OwnedEvent::Acked(_)));
                answered == n
            },
            |link| {
                while sent < n && link.send("sink", &payload, true).is_ok() {
                    sent += 1;
                }
            },
        )?;
    }
    // Unacknowledged: push all, then ask; the link is ordered, so the answer comes last.
    while sent < n {
        if end.link.send("sink", &payload, false).is_ok() {
            sent += 1;
        } else {
            end.step(1)?;
        }
    }
    let after = end.request("get-sink", &[])?;
    let secs = t0.elapsed().as_secs_f64();
    let count = Value::decode(&after)?.as_i64().unwrap_or(0) - base;
    if count != n as i64 {
        bail!("device took {count} of {n} messages");
    }
    // The closing request's frame is a few bytes; leave it in, it is noise at this n.
    let wire = (end.wire_out - out0) as f64;
    let bytes = (n * len) as f64;
    Ok(Row {
        what: format!("agent → device, {len} B{}", if ack { ", acked" } else { "" }),
        msgs_per_s: n as f64 / secs,
        mb_per_s: bytes / secs / 1e6,
        efficiency: bytes / wire,
    })
}

/// Device → host: the board's `burst` of `n` messages with `pad`-byte pads.
fn from_device(end: &mut HostEnd, n: usize, pad: usize, ack: bool) -> anyhow::Result<Row> {
    let request = Value::Map(
        [("count", Value::Int(n as i64)), ("size", Value::Int(pad as i64)), ("ack", Value::Bool(ack))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    );
    end.link.send("burst", &request.encode(), false).map_err(|e| anyhow::anyhow!("send burst: {e}"))?;
    let (in0, t0) = (end.wire_in, Instant::now());
    let mut received = 0usize;
    let mut bytes = 0usize;
    end.until(
        |link, e| match e {
            OwnedEvent::Message { id, name, payload, wants_ack } if name == "seq" => {
                received += 1;
                bytes += payload.len();
                if *wants_ack {
                    // The host link's transmit buffer is far larger than a window of ACKs.
                    let _ = link.ack(*id);
                }
                false
            }
            OwnedEvent::Message { name, .. } => name == "burst-done",
            _ => false,
        },
        |_| {},
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if received != n {
        bail!("received {received} of {n} messages");
    }
    let wire = (end.wire_in - in0) as f64;
    let len = bytes / n;
    Ok(Row {
        what: format!("device → agent, {len} B{}", if ack { ", acked" } else { "" }),
        msgs_per_s: n as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        efficiency: bytes as f64 / wire,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pty = device_sim::Pty::open()?;
    let path = pty.slave_path.clone();
    let options = device_sim::Options { device_id: "bench".into(), interval_s: 0.0, noise_ms: 0, verbose: false, readings: 0, control: false, link: None, replies: Vec::new(), sends: Vec::new() };
    std::thread::spawn(move || device_sim::run(pty, &options));

    let file = OpenOptions::new().read(true).write(true).custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY).open(&path)?;
    let config = Config::new("bench-host", "bench");
    let link = Link::with_capacity(&config, 256 * 1024 + 16).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut end = HostEnd { file, link, start: Instant::now(), wire_out: 0, wire_in: 0, buf: vec![0; 64 * 1024] };
    end.until(|_, e| matches!(e, OwnedEvent::Connected(_)), |_| {})?;

    // Round trips: 16-byte echo requests, one at a time.
    let payload = payload_of(16);
    let mut rtts = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let reply = end.request("echo", &payload)?;
        rtts.push(t.elapsed());
        if reply != payload {
            bail!("echo came back different");
        }
    }
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;

    let n = args.messages;
    let rows = [
        to_device(&mut end, n, 16, false)?,
        to_device(&mut end, n, 1024, false)?,
        to_device(&mut end, n, 16, true)?,
        to_device(&mut end, n, 1024, true)?,
        from_device(&mut end, n, 0, false)?,
        from_device(&mut end, n, 1010, false)?,
        from_device(&mut end, n, 1010, true)?,
    ];
    println!("command: cargo run --release -p device-sim --bin device-bench -- --messages {n} --round-trips {}", args.round_trips);
    println!();
    println!("| direction, payload | messages/s | payload MB/s | wire efficiency | payload share of 115200 baud |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        // 8N1: 10 bit times per byte, so 11 520 bytes/s of line; efficiency of it is payload.
        println!(
            "| {} | {:.0} | {:.2} | {:.1} % | {:.1} % ({:.0} B/s) |",
            r.what,
            r.msgs_per_s,
            r.mb_per_s,
            r.efficiency * 100.0,
            r.efficiency * 100.0,
            r.efficiency * 11_520.0
        );
    }
    println!();
    println!("round trip (16-byte echo request → reply, {} samples): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs", rtts.len(), pct(0.5), pct(0.99), pct(1.0));
    Ok(())
}
