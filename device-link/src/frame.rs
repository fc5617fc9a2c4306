//! Frame types and their body layouts (all integers little-endian).

use core::fmt;

use crate::framing::{CRC_LEN, FrameWriter, max_encoded_len};

/// Frame type byte values, the first byte of every frame's content.
pub mod kind {
    /// Handshake offer: "I (re)started, here is who I am".
    pub const HELLO: u8 = 0x01;
    /// Handshake answer to a HELLO.
    pub const HELLO_ACK: u8 = 0x02;
    /// Heartbeat request, also carries flow-control state.
    pub const PING: u8 = 0x03;
    /// Heartbeat answer, also carries flow-control state.
    pub const PONG: u8 = 0x04;
    /// Flow-control update: returns window slots to the sender.
    pub const CREDIT: u8 = 0x05;
    /// Named application message.
    pub const MSG: u8 = 0x10;
    /// Positive acknowledgement of a MSG.
    pub const ACK: u8 = 0x11;
    /// Negative acknowledgement of a MSG.
    pub const NACK: u8 = 0x12;
    /// Reply to a MSG (implies acknowledgement).
    pub const REPLY: u8 = 0x13;
}

/// MSG flag bit: the sender wants exactly one ACK, NACK or REPLY back.
pub const FLAG_ACK_REQUESTED: u8 = 0x01;

/// Longest device id and firmware version string in a HELLO, in bytes.
pub const MAX_TEXT_LEN: usize = 32;

/// Longest message name, in bytes (its length travels in one byte).
pub const MAX_NAME_LEN: usize = 255;

/// Bytes of a MSG frame's content that are not name or payload: type, id, flags, name length, CRC.
pub const MSG_OVERHEAD: usize = 1 + 4 + 1 + 1 + CRC_LEN;

/// Bytes of a REPLY frame's content that are not payload: type, id, CRC.
pub const REPLY_OVERHEAD: usize = 1 + 4 + CRC_LEN;

/// Largest HELLO content, CRC included, this implementation sends.
pub const MAX_HELLO_LEN: usize = 1 + 1 + 1 + 4 + 2 + 1 + MAX_TEXT_LEN + 1 + MAX_TEXT_LEN + CRC_LEN;

/// Identifier of a MSG, unique per direction within one session (sequential, wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub u32);

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a receiver refused a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// No handler is registered for the message name (MessageManager's "No handler error").
    NoHandler,
    /// The message is too large for the receiver to handle.
    TooLarge,
    /// The receiver cannot take the message now; the sender may retry later.
    Busy,
    /// The payload is not valid CBOR of the supported subset.
    BadPayload,
    /// A reason code this implementation does not know (kept for forward compatibility).
    Other(u8),
}

impl NackReason {
    /// Wire code of the reason.
    pub const fn code(self) -> u8 {
        match self {
            NackReason::NoHandler => 1,
            NackReason::TooLarge => 2,
            NackReason::Busy => 3,
            NackReason::BadPayload => 4,
            NackReason::Other(c) => c,
        }
    }

    /// Reason for a wire code.
    pub const fn from_code(c: u8) -> Self {
        match c {
            1 => NackReason::NoHandler,
            2 => NackReason::TooLarge,
            3 => NackReason::Busy,
            4 => NackReason::BadPayload,
            c => NackReason::Other(c),
        }
    }
}

impl fmt::Display for NackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NackReason::NoHandler => f.write_str("no handler"),
            NackReason::TooLarge => f.write_str("too large"),
            NackReason::Busy => f.write_str("busy"),
            NackReason::BadPayload => f.write_str("bad payload"),
            NackReason::Other(c) => write!(f, "reason {c}"),
        }
    }
}

/// Body of HELLO and HELLO-ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Oldest protocol version the sender speaks.
    pub version_min: u8,
    /// Newest protocol version the sender speaks.
    pub version_max: u8,
    /// Largest frame content (type + body + CRC, before COBS) the sender accepts.
    pub max_frame: u32,
    /// MSG frames the sender accepts in flight before it returns credit.
    pub window: u16,
    /// Device id (a host sends its own name).
    pub device_id: &'a str,
    /// Firmware (or host software) version.
    pub firmware_version: &'a str,
}

