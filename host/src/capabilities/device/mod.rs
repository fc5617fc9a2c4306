//! The `device` capability: the agent's device on a serial line (imp's `device` object).
//!
//! An agent bound to a port (`AgentSettings::device`) gets a [`DeviceChannel`]: its host
//! calls check and queue messages synchronously, and a driver task ([`driver`]) owns the
//! line and the `device_link::Link`, reopens the line when it comes back, and posts
//! `device-*` events. The line is a [`Line`]: a serial port ([`serial`]), or in a cluster
//! the port of a gateway box far away, carried over NATS ([`gateway`]). The channel
//! belongs to the agent, not to one instance: the device outlives
//! agent restarts, so connection changes and device messages go to whichever instance
//! runs, while the outcome of a sent message goes to the instance that sent it.
//! Without a binding the device is never connected and sending fails at once, as imp does
//! for an offline device.

mod driver;
mod gateway;
mod line;
mod serial;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::device::{self as wit, Answer, SendError, SendFlags};
use crate::bindings::events::Event;
use crate::hosting::config::Limits;
use crate::kit::events::Events;
use crate::kit::log::{Level, Logger, Quiet};
use crate::kit::metrics::{AgentMetrics, Count};
use crate::kit::timeline::{Edge, Timeline};

pub(crate) use driver::Driver;
pub(crate) use gateway::GatewayLine;
pub use gateway::{GatewayConfig, run_gateway};
pub(crate) use line::Line;
pub(crate) use serial::SerialLine;

/// An agent's line, whichever kind its binding names.
pub(crate) enum AnyLine {
    Serial(SerialLine),
    Gateway(GatewayLine),
}

/// A line's open byte stream, whichever kind.
pub(crate) trait Port: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Port for T {}

impl Line for AnyLine {
    type Port = Box<dyn Port>;

    async fn open(&mut self) -> std::io::Result<Box<dyn Port>> {
        Ok(match self {
            AnyLine::Serial(line) => Box::new(line.open().await?),
            AnyLine::Gateway(line) => Box::new(line.open().await?),
        })
    }

    fn name(&self) -> String {
        match self {
            AnyLine::Serial(line) => line.name(),
            AnyLine::Gateway(line) => line.name(),
        }
    }

    fn describe(&self) -> String {
        match self {
            AnyLine::Serial(line) => line.describe(),
            AnyLine::Gateway(line) => line.describe(),
        }
    }
}

/// A `device-*` event, as the driver posts it.
pub(crate) struct DeviceEvent(pub Event);


/// imp's cap on one message (name plus payload), whatever the device accepts.
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;
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
    /// Ids of the device's messages that asked for an answer and have none yet: only
    /// these are answered, once each, so the agent cannot queue answers without end.
    awaiting: Mutex<HashSet<u64>>,
    /// Frame and error counts of the line, summed over every session since the host started.
    line: Mutex<device_link::Stats>,
    /// Times the line closed (unplugged, or the device went away) and was reopened.
    reopens: AtomicU64,
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
    events: Events<DeviceEvent>,
}

impl Outgoing {
    fn size(&self) -> usize {
        self.name.len() + self.payload.len()
    }
}

enum Command {
    Send(Outgoing),
    Respond(u64, Reply),
}

/// What the driver tells the device about one of its messages.
enum Reply {
    Answer(Answer),
    /// The agent's reply is larger than the device takes.
    TooLarge,
}

/// An agent's end of its device channel.
pub(crate) struct DeviceChannel {
    commands: mpsc::UnboundedSender<Command>,
    state: Arc<State>,
    log: Logger,
    refused: Quiet,
    /// Messages waiting to be sent (slow device, or held while disconnected), and their
    /// bytes: `limits.device_queue_messages` and `device_queue_bytes`.
    max_messages: usize,
    max_bytes: usize,
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

    /// Times the line closed and was reopened (a replug, or a device that went away).
    pub fn reopens(&self) -> u64 {
        self.state.reopens.load(Ordering::Relaxed)
    }

