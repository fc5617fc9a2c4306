//! The sans-IO link state machine: bytes in, events and bytes out, time passed in.
//!
//! Both ends run the same machine (the protocol is symmetric, see docs/device-link.md):
//! while not connected each side sends HELLO every `hello_interval_ms`; a HELLO is answered
//! by HELLO-ACK, and either one completes the handshake.

use core::fmt;

use crate::frame::{
    FlowState, Frame, FrameError, Hello, MAX_NAME_LEN, MAX_TEXT_LEN, MSG_OVERHEAD, MsgId,
    NackReason,
};
use crate::framing::{DecodeCounts, FrameDecoder, max_encoded_len};
use crate::heartbeat::{Heartbeat, HeartbeatAction};

/// Newest protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Oldest protocol version this implementation speaks.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Smallest `max_frame` a peer may announce, and the smallest receive buffer: every
/// implementation can take a full HELLO and a small message.
pub const MIN_FRAME: usize = 128;
/// Messages awaiting ACK/NACK/REPLY per link, at most.
pub const MAX_PENDING: usize = 16;
/// Transmit-buffer bytes MSG and REPLY leave free, so ACKs and heartbeats always fit.
pub const CONTROL_RESERVE: usize = 64;
/// Smallest transmit buffer: a minimum-size frame plus the control reserve.
pub const MIN_TX_BUFFER: usize = max_encoded_len(MIN_FRAME) + CONTROL_RESERVE;

const EVENT_QUEUE: usize = 8;

/// Settings of one end of a link.
#[derive(Clone, Copy, Debug)]
pub struct Config<'a> {
    /// This end's id, sent in HELLO (a host sends its own name); at most 32 bytes.
    pub device_id: &'a str,
    /// This end's firmware/software version, sent in HELLO; at most 32 bytes.
    pub firmware_version: &'a str,
    /// MSG frames the peer may send before waiting for credit: size it so that `window`
    /// frames fit in what this end can buffer while busy.
    pub window: u16,
    /// Period of HELLO while not connected.
    pub hello_interval_ms: u32,
    /// Silence after which a PING is sent.
    pub heartbeat_interval_ms: u32,
    /// Silence after which the peer is declared gone (a few heartbeat intervals).
    pub timeout_ms: u32,
    /// How long a message waits for ACK/NACK/REPLY before `TimedOut`.
    pub ack_timeout_ms: u32,
}

impl<'a> Config<'a> {
    /// Defaults: window 4, HELLO and heartbeat every second, peer gone after 3.5 s
    /// silence, 10 s ack timeout (MessageManager's default).
    pub const fn new(device_id: &'a str, firmware_version: &'a str) -> Self {
        Config {
            device_id,
            firmware_version,
            window: 4,
            hello_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            timeout_ms: 3500,
            ack_timeout_ms: 10_000,
        }
    }
}

/// Why a link could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The receive buffer is shorter than [`MIN_FRAME`].
    RxBufferTooSmall,
    /// The transmit buffer is shorter than [`MIN_TX_BUFFER`].
    TxBufferTooSmall,
    /// `device_id` or `firmware_version` is longer than 32 bytes.
    TextTooLong,
    /// The window is zero, or a timeout or interval is zero.
    BadTiming,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::RxBufferTooSmall => "receive buffer smaller than MIN_FRAME",
            ConfigError::TxBufferTooSmall => "transmit buffer smaller than MIN_TX_BUFFER",
            ConfigError::TextTooLong => "device id or firmware version longer than 32 bytes",
            ConfigError::BadTiming => "window, interval or timeout is zero",
        })
    }
}

impl core::error::Error for ConfigError {}

/// Why `send`, `reply`, `ack` or `nack` refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No session with the peer (MessageManager's "No connection error").
    NotConnected,
    /// The name is longer than 255 bytes.
    NameTooLong,
    /// The frame exceeds the peer's `max_frame` or this end's transmit buffer; it never fits.
    TooLarge,
    /// The peer's flow-control window is full: wait for credit (`can_send`).
    WindowFull,
    /// Too many messages await acknowledgement ([`MAX_PENDING`]).
    TooManyPending,
    /// The transmit buffer is full: write out `poll_transmit` bytes and retry.
    TxFull,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::NotConnected => "no connection",
            SendError::NameTooLong => "message name longer than 255 bytes",
            SendError::TooLarge => "message larger than the link allows",
            SendError::WindowFull => "flow-control window full",
            SendError::TooManyPending => "too many messages awaiting acknowledgement",
            SendError::TxFull => "transmit buffer full",
        })
    }
}