/// Flow-control state carried by PING and PONG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// Id the sender will give its next MSG: every MSG with a lower id was sent before this frame.
    pub next_id: u32,
    /// Every MSG from the peer with a lower id has been processed (or was lost) by the sender.
    pub released: u32,
}

/// One decoded frame, borrowing strings and payloads from the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Handshake offer.
    Hello(Hello<'a>),
    /// Handshake answer.
    HelloAck(Hello<'a>),
    /// Heartbeat request.
    Ping(FlowState),
    /// Heartbeat answer.
    Pong(FlowState),
    /// Flow-control update: peer MSG ids below `released` are processed.
    Credit {
        /// See [`FlowState::released`].
        released: u32,
    },
    /// Application message.
    Msg {
        /// Message id.
        id: MsgId,
        /// Whether an ACK/NACK/REPLY is wanted.
        ack_requested: bool,
        /// Message name (UTF-8, up to 255 bytes).
        name: &'a str,
        /// CBOR payload.
        payload: &'a [u8],
    },
    /// Positive acknowledgement.
    Ack(MsgId),
    /// Negative acknowledgement.
    Nack(MsgId, NackReason),
    /// Reply with a CBOR payload.
    Reply(MsgId, &'a [u8]),
}

/// Why a CRC-valid frame could not be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The body does not match the layout of its type.
    Malformed,
    /// The type byte is not one this implementation knows.
    UnknownType(u8),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Malformed => f.write_str("malformed frame body"),
            FrameError::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
        }
    }
}

impl core::error::Error for FrameError {}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn short_str(&mut self, max: usize) -> Result<&'a str, FrameError> {
        let n = usize::from(self.u8()?);
        if n > max {
            return Err(FrameError::Malformed);
        }
        core::str::from_utf8(self.take(n)?).map_err(|_| FrameError::Malformed)
    }
    fn end(self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed)
        }
    }
}

impl<'a> Frame<'a> {
    /// Parses a frame's content (type byte and body, CRC already checked and removed).
    pub fn parse(content: &'a [u8]) -> Result<Self, FrameError> {
        let (&ty, body) = content.split_first().ok_or(FrameError::Malformed)?;
        let mut c = Cursor(body);
        let frame = match ty {
            kind::HELLO | kind::HELLO_ACK => {
                let h = Hello {
                    version_min: c.u8()?,
                    version_max: c.u8()?,
                    max_frame: c.u32()?,
                    window: c.u16()?,
                    device_id: c.short_str(MAX_TEXT_LEN)?,
                    firmware_version: c.short_str(MAX_TEXT_LEN)?,
                };
                // Later versions may append fields to HELLO: the tail is ignored, not an error.
                return Ok(if ty == kind::HELLO {
                    Frame::Hello(h)
                } else {
                    Frame::HelloAck(h)
                });
            }
            kind::PING | kind::PONG => {
                let f = FlowState {
                    next_id: c.u32()?,
                    released: c.u32()?,
                };
                if ty == kind::PING {
                    Frame::Ping(f)
                } else {
                    Frame::Pong(f)
                }
            }
            kind::CREDIT => Frame::Credit { released: c.u32()? },
            kind::MSG => {
                let id = MsgId(c.u32()?);
                // Unknown flag bits are reserved for later versions and ignored.
                let flags = c.u8()?;
                let name = c.short_str(MAX_NAME_LEN)?;
                return Ok(Frame::Msg {
                    id,
                    ack_requested: flags & FLAG_ACK_REQUESTED != 0,
                    name,
                    payload: c.0,
                });
            }
            kind::ACK => Frame::Ack(MsgId(c.u32()?)),
            kind::NACK => Frame::Nack(MsgId(c.u32()?), NackReason::from_code(c.u8()?)),
            kind::REPLY => return Ok(Frame::Reply(MsgId(c.u32()?), c.0)),
            t => return Err(FrameError::UnknownType(t)),
        };
        c.end()?;
        Ok(frame)
    }

