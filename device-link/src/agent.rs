//! Device SDK: an imp-style `agent` object for firmware, over any `embedded-io` byte stream
//! (a UART driver, or a pty/serial port through an adapter in tests and simulators).

use embedded_io::{Read, ReadReady, Write};

use crate::frame::MsgId;
use crate::link::{Event, Link, SendError};

#[cfg(feature = "alloc")]
use {
    crate::frame::NackReason,
    crate::value::Value,
    alloc::{boxed::Box, string::String, vec::Vec},
};

/// Reads per `poll`, so continuous line noise cannot keep `poll` from returning.
const MAX_READS_PER_POLL: usize = 8;
/// Bytes per read. With 64 a `poll` took at most 512 bytes, under one 1 KiB frame, and
/// host-to-device throughput fell to ~1 MB/s over a pty (device-bench); 256 costs little RAM.
const READ_CHUNK: usize = 256;

#[cfg(feature = "alloc")]
type Handler = Box<dyn FnMut(&Value) -> Option<Value>>;

/// The firmware's view of its agent: send named messages, handle named messages, and call
/// [`poll`](Agent::poll) from the main loop.
pub struct Agent<T, B> {
    io: T,
    link: Link<B>,
    rx: [u8; READ_CHUNK],
    rx_pos: usize,
    rx_len: usize,
    #[cfg(feature = "alloc")]
    handlers: Vec<(String, Handler)>,
}

impl<T, B> Agent<T, B>
where
    T: Read + ReadReady + Write,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// An agent speaking `link` over `io`.
    pub fn new(io: T, link: Link<B>) -> Self {
        Agent {
            io,
            link,
            rx: [0; READ_CHUNK],
            rx_pos: 0,
            rx_len: 0,
            #[cfg(feature = "alloc")]
            handlers: Vec::new(),
        }
    }

    /// The link, for its state and statistics.
    pub fn link(&self) -> &Link<B> {
        &self.link
    }

    /// The link, to `ack`/`nack`/`reply` messages returned by `poll`.
    pub fn link_mut(&mut self) -> &mut Link<B> {
        &mut self.link
    }

    /// Whether the agent side is connected.
    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// Sends a message whose payload is already CBOR (e.g. built with `cbor::Writer`).
    pub fn send_cbor(
        &mut self,
        name: &str,
        payload: &[u8],
        ack_requested: bool,
    ) -> Result<MsgId, SendError> {
        self.link.send(name, payload, ack_requested)
    }

    /// Sends a message without asking for acknowledgement, like imp's `agent.send(name, data)`.
    #[cfg(feature = "alloc")]
    pub fn send(&mut self, name: &str, data: &Value) -> Result<MsgId, SendError> {
        self.link.send(name, &data.encode(), false)
    }

    /// Registers the handler for `name`, replacing any previous one. It gets the decoded
    /// payload; returning `Some(v)` answers with REPLY `v`, `None` with ACK (when the sender
    /// asked for one). A payload that does not decode is answered with NACK `BadPayload`.
    #[cfg(feature = "alloc")]
    pub fn on(&mut self, name: &str, handler: impl FnMut(&Value) -> Option<Value> + 'static) {
        let handler: Handler = Box::new(handler);
        match self.handlers.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = handler,
            None => self.handlers.push((name.into(), handler)),
        }
    }

    /// One round of the main loop: writes pending bytes, reads what is available without
    /// blocking, runs handlers, advances timers. Returns the next event that no handler
    /// consumed (connection changes, acks, replies, timeouts, and messages without a
    /// handler, which the caller answers through `link_mut()` or lets time out); call again
    /// until it returns `None`.
    pub fn poll(&mut self, now_ms: u64) -> Result<Option<Event<'_>>, T::Error> {
        self.link.tick(now_ms);
        let mut reads = 0;
        loop {
            self.flush()?;
            #[cfg(feature = "alloc")]
            if self.dispatch_next() {
                continue;
            }
            if self.link.has_event() {
                break;
            }
            if self.rx_pos == self.rx_len {
                if reads == MAX_READS_PER_POLL || !self.io.read_ready()? {
                    break;
                }
                reads += 1;
                let n = self.io.read(&mut self.rx)?;
                if n == 0 {
                    break;
                }
                self.rx_pos = 0;
                self.rx_len = n;
            }
            self.rx_pos += self
                .link
                .receive(now_ms, &self.rx[self.rx_pos..self.rx_len]);
        }
        Ok(self.link.poll_event())
    }

    fn flush(&mut self) -> Result<(), T::Error> {
        loop {
            let out = self.link.poll_transmit();
            if out.is_empty() {
                return Ok(());
            }
            let n = self.io.write(out)?;
            if n == 0 {
                return Ok(());
            }
            self.link.transmitted(n);
        }
    }

    /// Runs the handler for the next event if it is a message with one; `true` if it did.
    #[cfg(feature = "alloc")]
    fn dispatch_next(&mut self) -> bool {
        let Some(Event::Message(m)) = self.link.peek_event() else {
            return false;
        };
        let Some(index) = self.handlers.iter().position(|(n, _)| n == m.name) else {
            return false;
        };
        let (id, wants_ack, data) = (m.id, m.wants_ack, Value::decode(m.payload));
        self.link.poll_event();
        let answer = match data {
            Ok(data) => (self.handlers[index].1)(&data),
            Err(_) => {
                if wants_ack {
                    let _ = self.link.nack(id, NackReason::BadPayload);
                }
                return true;
            }
        };
        if !wants_ack {
            return true;
        }
        // A lost answer only costs the sender a timeout, which it already handles.
        let _ = match answer {
            Some(reply) => match self.link.reply(id, &reply.encode()) {
                Err(SendError::TooLarge) => self.link.nack(id, NackReason::TooLarge),
                other => other,
            },
            None => self.link.ack(id),
        };
        true
    }
}