    /// The channel and the driver to spawn for it (only once the agent is registered, so a
    /// refused spawn leaves no task holding the line). `events` reach whichever instance
    /// runs.
    pub fn new<L: Line>(line: L, agent_id: &str, events: Events<DeviceEvent>, log: Logger, limits: &Limits) -> (DeviceChannel, Driver<L>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State::default());
        let driver = Driver::new(line, agent_id, state.clone(), rx, events, log.clone());
        let (max_messages, max_bytes) = (limits.device_queue_messages, limits.device_queue_bytes);
        (DeviceChannel { commands: tx, state, log, refused: Quiet::default(), max_messages, max_bytes }, driver)
    }

    fn respond(&self, id: u64, answer: Answer) {
        if !self.state.awaiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
            self.log.limit_refused(&self.refused, || {
                format!("device: answer to message {id} dropped: it asked for none, was answered already, or its device disconnected since")
            });
            return;
        }
        let max = self.state.max_message.load(Ordering::Acquire);
        let reply = match answer {
            Answer::Reply(data) if data.len() > max => {
                self.log.write(Level::Error, &format!("device: reply to message {id} is {} bytes, over the device's maximum of {max}; the device is told it is too large", data.len()));
                Reply::TooLarge
            }
            answer => Reply::Answer(answer),
        };
        // Only fails when the host shuts down.
        let _ = self.commands.send(Command::Respond(id, reply));
    }

    fn send(&self, name: String, payload: Vec<u8>, options: SendFlags, events: &Events<DeviceEvent>) -> Result<u64, SendError> {
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
            if b.messages >= self.max_messages || b.bytes + size > self.max_bytes {
                let (messages, bytes) = (b.messages, b.bytes);
                self.log.limit_refused(&self.refused, || {
                    format!("device: send refused: {messages} messages of {bytes} bytes wait for the device, at limits.device_queue_messages or device_queue_bytes")
                });
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

}

/// The capability's state in an instance: the agent's channel, if it has a device.
pub(crate) struct Device {
    channel: Option<Arc<DeviceChannel>>,
    /// Outcomes of this instance's messages come back here.
    events: Events<DeviceEvent>,
    metrics: Arc<AgentMetrics>,
    timeline: Arc<Timeline>,
}

impl Device {
    pub fn new(channel: Option<Arc<DeviceChannel>>, events: Events<DeviceEvent>, metrics: Arc<AgentMetrics>, timeline: Arc<Timeline>) -> Device {
        Device { channel, events, metrics, timeline }
    }

    /// The event to deliver; a device message leaving the queue lets the driver read on.
    pub fn prepare(&mut self, DeviceEvent(event): DeviceEvent) -> Option<Event> {
        if let Event::DeviceMessage((name, payload, _)) = &event {
            self.metrics.add(Count::DeviceMessage);
            self.timeline.record(Edge::Device, true, name, payload);
            if let Some(channel) = &self.channel {
                let _ = channel.state.inbound.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
        }
        Some(event)
    }
}

impl wit::Host for Device {
    fn send(&mut self, name: String, payload: Vec<u8>, options: SendFlags) -> Result<u64, SendError> {
        let Some(device) = &self.channel else {
            return Err(SendError::NotConnected);
        };
        if self.timeline.watching() {
            self.timeline.record(Edge::Device, false, &name, &payload);
        }
        device.send(name, payload, options, &self.events)
    }

    fn respond(&mut self, id: u64, answer: Answer) {
        if let Some(device) = &self.channel {
            device.respond(id, answer);
        }
    }

    fn is_connected(&mut self) -> bool {
        self.channel.as_ref().is_some_and(|d| d.connected())
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Device) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Device>>(linker, get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_awaiting_an_answer_get_one_and_only_one() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(AgentMetrics::default());
        let log = Logger::new("a", Vec::new(), None, metrics.clone());
        let channel = DeviceChannel { commands: tx, state: Arc::default(), log, refused: Quiet::default(), max_messages: 1, max_bytes: 1 };
        channel.state.max_message.store(8, Ordering::Release);
        channel.state.awaiting.lock().unwrap_or_else(|p| p.into_inner()).extend([1, 2]);

        channel.respond(1, Answer::Ack);
        for _ in 0..1000 {
            channel.respond(1, Answer::Reply(vec![0; 4]));
            channel.respond(7, Answer::Ack);
        }
        channel.respond(2, Answer::Reply(vec![0; 9]));
        let mut sent = Vec::new();
        while let Ok(Command::Respond(id, reply)) = rx.try_recv() {
            sent.push((id, matches!(reply, Reply::TooLarge)));
        }
        assert_eq!(sent, [(1, false), (2, true)], "one answer each; the oversized reply is refused");
        assert_eq!(metrics.snapshot().limit_refused, 2000);
    }
}
