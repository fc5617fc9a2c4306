#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
//! Wire protocol of the Tether serial device channel, shared by the host and device
//! firmware. The full specification is `docs/device-link.md`.
//!
//! Layers, bottom up:
//! - [`framing`]: COBS frames delimited by 0x00 with a CRC-32, and a streaming decoder.
//! - [`frame`]: frame types (HELLO, PING, MSG, ACK, ...) and their byte layouts.
//! - [`cbor`] / [`Value`]: the self-describing payload (imp data model as CBOR).
//! - [`Link`]: the sans-IO state machine both ends run: handshake, heartbeats, flow
//!   control, acknowledgements.
//! - [`Agent`]: a small device SDK over `embedded-io` streams.
//!
//! Features: `alloc` (default) adds `Value`, `OwnedEvent`, heap-backed links and agent
//! handlers; `serde` adds conversions between payloads and serde types.

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod agent;
pub mod cbor;
pub mod frame;
pub mod framing;
pub mod heartbeat;
pub mod link;
#[cfg(feature = "serde")]
mod serde_support;
#[cfg(feature = "alloc")]
mod value;

pub use agent::Agent;
pub use cbor::CborError;
pub use frame::{Frame, MsgId, NackReason};
pub use framing::{DecodeError, FrameDecoder};
pub use heartbeat::{Heartbeat, HeartbeatAction};
#[cfg(feature = "alloc")]
pub use link::OwnedEvent;
pub use link::{
    Config, ConfigError, DisconnectReason, Event, Link, Message, PROTOCOL_VERSION, PeerInfo,
    SendError, Stats,
};
#[cfg(feature = "serde")]
pub use serde_support::{SerdeError, from_cbor, from_value, to_cbor, to_value};
#[cfg(feature = "alloc")]
pub use value::{MAX_DEPTH, Value};