impl core::error::Error for SendError {}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Nothing arrived within `timeout_ms` (unplugged, powered off or hung).
    Timeout,
    /// The peer sent a new HELLO: it restarted and its session state is gone.
    PeerRestarted,
}

/// A short string kept inline, so peer info needs no allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Text {
    buf: [u8; MAX_TEXT_LEN],
    len: u8,
}

impl Text {
    const EMPTY: Text = Text {
        buf: [0; MAX_TEXT_LEN],
        len: 0,
    };

    fn new(s: &str) -> Option<Text> {
        let mut t = Text::EMPTY;
        t.buf.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
        t.len = s.len() as u8;
        Some(t)
    }

    fn as_str(&self) -> &str {
        // Only ever built from a &str, so always UTF-8.
        core::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What the peer said about itself in its HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    device_id: Text,
    firmware_version: Text,
    /// Negotiated protocol version.
    pub version: u8,
    /// Largest frame content the peer accepts.
    pub max_frame: u32,
    /// MSG frames the peer accepts in flight.
    pub window: u16,
}

impl PeerInfo {
    /// The peer's device id (a host's name when seen from a device).
    pub fn device_id(&self) -> &str {
        self.device_id.as_str()
    }

    /// The peer's firmware/software version.
    pub fn firmware_version(&self) -> &str {
        self.firmware_version.as_str()
    }
}

/// An application message received from the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Id to answer with `ack`, `nack` or `reply`.
    pub id: MsgId,
    /// The sender wants exactly one ACK, NACK or REPLY.
    pub wants_ack: bool,
    /// Message name.
    pub name: &'a str,
    /// CBOR payload (decode with `Value::decode` or `cbor::Reader`).
    pub payload: &'a [u8],
}

