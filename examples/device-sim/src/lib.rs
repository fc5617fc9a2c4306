//! A simulated sensor board on a pty, speaking the Tether device link with the firmware
//! [`device_link::Agent`]: what the tests, the benchmark and `tether demo` talk to.
//!
//! Messages it handles (name → payload → answer):
//! - `led` bool → ack; `get-led` → reply bool; `blink` int → ack
//! - `set-interval` seconds → ack (period of `temperature` readings it sends)
//! - `ping` → reply "pong"; `echo` any → reply the same
//! - `sink` any → ack, counted; `get-sink` → reply the count
//! - `seq` {n} → ack, counting gaps and repeats; `get-seq` → reply {received, errors, next}
//! - `burst` {count, size, ack} → ack, then sends `count` messages `seq` {n, pad: size bytes}
//!   as fast as flow control allows, then `burst-done` {sent, acked, failed}
//!
//! With [`Options::readings`] it takes numbered readings, one per interval whether or not
//! it is connected, and sends each as `reading` {n} until the agent replies `true` (taken),
//! oldest first: a board that loses nothing across a lost line. With [`Options::control`]
//! the lines `unplug` and `replug` on stdin take it off the line (the pty closes and the
//! link path goes, as `/dev/serial/by-id/...` does) and put it back on a new pty.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use device_link::link::OwnedEvent;
use device_link::{Agent, Config, Link, MsgId, NackReason, Value};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

/// Largest frame the simulated board accepts: a small microcontroller's buffer.
pub const MAX_FRAME: usize = 4096;

/// A pty pair: the simulator owns the master, the host opens the slave by path.
pub struct Pty {
    /// The master side, non-blocking.
    pub master: File,
    /// Kept open so reading the master does not fail while no host has the slave open.
    _slave: OwnedFd,
    /// Path of the slave (`/dev/pts/N`).
    pub slave_path: PathBuf,
}

impl Pty {
    /// Opens a pty in raw mode (no echo, no line editing: a plain byte pipe).
    pub fn open() -> nix::Result<Pty> {
        let pair = nix::pty::openpty(None, None)?;
        let mut termios = tcgetattr(pair.slave.as_fd())?;
        cfmakeraw(&mut termios);
        tcsetattr(pair.slave.as_fd(), SetArg::TCSANOW, &termios)?;
        let flags = OFlag::from_bits_truncate(fcntl(pair.master.as_fd(), FcntlArg::F_GETFL)?);
        fcntl(pair.master.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        let slave_path = nix::unistd::ttyname(pair.slave.as_fd())?;
        Ok(Pty { master: File::from(pair.master), _slave: pair.slave, slave_path })
    }

    /// Points `link` at the slave, replacing what was there: a stable path across restarts,
    /// as `/dev/serial/by-id/...` is for a real board.
    pub fn symlink(&self, link: &Path) -> io::Result<()> {
        match std::fs::remove_file(link) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(&self.slave_path, link)
    }
}

/// Byte-stream adapter for the firmware agent over a non-blocking fd, optionally injecting
/// line noise between frames in both directions.
pub struct PtyIo {
    file: File,
    noise: Option<Noise>,
}

impl PtyIo {
    /// `noise_every_ms`: inject a burst of noise this often (0 = never).
    pub fn new(file: File, noise_every_ms: u64) -> PtyIo {
        let noise = (noise_every_ms > 0).then(|| Noise::new(noise_every_ms));
        PtyIo { file, noise }
    }

    /// Waits until the fd is readable (or writable, with `want_write`) or `timeout_ms` passes.
    pub fn wait(&self, timeout_ms: u64, want_write: bool) -> nix::Result<()> {
        let mut flags = PollFlags::POLLIN;
        if want_write {
            flags |= PollFlags::POLLOUT;
        }
        let timeout = PollTimeout::try_from(timeout_ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        poll(&mut [PollFd::new(self.file.as_fd(), flags)], timeout).map(drop)
    }
}

fn would_block(r: io::Result<usize>) -> io::Result<usize> {
    match r {
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => Ok(0),
        other => other,
    }
}

impl embedded_io::ErrorType for PtyIo {
    type Error = io::Error;
}

impl embedded_io::Read for PtyIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Noise goes in only right after a frame delimiter, so no real frame is damaged.
        let room = buf.len().saturating_sub(Noise::MAX_LEN).max(1);
        let n = would_block(self.file.read(&mut buf[..room]))?;
        let at_boundary = n > 0 && buf[n - 1] == 0 && buf.len() - n >= Noise::MAX_LEN;
        if let Some(noise) = &mut self.noise
            && at_boundary
            && noise.due()
        {
            return Ok(n + noise.fill(&mut buf[n..]));
        }
        Ok(n)
    }
}