    /// Length of this frame's content, CRC included (what the peer's `max_frame` limits).
    pub fn content_len(&self) -> usize {
        CRC_LEN
            + match self {
                Frame::Hello(h) | Frame::HelloAck(h) => {
                    1 + 1 + 1 + 4 + 2 + 1 + h.device_id.len() + 1 + h.firmware_version.len()
                }
                Frame::Ping(_) | Frame::Pong(_) => 9,
                Frame::Credit { .. } | Frame::Ack(_) => 5,
                Frame::Nack(..) => 6,
                Frame::Msg { name, payload, .. } => {
                    MSG_OVERHEAD - CRC_LEN + name.len() + payload.len()
                }
                Frame::Reply(_, payload) => REPLY_OVERHEAD - CRC_LEN + payload.len(),
            }
    }

    /// Worst-case wire size of this frame (COBS and delimiter included).
    pub fn max_encoded_len(&self) -> usize {
        max_encoded_len(self.content_len())
    }

    /// Writes the frame (content, CRC, COBS, trailing 0x00) into `out`. Returns the bytes
    /// written, or `None` if `out` is too small or a string exceeds its length limit.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = FrameWriter::new(out);
        match self {
            Frame::Hello(h) | Frame::HelloAck(h) => {
                if h.device_id.len() > MAX_TEXT_LEN || h.firmware_version.len() > MAX_TEXT_LEN {
                    return None;
                }
                let ty = if matches!(self, Frame::Hello(_)) {
                    kind::HELLO
                } else {
                    kind::HELLO_ACK
                };
                w.push(&[ty, h.version_min, h.version_max]);
                w.push(&h.max_frame.to_le_bytes());
                w.push(&h.window.to_le_bytes());
                w.push(&[h.device_id.len() as u8]);
                w.push(h.device_id.as_bytes());
                w.push(&[h.firmware_version.len() as u8]);
                w.push(h.firmware_version.as_bytes());
            }
            Frame::Ping(f) | Frame::Pong(f) => {
                w.push(&[if matches!(self, Frame::Ping(_)) {
                    kind::PING
                } else {
                    kind::PONG
                }]);
                w.push(&f.next_id.to_le_bytes());
                w.push(&f.released.to_le_bytes());
            }
            Frame::Credit { released } => {
                w.push(&[kind::CREDIT]);
                w.push(&released.to_le_bytes());
            }
            Frame::Msg {
                id,
                ack_requested,
                name,
                payload,
            } => {
                let name_len = u8::try_from(name.len()).ok()?;
                w.push(&[kind::MSG]);
                w.push(&id.0.to_le_bytes());
                w.push(&[
                    if *ack_requested {
                        FLAG_ACK_REQUESTED
                    } else {
                        0
                    },
                    name_len,
                ]);
                w.push(name.as_bytes());
                w.push(payload);
            }
            Frame::Ack(id) => {
                w.push(&[kind::ACK]);
                w.push(&id.0.to_le_bytes());
            }
            Frame::Nack(id, reason) => {
                w.push(&[kind::NACK]);
                w.push(&id.0.to_le_bytes());
                w.push(&[reason.code()]);
            }
            Frame::Reply(id, payload) => {
                w.push(&[kind::REPLY]);
                w.push(&id.0.to_le_bytes());
                w.push(payload);
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::FrameDecoder;

    fn all_frames() -> [Frame<'static>; 11] {
        let hello = Hello {
            version_min: 1,
            version_max: 3,
            max_frame: 4096,
            window: 8,
            device_id: "dev-\u{e9}42",
            firmware_version: "1.2.3",
        };
        [
            Frame::Hello(hello),
            Frame::HelloAck(Hello {
                device_id: "",
                firmware_version: "",
                ..hello
            }),
            Frame::Ping(FlowState {
                next_id: 7,
                released: u32::MAX,
            }),
            Frame::Pong(FlowState {
                next_id: 0,
                released: 1,
            }),
            Frame::Credit {
                released: 0x0102_0304,
            },
            Frame::Msg {
                id: MsgId(1),
                ack_requested: true,
                name: "temp",
                payload: &[0xF6],
            },
            Frame::Msg {
                id: MsgId(u32::MAX),
                ack_requested: false,
                name: "",
                payload: &[],
            },
            Frame::Ack(MsgId(0)),
            Frame::Nack(MsgId(5), NackReason::NoHandler),
            Frame::Nack(MsgId(6), NackReason::Other(200)),
            Frame::Reply(MsgId(9), &[0x00, 0x00, 0x01]),
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        for frame in all_frames() {
            let mut wire = [0u8; 256];
            let n = frame.encode(&mut wire).unwrap();
            assert!(n <= frame.max_encoded_len());
            let mut dec = FrameDecoder::new([0u8; 256]);
            let (used, out) = dec.feed(&wire[..n]);
            assert_eq!(used, n);
            let content = out.unwrap().unwrap();
            assert_eq!(content.len() + CRC_LEN, frame.content_len());
            assert_eq!(Frame::parse(content), Ok(frame));
        }
    }

    #[test]
    fn spec_worked_examples() {
        let mut out = [0u8; 64];
        let n = Frame::Ack(MsgId(1)).encode(&mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[
                0x03, 0x11, 0x01, 0x01, 0x01, 0x05, 0x4A, 0x2E, 0x1E, 0x23, 0x00
            ]
        );
        let msg = Frame::Msg {
            id: MsgId(0),
            ack_requested: true,
            name: "led",
            payload: &[0xF5],
        };
        let n = msg.encode(&mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[
                0x02, 0x10, 0x01, 0x01, 0x01, 0x0B, 0x01, 0x03, 0x6C, 0x65, 0x64, 0xF5, 0x12, 0x35,
                0x27, 0xBA, 0x00
            ]
        );
    }

    #[test]
    fn nack_reasons_round_trip() {
        for c in 0..=255u8 {
            assert_eq!(NackReason::from_code(c).code(), c);
        }
    }

    #[test]
    fn bad_bodies_are_malformed_and_unknown_types_reported() {
        assert_eq!(Frame::parse(&[]), Err(FrameError::Malformed));
        assert_eq!(
            Frame::parse(&[0x7E, 1, 2]),
            Err(FrameError::UnknownType(0x7E))
        );
        assert_eq!(
            Frame::parse(&[kind::ACK, 1, 2, 3]),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            Frame::parse(&[kind::ACK, 1, 2, 3, 4, 5]),
            Err(FrameError::Malformed)
        );
        // MSG whose name length runs past the end.
        assert_eq!(
            Frame::parse(&[kind::MSG, 0, 0, 0, 0, 1, 9, b'a']),
            Err(FrameError::Malformed)
        );
        // MSG name that is not UTF-8.
        assert_eq!(
            Frame::parse(&[kind::MSG, 0, 0, 0, 0, 1, 1, 0xFF]),
            Err(FrameError::Malformed)
        );
        // HELLO with an over-long id.
        let mut hello = [0u8; 80];
        hello[0] = kind::HELLO;
        hello[9] = 33;
        assert_eq!(Frame::parse(&hello), Err(FrameError::Malformed));
    }

    #[test]
    fn hello_tail_is_ignored_for_forward_compatibility() {
        let content = [kind::HELLO, 1, 2, 0, 1, 0, 0, 4, 0, 1, b'x', 0, 0xAA, 0xBB];
        let Ok(Frame::Hello(h)) = Frame::parse(&content) else {
            panic!("not a hello")
        };
        assert_eq!(
            (h.version_min, h.version_max, h.max_frame, h.window),
            (1, 2, 256, 4)
        );
        assert_eq!(h.device_id, "x");
    }

    #[test]
    fn encode_rejects_overlong_strings() {
        let long = "x".repeat(33);
        let h = Hello {
            version_min: 1,
            version_max: 1,
            max_frame: 256,
            window: 1,
            device_id: &long,
            firmware_version: "",
        };
        assert_eq!(Frame::Hello(h).encode(&mut [0u8; 512]), None);
        let name = "n".repeat(256);
        let m = Frame::Msg {
            id: MsgId(0),
            ack_requested: false,
            name: &name,
            payload: &[],
        };
        assert_eq!(m.encode(&mut [0u8; 512]), None);
    }
}