/// Something the application should know about. Borrowed data stays valid until the
/// next call that takes `&mut self` on the link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event<'a> {
    /// A session started.
    Connected(&'a PeerInfo),
    /// The session ended; every message still awaiting acknowledgement has failed.
    Disconnected(DisconnectReason),
    /// A message arrived.
    Message(Message<'a>),
    /// The peer acknowledged a message.
    Acked(MsgId),
    /// The peer refused a message.
    Nacked(MsgId, NackReason),
    /// The peer replied to a message (this also acknowledges it).
    Reply(MsgId, &'a [u8]),
    /// No ACK/NACK/REPLY arrived within `ack_timeout_ms`.
    TimedOut(MsgId),
    /// The peer speaks no protocol version this end speaks (reported once per episode).
    VersionMismatch {
        /// Oldest version the peer speaks.
        peer_min: u8,
        /// Newest version the peer speaks.
        peer_max: u8,
    },
}

/// Counters of frames and errors, for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Good frames received.
    pub frames_rx: u32,
    /// Frames queued for sending.
    pub frames_tx: u32,
    /// Frames dropped for a CRC mismatch.
    pub crc_errors: u32,
    /// Truncated frames.
    pub cobs_errors: u32,
    /// Frames longer than the receive buffer.
    pub oversize: u32,
    /// Frames too short or with a body that does not fit their type.
    pub malformed: u32,
    /// Frames of an unknown type (skipped).
    pub unknown_type: u32,
    /// HELLOs with no common protocol version.
    pub version_errors: u32,
    /// Session frames received while not connected (dropped).
    pub not_connected: u32,
    /// ACK/NACK/REPLY for no pending message (late after a timeout, or bogus).
    pub unexpected: u32,
    /// The last PING's round trip to the peer's PONG, ms (0 before the first), as the
    /// link's clock (`tick`) sees it. A gauge, not a count.
    pub rtt_ms: u32,
}

#[derive(Clone, Copy, Debug)]
enum Queued {
    Connected,
    Disconnected(DisconnectReason),
    Acked(MsgId),
    Nacked(MsgId, NackReason),
    TimedOut(MsgId),
    VersionMismatch(u8, u8),
}

#[derive(Debug)]
struct Queue {
    items: [Option<Queued>; EVENT_QUEUE],
    head: usize,
    len: usize,
}

impl Queue {
    fn free(&self) -> usize {
        EVENT_QUEUE - self.len
    }
    fn push(&mut self, q: Queued) {
        if self.len < EVENT_QUEUE {
            self.items[(self.head + self.len) % EVENT_QUEUE] = Some(q);
            self.len += 1;
        }
    }
    fn peek(&self) -> Option<Queued> {
        if self.len == 0 {
            None
        } else {
            self.items[self.head]
        }
    }
    fn pop(&mut self) -> Option<Queued> {
        let q = self.peek()?;
        self.head = (self.head + 1) % EVENT_QUEUE;
        self.len -= 1;
        Some(q)
    }
}

/// Outgoing bytes: encoded frames waiting to be written to the line.
#[derive(Debug)]
struct TxBuf<B> {
    buf: B,
    head: usize,
    tail: usize,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> TxBuf<B> {
    fn capacity(&self) -> usize {
        self.buf.as_ref().len()
    }

    fn pending(&self) -> &[u8] {
        &self.buf.as_ref()[self.head..self.tail]
    }

    fn consume(&mut self, n: usize) {
        self.head = self.head.saturating_add(n).min(self.tail);
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Appends a frame if it fits while leaving `reserve` bytes free.
    fn write(&mut self, frame: &Frame<'_>, reserve: usize) -> bool {
        if self.head > 0 {
            self.buf.as_mut().copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let limit = self.capacity().saturating_sub(reserve);
        if self.tail >= limit {
            return false;
        }
        match frame.encode(&mut self.buf.as_mut()[self.tail..limit]) {
            Some(n) => {
                self.tail += n;
                true
            }
            None => false,
        }
    }
}

/// "`a` comes after `b`" in wrapping u32 sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Everything but the receive decoder, so a frame borrowed from the decoder can be
/// handled while the rest of the state changes.
#[derive(Debug)]
struct Core<B> {
    tx: TxBuf<B>,
    own_id: Text,
    own_fw: Text,
    max_frame: u32,
    window: u16,
    hello_interval: u64,
    ack_timeout: u64,
    heartbeat: Heartbeat,
    now: u64,
    connected: bool,
    /// A session frame (not HELLO/HELLO-ACK) arrived in this session: a HELLO after that is
    /// a restart, before it only a retry of the HELLO that started the session.
    session_active: bool,
    peer: PeerInfo,
    next_hello: u64,
    next_id: u32,
    peer_released: u32,
    released: u32,
    advertised: u32,
    owe_ping: bool,
    owe_pong: bool,
    owe_credit: bool,
    pending: [Option<(MsgId, u64)>; MAX_PENDING],
    queue: Queue,
    /// The decoder holds a MSG or REPLY not yet returned by `poll_event`.
    frame_event: bool,
    mismatch_reported: bool,
    stats: Stats,
    /// When the PING in flight left, for [`Stats::rtt_ms`].
    ping_sent: Option<u64>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Core<B> {
    fn flow(&self) -> FlowState {
        FlowState {
            next_id: self.next_id,
            released: self.released,
        }
    }

    fn window_full(&self) -> bool {
        self.next_id.wrapping_sub(self.peer_released) >= u32::from(self.peer.window)
    }

    fn reset_session(&mut self) {
        self.next_id = 0;
        self.peer_released = 0;
        self.released = 0;
        self.advertised = 0;
        self.owe_ping = false;
        self.owe_pong = false;
        self.owe_credit = false;
        self.pending = [None; MAX_PENDING];
        self.session_active = false;
    }

    fn count_tx(&mut self, written: bool) -> bool {
        if written {
            self.stats.frames_tx = self.stats.frames_tx.wrapping_add(1);
        }
        written
    }

    /// Writes HELLO or HELLO-ACK. Unsent bytes of the old session are dropped (the peer
    /// would discard them anyway) and a 0x00 first ends any partial frame on the line.
    fn send_handshake(&mut self, ack: bool) {
        self.tx.head = 0;
        self.tx.tail = 0;
        if let Some(b) = self.tx.buf.as_mut().first_mut() {
            *b = 0;
            self.tx.tail = 1;
        }
        let hello = Hello {
            version_min: MIN_PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            max_frame: self.max_frame,
            window: self.window,
            device_id: self.own_id.as_str(),
            firmware_version: self.own_fw.as_str(),
        };
        let frame = if ack {
            Frame::HelloAck(hello)
        } else {
            Frame::Hello(hello)
        };
        let ok = self.tx.write(&frame, 0);
        self.count_tx(ok);
    }

    fn disconnect(&mut self, reason: DisconnectReason) {
        self.connected = false;
        self.reset_session();
        self.queue.push(Queued::Disconnected(reason));
        self.send_handshake(false);
        self.next_hello = self.now.saturating_add(self.hello_interval);
    }

    fn on_frame(&mut self, frame: Frame<'_>) {
        if let Frame::Hello(h) = frame {
            return self.on_hello(h, true);
        }
        if let Frame::HelloAck(h) = frame {
            return self.on_hello(h, false);
        }
        if !self.connected {
            self.stats.not_connected = self.stats.not_connected.wrapping_add(1);
            return;
        }
        self.heartbeat.received(self.now);
        self.session_active = true;
        match frame {
            Frame::Hello(_) | Frame::HelloAck(_) => {}
            Frame::Ping(f) => {
                self.on_flow(f);
                self.owe_pong = true;
            }
            Frame::Pong(f) => {
                if let Some(sent) = self.ping_sent.take() {
                    self.stats.rtt_ms = u32::try_from(self.now.saturating_sub(sent)).unwrap_or(u32::MAX);
                }
                self.on_flow(f);
            }
            Frame::Credit { released } => self.on_released(released),
            Frame::Msg { id, .. } => {
                if !after(self.released, id.0) {
                    self.released = id.0.wrapping_add(1);
                    self.check_credit();
                }
                self.frame_event = true;
            }
            Frame::Ack(id) => self.on_response(id, Queued::Acked(id)),
            Frame::Nack(id, reason) => self.on_response(id, Queued::Nacked(id, reason)),
            Frame::Reply(id, _) => {
                if self.take_pending(id) {
                    self.frame_event = true;
                } else {
                    self.stats.unexpected = self.stats.unexpected.wrapping_add(1);
                }
            }
        }
    }

    fn on_response(&mut self, id: MsgId, event: Queued) {
        if self.take_pending(id) {
            self.queue.push(event);
        } else {
            self.stats.unexpected = self.stats.unexpected.wrapping_add(1);
        }
    }

    fn take_pending(&mut self, id: MsgId) -> bool {
        match self
            .pending
            .iter_mut()
            .find(|p| matches!(p, Some((pid, _)) if *pid == id))
        {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }

    fn on_hello(&mut self, h: Hello<'_>, is_hello: bool) {
        if !is_hello && self.connected {
            // Answer to a HELLO retry, or the crossing answer of a simultaneous handshake.
            return;
        }
        if h.version_min > h.version_max || (h.max_frame as usize) < MIN_FRAME || h.window == 0 {
            self.stats.malformed = self.stats.malformed.wrapping_add(1);
            return;
        }
        let version = PROTOCOL_VERSION.min(h.version_max);
        if version < MIN_PROTOCOL_VERSION.max(h.version_min) {
            self.stats.version_errors = self.stats.version_errors.wrapping_add(1);
            if self.connected {
                self.disconnect(DisconnectReason::PeerRestarted);
            }
            if !self.mismatch_reported {
                self.mismatch_reported = true;
                self.queue
                    .push(Queued::VersionMismatch(h.version_min, h.version_max));
            }
            return;
        }
        let (Some(device_id), Some(firmware_version)) =
            (Text::new(h.device_id), Text::new(h.firmware_version))
        else {
            self.stats.malformed = self.stats.malformed.wrapping_add(1);
            return;
        };
        if self.connected && !self.session_active {
            // A retried HELLO from before the peer saw our answer: answer again, keep the session.
            self.send_handshake(true);
            return;
        }
        if self.connected {
            self.queue
                .push(Queued::Disconnected(DisconnectReason::PeerRestarted));
        }
        self.reset_session();
        self.peer = PeerInfo {
            device_id,
            firmware_version,
            version,
            max_frame: h.max_frame,
            window: h.window,
        };
        self.connected = true;
        self.mismatch_reported = false;
        self.heartbeat.start(self.now);
        self.queue.push(Queued::Connected);
        if is_hello {
            self.send_handshake(true);
        }
    }

    fn on_flow(&mut self, f: FlowState) {
        self.on_released(f.released);
        // Every peer MSG below its next_id was sent before this frame, so any we have not
        // seen were lost: release their slots rather than hold them forever.
        if after(f.next_id, self.released) {
            self.released = f.next_id;
            self.check_credit();
        }
    }

    fn on_released(&mut self, released: u32) {
        if after(released, self.peer_released) && !after(released, self.next_id) {
            self.peer_released = released;
        }
    }

    fn check_credit(&mut self) {
        let threshold = u32::from(self.window / 2).max(1);
        if self.released.wrapping_sub(self.advertised) >= threshold {
            self.owe_credit = true;
        }
    }

    fn flush_owed(&mut self) {
        if !self.connected {
            return;
        }
        for kind in 0..3 {
            let (owed, frame) = match kind {
                0 => (self.owe_pong, Frame::Pong(self.flow())),
                1 => (self.owe_ping, Frame::Ping(self.flow())),
                _ => (
                    self.owe_credit,
                    Frame::Credit {
                        released: self.released,
                    },
                ),
            };
            if owed && self.tx.write(&frame, 0) {
                self.count_tx(true);
                self.advertised = self.released;
                match kind {
                    0 => self.owe_pong = false,
                    1 => {
                        self.owe_ping = false;
                        self.ping_sent = Some(self.now);
                    }
                    _ => self.owe_credit = false,
                }
            }
        }
        // A PING or PONG just carried the latest state: a separate CREDIT is redundant.
        if self.advertised == self.released {
            self.owe_credit = false;
        }
    }

    /// Largest frame content this end can send now that the peer's limit is known.
    fn max_send_content(&self) -> usize {
        let avail = self.tx.capacity().saturating_sub(CONTROL_RESERVE + 2);
        (avail / 255 * 254 + avail % 255).min(self.peer.max_frame as usize)
    }

    fn write_data(&mut self, frame: &Frame<'_>) -> Result<(), SendError> {
        if !self.connected {
            return Err(SendError::NotConnected);
        }
        if frame.content_len() > self.max_send_content() {
            return Err(SendError::TooLarge);
        }
        if self.tx.write(frame, CONTROL_RESERVE) {
            self.count_tx(true);
            Ok(())
        } else {
            Err(SendError::TxFull)
        }
    }

    fn expand(&self, q: Queued) -> Event<'_> {
        match q {
            Queued::Connected => Event::Connected(&self.peer),
            Queued::Disconnected(r) => Event::Disconnected(r),
            Queued::Acked(id) => Event::Acked(id),
            Queued::Nacked(id, r) => Event::Nacked(id, r),
            Queued::TimedOut(id) => Event::TimedOut(id),
            Queued::VersionMismatch(peer_min, peer_max) => {
                Event::VersionMismatch { peer_min, peer_max }
            }
        }
    }
}

/// One end of a device link, over a receive buffer and a transmit buffer of type `B`
/// (`[u8; N]` or `&mut [u8]` on firmware, `Vec<u8>` on a host).
///
/// Drive it with [`receive`](Link::receive) (bytes from the line), [`tick`](Link::tick)
/// (time), [`poll_event`](Link::poll_event) (until `None`) and
/// [`poll_transmit`](Link::poll_transmit)/[`transmitted`](Link::transmitted) (bytes to the line).
#[derive(Debug)]
pub struct Link<B> {
    rx: FrameDecoder<B>,
    core: Core<B>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Link<B> {
    /// A disconnected link; the first `tick` sends HELLO. `rx_buf.len()` is the largest
    /// frame content accepted (announced to the peer as `max_frame`).
    pub fn new(config: &Config<'_>, rx_buf: B, tx_buf: B) -> Result<Self, ConfigError> {
        if rx_buf.as_ref().len() < MIN_FRAME {
            return Err(ConfigError::RxBufferTooSmall);
        }
        if tx_buf.as_ref().len() < MIN_TX_BUFFER {
            return Err(ConfigError::TxBufferTooSmall);
        }
        let (Some(own_id), Some(own_fw)) = (
            Text::new(config.device_id),
            Text::new(config.firmware_version),
        ) else {
            return Err(ConfigError::TextTooLong);
        };
        if config.window == 0
            || config.hello_interval_ms == 0
            || config.heartbeat_interval_ms == 0
            || config.timeout_ms == 0
            || config.ack_timeout_ms == 0
        {
            return Err(ConfigError::BadTiming);
        }
        let max_frame = u32::try_from(rx_buf.as_ref().len()).unwrap_or(u32::MAX);
        Ok(Link {
            rx: FrameDecoder::new(rx_buf),
            core: Core {
                tx: TxBuf {
                    buf: tx_buf,
                    head: 0,
                    tail: 0,
                },
                own_id,
                own_fw,
                max_frame,
                window: config.window,
                hello_interval: config.hello_interval_ms.into(),
                ack_timeout: config.ack_timeout_ms.into(),
                heartbeat: Heartbeat::new(config.heartbeat_interval_ms, config.timeout_ms),
                now: 0,
                connected: false,
                session_active: false,
                peer: PeerInfo {
                    device_id: Text::EMPTY,
                    firmware_version: Text::EMPTY,
                    version: 0,
                    max_frame: 0,
                    window: 0,
                },
                next_hello: 0,
                next_id: 0,
                peer_released: 0,
                released: 0,
                advertised: 0,
                owe_ping: false,
                owe_pong: false,
                owe_credit: false,
                pending: [None; MAX_PENDING],
                queue: Queue {
                    items: [None; EVENT_QUEUE],
                    head: 0,
                    len: 0,
                },
                frame_event: false,
                mismatch_reported: false,
                stats: Stats::default(),
                ping_sent: None,
            },
        })
    }

    /// Feeds bytes read from the line; returns how many were consumed. It stops early when
    /// an event must be collected first: call [`poll_event`](Link::poll_event) until `None`,
    /// then feed the rest. Consumes nothing while an event is waiting.
    pub fn receive(&mut self, now_ms: u64, input: &[u8]) -> usize {
        self.core.now = self.core.now.max(now_ms);
        let mut used = 0;
        // Each frame queues at most two events.
        while used < input.len() && !self.core.frame_event && self.core.queue.free() >= 2 {
            let (n, out) = self.rx.feed(&input[used..]);
            used += n;
            if let Some(Ok(content)) = out {
                match Frame::parse(content) {
                    Ok(frame) => self.core.on_frame(frame),
                    Err(FrameError::Malformed) => {
                        self.core.stats.malformed = self.core.stats.malformed.wrapping_add(1)
                    }
                    Err(FrameError::UnknownType(_)) => {
                        self.core.stats.unknown_type = self.core.stats.unknown_type.wrapping_add(1)
                    }
                }
            }
        }
        self.core.flush_owed();
        used
    }

    /// Advances time: sends HELLO while disconnected, PINGs when quiet, declares the peer
    /// gone after `timeout_ms` of silence and times out unanswered messages.
    pub fn tick(&mut self, now_ms: u64) {
        let c = &mut self.core;
        c.now = c.now.max(now_ms);
        if !c.connected {
            if c.now >= c.next_hello {
                c.send_handshake(false);
                c.next_hello = c.now.saturating_add(c.hello_interval);
            }
            return;
        }
        let stalled = c.window_full();
        match c.heartbeat.poll(c.now, stalled) {
            HeartbeatAction::Dead => return c.disconnect(DisconnectReason::Timeout),
            HeartbeatAction::SendPing => c.owe_ping = true,
            HeartbeatAction::Idle => {}
        }
        for i in 0..MAX_PENDING {
            if let Some((id, deadline)) = c.pending[i]
                && deadline <= c.now
                && c.queue.free() > 0
            {
                c.pending[i] = None;
                c.queue.push(Queued::TimedOut(id));
            }
        }
        c.flush_owed();
    }

    /// The next event, if any. Events borrowing the receive buffer (`Message`, `Reply`)
    /// stay valid until the next `&mut self` call.
    pub fn poll_event(&mut self) -> Option<Event<'_>> {
        if let Some(q) = self.core.queue.pop() {
            return Some(self.core.expand(q));
        }
        if core::mem::take(&mut self.core.frame_event) {
            return frame_event(&self.rx);
        }
        None
    }

    /// The event `poll_event` would return, without consuming it.
    pub fn peek_event(&self) -> Option<Event<'_>> {
        if let Some(q) = self.core.queue.peek() {
            return Some(self.core.expand(q));
        }
        if self.core.frame_event {
            frame_event(&self.rx)
        } else {
            None
        }
    }

    /// Whether `poll_event` has something.
    pub fn has_event(&self) -> bool {
        self.core.queue.len > 0 || self.core.frame_event
    }

    /// Bytes to write to the line (empty if none); confirm with [`transmitted`](Link::transmitted).
    pub fn poll_transmit(&mut self) -> &[u8] {
        self.core.flush_owed();
        self.core.tx.pending()
    }

    /// Marks the first `n` bytes from `poll_transmit` as written.
    pub fn transmitted(&mut self, n: usize) {
        self.core.tx.consume(n);
    }

    /// Sends a message; with `ack_requested` the peer answers with ACK, NACK or REPLY
    /// (reported as events, or `TimedOut`). The payload should be one CBOR item.
    pub fn send(
        &mut self,
        name: &str,
        payload: &[u8],
        ack_requested: bool,
    ) -> Result<MsgId, SendError> {
        let c = &mut self.core;
        if !c.connected {
            return Err(SendError::NotConnected);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(SendError::NameTooLong);
        }
        let id = MsgId(c.next_id);
        let frame = Frame::Msg {
            id,
            ack_requested,
            name,
            payload,
        };
        if frame.content_len() > c.max_send_content() {
            return Err(SendError::TooLarge);
        }
        if c.window_full() {
            return Err(SendError::WindowFull);
        }
        let slot = if ack_requested {
            Some(
                c.pending
                    .iter()
                    .position(Option::is_none)
                    .ok_or(SendError::TooManyPending)?,
            )
        } else {
            None
        };
        c.write_data(&frame)?;
        if let Some(i) = slot {
            c.pending[i] = Some((id, c.now.saturating_add(c.ack_timeout)));
        }
        c.next_id = c.next_id.wrapping_add(1);
        Ok(id)
    }

    /// Answers a message with a payload (which also acknowledges it).
    pub fn reply(&mut self, id: MsgId, payload: &[u8]) -> Result<(), SendError> {
        self.core.write_data(&Frame::Reply(id, payload))
    }

    /// Acknowledges a message.
    pub fn ack(&mut self, id: MsgId) -> Result<(), SendError> {
        self.control(&Frame::Ack(id))
    }

    /// Refuses a message.
    pub fn nack(&mut self, id: MsgId, reason: NackReason) -> Result<(), SendError> {
        self.control(&Frame::Nack(id, reason))
    }

    fn control(&mut self, frame: &Frame<'_>) -> Result<(), SendError> {
        let c = &mut self.core;
        if !c.connected {
            return Err(SendError::NotConnected);
        }
        if c.tx.write(frame, 0) {
            c.count_tx(true);
            Ok(())
        } else {
            Err(SendError::TxFull)
        }
    }

    /// Whether a session is up.
    pub fn is_connected(&self) -> bool {
        self.core.connected
    }

    /// The peer, while connected.
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.core.connected.then_some(&self.core.peer)
    }

    /// Whether `send` would pass the flow-control window now.
    pub fn can_send(&self) -> bool {
        self.core.connected && !self.core.window_full()
    }

    /// Largest payload a message named `name` may carry on this link now (0 if not connected).
    pub fn max_payload_len(&self, name: &str) -> usize {
        if !self.core.connected {
            return 0;
        }
        self.core
            .max_send_content()
            .saturating_sub(MSG_OVERHEAD + name.len())
    }

    /// Messages awaiting ACK/NACK/REPLY.
    pub fn pending_count(&self) -> usize {
        self.core.pending.iter().filter(|p| p.is_some()).count()
    }

    /// When `tick` next has something to do (ms, same clock as `now_ms`).
    pub fn next_deadline(&self) -> u64 {
        let c = &self.core;
        if !c.connected {
            return c.next_hello;
        }
        c.pending
            .iter()
            .flatten()
            .map(|&(_, d)| d)
            .fold(c.heartbeat.next_deadline(), u64::min)
    }

    /// Frame and error counters.
    pub fn stats(&self) -> Stats {
        let DecodeCounts {
            crc,
            cobs,
            oversize,
            too_short,
            frames,
        } = self.rx.counts();
        Stats {
            frames_rx: frames,
            crc_errors: crc,
            cobs_errors: cobs,
            oversize,
            malformed: self.core.stats.malformed.wrapping_add(too_short),
            ..self.core.stats
        }
    }
}

#[cfg(feature = "alloc")]
impl Link<alloc::vec::Vec<u8>> {
    /// A heap-backed link accepting frames of up to `max_frame` bytes, with room to queue
    /// two such frames for sending.
    pub fn with_capacity(config: &Config<'_>, max_frame: usize) -> Result<Self, ConfigError> {
        let tx = 2 * max_encoded_len(max_frame) + CONTROL_RESERVE;
        Link::new(config, alloc::vec![0; max_frame], alloc::vec![0; tx])
    }
}

fn frame_event<B: AsRef<[u8]> + AsMut<[u8]>>(rx: &FrameDecoder<B>) -> Option<Event<'_>> {
    match Frame::parse(rx.last_frame()?).ok()? {
        Frame::Msg {
            id,
            ack_requested,
            name,
            payload,
        } => Some(Event::Message(Message {
            id,
            wants_ack: ack_requested,
            name,
            payload,
        })),
        Frame::Reply(id, payload) => Some(Event::Reply(id, payload)),
        _ => None,
    }
}

#[cfg(feature = "alloc")]
pub use owned::OwnedEvent;

#[cfg(feature = "alloc")]
mod owned {
    use super::{DisconnectReason, Event, MsgId, NackReason, PeerInfo};
    use alloc::string::String;
    use alloc::vec::Vec;

    /// An [`Event`] that owns its data, for queues and async tasks.
    #[derive(Clone, Debug, PartialEq)]
    pub enum OwnedEvent {
        /// See [`Event::Connected`].
        Connected(PeerInfo),
        /// See [`Event::Disconnected`].
        Disconnected(DisconnectReason),
        /// See [`Event::Message`].
        Message {
            /// Id to answer.
            id: MsgId,
            /// The sender wants an ACK, NACK or REPLY.
            wants_ack: bool,
            /// Message name.
            name: String,
            /// CBOR payload.
            payload: Vec<u8>,
        },
        /// See [`Event::Acked`].
        Acked(MsgId),
        /// See [`Event::Nacked`].
        Nacked(MsgId, NackReason),
        /// See [`Event::Reply`].
        Reply(MsgId, Vec<u8>),
        /// See [`Event::TimedOut`].
        TimedOut(MsgId),
        /// See [`Event::VersionMismatch`].
        VersionMismatch {
            /// Oldest version the peer speaks.
            peer_min: u8,
            /// Newest version the peer speaks.
            peer_max: u8,
        },
    }

    impl Event<'_> {
        /// Copies the borrowed data out.
        pub fn to_owned(&self) -> OwnedEvent {
            match *self {
                Event::Connected(p) => OwnedEvent::Connected(*p),
                Event::Disconnected(r) => OwnedEvent::Disconnected(r),
                Event::Message(m) => OwnedEvent::Message {
                    id: m.id,
                    wants_ack: m.wants_ack,
                    name: m.name.into(),
                    payload: m.payload.to_vec(),
                },
                Event::Acked(id) => OwnedEvent::Acked(id),
                Event::Nacked(id, r) => OwnedEvent::Nacked(id, r),
                Event::Reply(id, p) => OwnedEvent::Reply(id, p.to_vec()),
                Event::TimedOut(id) => OwnedEvent::TimedOut(id),
                Event::VersionMismatch { peer_min, peer_max } => {
                    OwnedEvent::VersionMismatch { peer_min, peer_max }
                }
            }
        }
    }
}