impl embedded_io::ReadReady for PtyIo {
    fn read_ready(&mut self) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::ZERO).map_err(io::Error::from)?;
        Ok(n > 0)
    }
}

impl embedded_io::Write for PtyIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The agent writes whole pending output; a frame boundary precedes it when the
        // previous write completed, which is when noise may go out.
        if let Some(noise) = &mut self.noise
            && noise.due()
        {
            let mut junk = [0u8; Noise::MAX_LEN];
            let len = noise.fill(&mut junk);
            self.file.write_all(&junk[..len]).or_else(|e| if e.kind() == ErrorKind::WouldBlock { Ok(()) } else { Err(e) })?;
        }
        would_block(self.file.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Line noise: random bytes, corrupted and truncated frames, always ending in a delimiter.
struct Noise {
    every_ms: u64,
    last: Instant,
    rng: u64,
    /// Bursts injected.
    count: u64,
}

impl Noise {
    const MAX_LEN: usize = 96;

    fn new(every_ms: u64) -> Noise {
        Noise { every_ms, last: Instant::now(), rng: 0x9E37_79B9_7F4A_7C15, count: 0 }
    }

    fn due(&mut self) -> bool {
        if self.last.elapsed().as_millis() as u64 >= self.every_ms {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64: repeatable noise, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Writes one burst into `out` (at least MAX_LEN bytes); returns its length.
    fn fill(&mut self, out: &mut [u8]) -> usize {
        self.count += 1;
        let len = match self.count % 3 {
            // Random bytes, zeros included: empty frames, CRC and COBS errors.
            0 => {
                let len = 8 + (self.next() % 40) as usize;
                for b in &mut out[..len] {
                    *b = self.next() as u8;
                }
                len
            }
            // A valid MSG with one bit flipped: a CRC error that must never be delivered
            // (an `led` that would switch the LED on, or a `temperature` of 999).
            1 => {
                let (name, value) = if self.count.is_multiple_of(2) { ("led", Value::Bool(true)) } else { ("temperature", Value::Float(999.0)) };
                let payload = value.encode();
                let frame = device_link::Frame::Msg { id: device_link::MsgId(0), ack_requested: false, name, payload: &payload };
                let n = frame.encode(out).unwrap_or(0);
                if n > 3 {
                    let at = 1 + (self.next() as usize) % (n - 3);
                    out[at] ^= 1 << (self.next() % 8);
                    // A flipped bit may turn into 0x00 and split the frame: still garbage.
                }
                n
            }
            // A frame cut short: its tail is lost.
            _ => {
                let frame = device_link::Frame::Ack(device_link::MsgId(7));
                let n = frame.encode(out).unwrap_or(0);
                let cut = n / 2;
                out[cut] = 0;
                cut + 1
            }
        };
        out[len.min(Self::MAX_LEN - 1)] = 0;
        len.min(Self::MAX_LEN - 1) + 1
    }
}

/// The board's state, shared by its message handlers.
#[derive(Debug)]
struct Board {
    interval_ms: u64,
    led: bool,
    blinks: i64,
    seq_next: i64,
    seq_received: i64,
    seq_errors: i64,
    /// `sink` messages taken (the benchmark's target).
    sunk: i64,
    burst: Option<Burst>,
    readings: Option<Readings>,
}

/// Numbered readings kept until the agent has taken them.
#[derive(Debug)]
struct Readings {
    /// How many to take in all.
    total: u64,
    /// Taken so far (the last one's number).
    made: u64,
    /// When the next one is due, ms since start.
    next_at: u64,
    /// Not yet taken by the agent, oldest first.
    waiting: VecDeque<u64>,
    /// The one sent and not yet answered: its message id and number.
    in_flight: Option<(MsgId, u64)>,
    /// After a refusal, not before this time (ms since start).
    retry_at: u64,
}

impl Readings {
    /// The answer to message `id`: `taken` or not.
    fn answered(&mut self, id: MsgId, taken: bool, now: u64) {
        if let Some((sent, n)) = self.in_flight
            && sent == id
        {
            self.in_flight = None;
            if taken && self.waiting.front() == Some(&n) {
                self.waiting.pop_front();
            } else if !taken {
                self.retry_at = now + 200;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Burst {
    count: u64,
    size: usize,
    ack: bool,
    sent: u64,
    acked: u64,
    failed: u64,
}

/// Simulator options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Id announced in HELLO.
    pub device_id: String,
    /// Seconds between temperature readings (0: none).
    pub interval_s: f64,
    /// Inject noise every this many ms (0: never).
    pub noise_ms: u64,
    /// Log what happens on stderr.
    pub verbose: bool,
    /// Numbered readings to take and deliver, one per interval (0: temperatures instead).
    pub readings: u64,
    /// Obey `unplug` and `replug` lines on stdin.
    pub control: bool,
    /// The stable path kept pointing at the current pty.
    pub link: Option<PathBuf>,
    /// Messages answered with a fixed value (`--on NAME=JSON`), replacing a built-in
    /// handler of the same name.
    pub replies: Vec<(String, Value)>,
    /// Messages sent each time the agent connects, in order (`--send NAME=JSON`).
    pub sends: Vec<(String, Value)>,
}

/// `NAME=JSON` (a command-line `--on`/`--send`) or `NAME JSON` (a script line) as a name
/// and a payload.
pub fn parse_message(text: &str) -> anyhow::Result<(String, Value)> {
    let text = text.trim();
    let (name, json) = text.split_once(['=', ' ']).ok_or_else(|| anyhow::anyhow!("{text:?}: expected NAME=JSON"))?;
    let json: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| anyhow::anyhow!("{text:?}: the payload is not JSON: {e}"))?;
    let value = device_link::to_value(&json).map_err(|e| anyhow::anyhow!("{text:?}: not a device payload: {e}"))?;
    if name.is_empty() {
        anyhow::bail!("{text:?}: the message needs a name");
    }
    Ok((name.to_owned(), value))
}

/// A script's messages by name, each with its JSON payload.
pub type Messages = Vec<(String, Value)>;

/// The `on` and `send` lines of a script file (`#` starts a comment).
pub fn parse_script(text: &str) -> anyhow::Result<(Messages, Messages)> {
    let (mut replies, mut sends) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: anyhow::Error| e.context(format!("line {}", n + 1));
        match line.split_once(' ') {
            Some(("on", rest)) => replies.push(parse_message(rest).map_err(at)?),
            Some(("send", rest)) => sends.push(parse_message(rest).map_err(at)?),
            _ => anyhow::bail!("line {}: {line:?}: expected `on NAME JSON` or `send NAME JSON`", n + 1),
        }
    }
    Ok((replies, sends))
}

fn get_i64(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// The board on one pty: what an unplug takes away.
struct Line<B: AsRef<[u8]> + AsMut<[u8]>> {
    agent: Agent<PtyIo, B>,
    /// A second handle on the master, to sleep until it has something for us.
    waiter: PtyIo,
    /// Held so that reading the master does not fail while no host has the slave open.
    _slave: OwnedFd,
}

fn plug_in(pty: Pty, options: &Options, board: &Rc<RefCell<Board>>, say: impl Fn(String) + Clone + 'static) -> anyhow::Result<Line<Vec<u8>>> {
    let config = Config::new(&options.device_id, "sim-1.0");
    let tx = device_link::framing::max_encoded_len(MAX_FRAME) * 2 + device_link::link::CONTROL_RESERVE;
    let link = Link::new(&config, vec![0u8; MAX_FRAME], vec![0u8; tx]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let waiter = PtyIo::new(pty.master.try_clone()?, 0);
    let mut agent = Agent::new(PtyIo::new(pty.master, options.noise_ms), link);
    install_handlers(&mut agent, board, say);
    for (name, value) in &options.replies {
        let value = value.clone();
        agent.on(name, move |_| Some(value.clone()));
    }
    Ok(Line { agent, waiter, _slave: pty._slave })
}

/// Whether the board should be on the line, as the `unplug`/`replug` lines on stdin say.
/// And `send NAME JSON` lines, sent at once (or as soon as an agent is connected).
fn stdin_control() -> (Arc<AtomicBool>, std::sync::mpsc::Receiver<(String, Value)>) {
    let plugged = Arc::new(AtomicBool::new(true));
    let flag = plugged.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lines() {
            match line.as_deref().map(str::trim) {
                Ok("unplug") => flag.store(false, Ordering::SeqCst),
                Ok("replug") => flag.store(true, Ordering::SeqCst),
                Ok(other) if other.starts_with("send ") => match parse_message(&other[5..]) {
                    Ok(message) => {
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("device-sim: {e:#}"),
                },
                Ok(other) => eprintln!("device-sim: unknown command {other:?} (unplug, replug, send NAME JSON)"),
                Err(_) => return,
            }
        }
    });
    (plugged, rx)
}

/// Runs the board on `pty` until the pty fails (or forever).
pub fn run(pty: Pty, options: &Options) -> anyhow::Result<()> {
    let board = Rc::new(RefCell::new(Board {
        interval_ms: (options.interval_s * 1000.0) as u64,
        led: false,
        blinks: 0,
        seq_next: 0,
        seq_received: 0,
        seq_errors: 0,
        sunk: 0,
        burst: None,
        readings: (options.readings > 0).then(|| Readings { total: options.readings, made: 0, next_at: 0, waiting: VecDeque::new(), in_flight: None, retry_at: 0 }),
    }));
    let verbose = options.verbose;
    let say = move |s: String| {
        if verbose {
            eprintln!("device-sim: {s}")
        }
    };
    let (plugged, typed) = options.control.then(stdin_control).unzip();
    // Messages typed on stdin wait here while no agent is connected.
    let mut outgoing: VecDeque<(String, Value)> = VecDeque::new();
    let mut line = Some(plug_in(pty, options, &board, say)?);

    let start = Instant::now();
    let mut next_reading = 0u64;
    loop {
        let now = start.elapsed().as_millis() as u64;
        take_readings(&board, now);
        let want_in = plugged.as_ref().is_none_or(|p| p.load(Ordering::SeqCst));
        let Some(l) = line.as_mut().filter(|_| want_in) else {
            if line.take().is_some() {
                // Unplugged: the pty closes and the stable path goes.
                if let Some(link) = &options.link {
                    let _ = std::fs::remove_file(link);
                }
                if let Some(r) = &mut board.borrow_mut().readings {
                    r.in_flight = None;
                }
                say("unplugged".into());
            } else if want_in {
                let pty = Pty::open()?;
                if let Some(link) = &options.link {
                    pty.symlink(link)?;
                }
                line = Some(plug_in(pty, options, &board, say)?);
                say("replugged".into());
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        };
        let agent = &mut l.agent;
        while let Some(event) = agent.poll(now)?.map(|e| e.to_owned()) {
            match event {
                OwnedEvent::Connected(peer) => {
                    say(format!("connected to {}", peer.device_id()));
                    outgoing.extend(options.sends.iter().cloned());
                }
                OwnedEvent::Disconnected(r) => {
                    say(format!("disconnected: {r:?}"));
                    if let Some(r) = &mut board.borrow_mut().readings {
                        r.in_flight = None;
                    }
                }
                OwnedEvent::Message { id, wants_ack: true, name, .. } => {
                    say(format!("no handler for {name:?}"));
                    let _ = agent.link_mut().nack(id, NackReason::NoHandler);
                }
                OwnedEvent::Reply(id, payload) => {
                    let taken = Value::decode(&payload).ok().and_then(|v| v.as_bool()) == Some(true);
                    if let Some(r) = &mut board.borrow_mut().readings {
                        r.answered(id, taken, now);
                    }
                    count_burst(&board, true);
                }
                OwnedEvent::Acked(id) => {
                    // Only a reply says the reading was taken.
                    if let Some(r) = &mut board.borrow_mut().readings {
                        r.answered(id, false, now);
                    }
                    count_burst(&board, true);
                }
                OwnedEvent::Nacked(id, _) | OwnedEvent::TimedOut(id) => {
                    if let Some(r) = &mut board.borrow_mut().readings {
                        r.answered(id, false, now);
                    }
                    count_burst(&board, false);
                }
                _ => {}
            }
        }
        if !agent.is_connected() {
            // Whatever was going on ended with the session.
            board.borrow_mut().burst = None;
        }
        outgoing.extend(typed.iter().flat_map(|rx| rx.try_iter()));
        while agent.is_connected() {
            let Some((name, value)) = outgoing.pop_front() else { break };
            if let Err(e) = agent.send(&name, &value) {
                // No room now: it goes first next round.
                say(format!("send {name}: {e:?}; retrying"));
                outgoing.push_front((name, value));
                break;
            }
            say(format!("sent {name}"));
        }
        let interval = board.borrow().interval_ms;
        let readings = board.borrow().readings.is_some();
        if readings {
            send_reading(agent, &board, now);
        } else if agent.is_connected() && interval > 0 && now >= next_reading {
            let t = now as f64 / 1000.0;
            let celsius = (2000.0 + 150.0 * (t / 30.0).sin()).round() / 100.0;
            let _ = agent.send("temperature", &Value::Float(celsius));
            next_reading = now + interval;
        }
        let bursting = send_burst(agent, &board);
        let mut wake = agent.link().next_deadline().min(if interval > 0 { next_reading } else { u64::MAX });
        if readings || plugged.is_some() {
            // Readings are due and commands come whether or not the line is busy.
            wake = wake.min(now + 20);
        }
        let now = start.elapsed().as_millis() as u64;
        let timeout = if bursting { 1 } else { wake.saturating_sub(now).max(1) };
        let want_write = !agent.link_mut().poll_transmit().is_empty();
        l.waiter.wait(timeout, want_write)?;
    }
}

/// Takes the readings that are due, connected or not.
fn take_readings(board: &Rc<RefCell<Board>>, now: u64) {
    let mut b = board.borrow_mut();
    let interval = b.interval_ms.max(1);
    let Some(r) = &mut b.readings else { return };
    while r.made < r.total && now >= r.next_at {
        r.made += 1;
        r.waiting.push_back(r.made);
        r.next_at += interval;
    }
}

/// Sends the oldest reading not yet taken, if none is waiting for its answer.
fn send_reading<B: AsRef<[u8]> + AsMut<[u8]>>(agent: &mut Agent<PtyIo, B>, board: &Rc<RefCell<Board>>, now: u64) {
    let mut b = board.borrow_mut();
    let Some(r) = &mut b.readings else { return };
    if !agent.is_connected() || r.in_flight.is_some() || now < r.retry_at {
        return;
    }
    let Some(&n) = r.waiting.front() else { return };
    let payload = Value::Map([("n".to_owned(), Value::Int(i64::try_from(n).unwrap_or(i64::MAX)))].into_iter().collect()).encode();
    if let Ok(id) = agent.send_cbor("reading", &payload, true) {
        r.in_flight = Some((id, n));
    }
}

fn count_burst(board: &Rc<RefCell<Board>>, ok: bool) {
    if let Some(b) = &mut board.borrow_mut().burst {
        if ok { b.acked += 1 } else { b.failed += 1 }
    }
}

/// Sends as much of a running burst as flow control allows; `true` while it runs.
fn send_burst<B: AsRef<[u8]> + AsMut<[u8]>>(agent: &mut Agent<PtyIo, B>, board: &Rc<RefCell<Board>>) -> bool {
    let Some(mut burst) = board.borrow().burst else { return false };
    let pad = vec![0xA5u8; burst.size];
    while burst.sent < burst.count && agent.link().can_send() {
        let mut map = std::collections::BTreeMap::new();
        map.insert("n".to_owned(), Value::Int(burst.sent as i64));
        map.insert("pad".to_owned(), Value::Bytes(pad.clone()));
        if agent.send_cbor("seq", &Value::Map(map).encode(), burst.ack).is_err() {
            break;
        }
        burst.sent += 1;
    }
    let answered = if burst.ack { burst.acked + burst.failed } else { burst.sent };
    let done = burst.sent == burst.count && answered == burst.count;
    if done {
        let report = Value::Map(
            [("sent", burst.sent), ("acked", burst.acked), ("failed", burst.failed)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::Int(v as i64)))
                .collect(),
        );
        if agent.send("burst-done", &report).is_err() {
            // No room yet: try again next round.
            board.borrow_mut().burst = Some(burst);
            return true;
        }
        board.borrow_mut().burst = None;
        return false;
    }
    if let Some(b) = &mut board.borrow_mut().burst {
        b.sent = burst.sent;
    }
    true
}

fn install_handlers<B: AsRef<[u8]> + AsMut<[u8]>>(
    agent: &mut Agent<PtyIo, B>,
    board: &Rc<RefCell<Board>>,
    say: impl Fn(String) + Clone + 'static,
) {
    let b = board.clone();
    let s = say.clone();
    agent.on("led", move |v| {
        let on = v.as_bool().unwrap_or(false);
        b.borrow_mut().led = on;
        s(format!("LED {}", if on { "on" } else { "off" }));
        None
    });
    let b = board.clone();
    agent.on("get-led", move |_| Some(Value::Bool(b.borrow().led)));
    let b = board.clone();
    let s = say.clone();
    agent.on("blink", move |v| {
        let n = v.as_i64().unwrap_or(1);
        b.borrow_mut().blinks += n;
        s(format!("blink x{n}"));
        None
    });
    let b = board.clone();
    agent.on("set-interval", move |v| {
        if let Some(secs) = v.as_f64().filter(|s| *s >= 0.0) {
            b.borrow_mut().interval_ms = (secs * 1000.0) as u64;
            say(format!("interval {secs} s"));
        }
        None
    });
    let b = board.clone();
    agent.on("sink", move |_| {
        b.borrow_mut().sunk += 1;
        None
    });
    let b = board.clone();
    agent.on("get-sink", move |_| Some(Value::Int(b.borrow().sunk)));
    agent.on("ping", |_| Some(Value::String("pong".into())));
    agent.on("echo", |v| Some(v.clone()));
    let b = board.clone();
    agent.on("seq", move |v| {
        let mut b = b.borrow_mut();
        let n = get_i64(v, "n").unwrap_or(-1);
        // 0 starts a new sequence (a new test run); anything else must be the next one.
        if n == 0 {
            (b.seq_next, b.seq_received, b.seq_errors) = (0, 0, 0);
        }
        if n != b.seq_next {
            b.seq_errors += 1;
        }
        b.seq_next = n + 1;
        b.seq_received += 1;
        None
    });
    let b = board.clone();
    agent.on("get-seq", move |_| {
        let b = b.borrow();
        let entries = [("received", b.seq_received), ("errors", b.seq_errors), ("next", b.seq_next)];
        Some(Value::Map(entries.into_iter().map(|(k, v)| (k.to_owned(), Value::Int(v))).collect()))
    });
    let b = board.clone();
    agent.on("burst", move |v| {
        let count = get_i64(v, "count").unwrap_or(0).max(0) as u64;
        let size = get_i64(v, "size").unwrap_or(0).clamp(0, MAX_FRAME as i64) as usize;
        let ack = v.get("ack").and_then(Value::as_bool).unwrap_or(true);
        b.borrow_mut().burst = Some(Burst { count, size, ack, sent: 0, acked: 0, failed: 0 });
        None
    });
}

#[cfg(test)]
mod script_tests {
    use super::*;

    #[test]
    fn messages_and_scripts_parse_or_say_where_they_are_wrong() {
        assert_eq!(parse_message("fan=true").unwrap(), ("fan".to_owned(), Value::Bool(true)));
        assert_eq!(parse_message("t 21").unwrap(), ("t".to_owned(), Value::Int(21)));
        assert!(parse_message("t=oops").unwrap_err().to_string().contains("not JSON"));
        assert!(parse_message("=1").is_err());
        let (replies, sends) = parse_script("# c\n\non get-fan true\nsend t {\"a\": [1]}\n").unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(sends[0].0, "t");
        let e = parse_script("on x 1\nshout y 2\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
