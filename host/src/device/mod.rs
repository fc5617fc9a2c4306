//! The `device` capability: the agent's device on a serial line (imp's `device` object).
//!
//! An agent bound to a port (`AgentSettings::device`) gets a [`DeviceChannel`]: its host
//! calls check and queue messages synchronously, and a driver task (`serial`) owns the port
//! and the `device_link::Link`, reopens the port when it comes back, and posts `device-*`
//! events. The channel belongs to the agent, not to one instance: the device outlives
//! agent restarts, so connection changes and device messages go to whichever instance
//! runs, while the outcome of a sent message goes to the instance that sent it.
//! Without a binding the device is never connected and sending fails at once, as imp does
//! for an offline device.

mod serial;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::agent::{AgentCtx, AgentShared};
use crate::bindings::device::{Answer, SendError, SendFlags};
use crate::bindings::events::Event;
use crate::config::DeviceBinding;
use crate::events::{Envelope, EventSender};
use crate::log::Logger;

pub(crate) use serial::Driver;

/// imp's cap on one message (name plus payload), whatever the device accepts.
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;
/// Messages waiting to be sent per device (slow device, or held while disconnected)...
const BACKLOG_MESSAGES: usize = 256;
/// ...and their bytes; past either, `send` answers `queue-full`.
const BACKLOG_BYTES: usize = 1 << 20;
/// Device messages posted to the agent but not yet delivered: past this the driver stops
/// reading the line, so a flood from the device waits in the kernel and the device's
/// flow-control window, not in host memory.
const INBOUND_LIMIT: usize = 1024;

/// What the host calls and the driver task share.
#[derive(Default)]
struct State {
    connected: AtomicBool,
    /// Cap on name plus payload while connected.
    max_message: AtomicUsize,
    next_id: AtomicU64,
    backlog: Mutex<Backlog>,
    /// Device messages in the agent's queue.
    inbound: AtomicUsize,
    /// Frame and error counts of the line, summed over every session since the host started.
    line: Mutex<device_link::Stats>,
}

#[derive(Default)]
struct Backlog {
    messages: usize,
    bytes: usize,
}

impl State {
    fn release(&self, bytes: usize) {
        let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        b.messages = b.messages.saturating_sub(1);
        b.bytes = b.bytes.saturating_sub(bytes);
    }
}

/// A message on its way to the device.
struct Outgoing {
    id: u64,
    name: String,
    payload: Vec<u8>,
    ack: bool,
    queued: bool,
    /// The sending instance: the outcome is only meaningful to it.
    events: EventSender,
}

impl Outgoing {
    fn size(&self) -> usize {
        self.name.len() + self.payload.len()
    }
}

enum Command {
    Send(Outgoing),
    Respond(u64, Answer),
}

/// An agent's end of its device channel.
pub(crate) struct DeviceChannel {
    commands: mpsc::UnboundedSender<Command>,
    state: Arc<State>,
}

impl DeviceChannel {
    /// Whether the device is connected (handshake done, heartbeats answered).
    pub fn connected(&self) -> bool {
        self.state.connected.load(Ordering::Acquire)
    }

    /// Frames received and corrupted frames dropped on the line so far.
    pub fn line_stats(&self) -> device_link::Stats {
        *self.state.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channel and the driver to spawn for it (only once the agent is registered, so a
    /// refused spawn leaves no task holding the port).
    pub fn new(binding: DeviceBinding, agent_id: &str, agent_tx: mpsc::UnboundedSender<Envelope>, log: Logger) -> (DeviceChannel, Driver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State::default());
        let driver = Driver::new(binding, agent_id, state.clone(), rx, EventSender::any_instance(agent_tx), log);
        (DeviceChannel { commands: tx, state }, driver)
    }

    fn send(&self, name: String, payload: Vec<u8>, options: SendFlags, events: &EventSender) -> Result<u64, SendError> {
        let queued = options.contains(SendFlags::QUEUED);
        let connected = self.state.connected.load(Ordering::Acquire);
        if !connected && !queued {
            return Err(SendError::NotConnected);
        }
        let limit = if connected { self.state.max_message.load(Ordering::Acquire) } else { MAX_MESSAGE };
        let size = name.len() + payload.len();
        if size > limit || name.len() > device_link::frame::MAX_NAME_LEN {
            return Err(SendError::TooLarge);
        }
        device_link::Value::decode(&payload).map_err(|_| SendError::InvalidPayload)?;
        {
            let mut b = self.state.backlog.lock().unwrap_or_else(|p| p.into_inner());
            if b.messages >= BACKLOG_MESSAGES || b.bytes + size > BACKLOG_BYTES {
                return Err(SendError::QueueFull);
            }
            b.messages += 1;
            b.bytes += size;
        }
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let message = Outgoing { id, name, payload, ack: options.contains(SendFlags::ACK), queued, events: events.clone() };
        if self.commands.send(Command::Send(message)).is_err() {
            // The driver only ends with the host.
            self.state.release(size);
            return Err(SendError::NotConnected);
        }
        Ok(id)
    }

    /// An event leaves the agent's queue.
    pub fn delivered(&self, event: &Event) {
        if matches!(event, Event::DeviceMessage(_)) {
            let _ = self.state.inbound.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }
}

/// Turns a queued device event into the event to deliver.
pub(crate) fn prepare(agent: &AgentShared, event: Event) -> Option<Event> {
    if let Some(device) = &agent.device {
        device.delivered(&event);
    }
    Some(event)
}

impl crate::bindings::device::Host for AgentCtx {
    fn send(&mut self, name: String, payload: Vec<u8>, options: SendFlags) -> Result<u64, SendError> {
        match &self.agent.device {
            Some(device) => device.send(name, payload, options, &self.events),
            None => Err(SendError::NotConnected),
        }
    }

    fn respond(&mut self, id: u64, answer: Answer) {
        if let Some(device) = &self.agent.device {
            // Only fails when the host shuts down.
            let _ = device.commands.send(Command::Respond(id, answer));
        }
    }

    fn is_connected(&mut self) -> bool {
        self.agent.device.as_ref().is_some_and(|d| d.state.connected.load(Ordering::Acquire))
    }
}
