//! The `mqtt` capability: one rumqttc connection per client handle, driven by a task
//! ([`driver`]) that turns the event loop's packets into `mqtt-*` events. Like imp's client
//! it never reconnects by itself: a broken connection is reported and the agent decides.
//! Where an agent may connect and how large its messages may be is its [`Policy`];
//! [`options`] turns the agent's connect options into rumqttc's.

mod driver;
mod options;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, ClientError, QoS, SubscribeFilter};
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::events::Event;
use crate::bindings::mqtt::{self as wit, ConnectOptions, MqttError};
use crate::hosting::config::Limits;
use crate::kit::Handles;
use crate::kit::budget::Budget;
use crate::kit::events::Events;
use crate::kit::log::Quiet;
use crate::kit::metrics::Count;
use crate::kit::tasks::TaskGuard;
use crate::kit::timeline::Edge;
use crate::policy::allowed_hosts::AllowedHosts;
use crate::policy::tls::TlsTrust;
use driver::{Driver, MqttEvent, Ops, lock};

/// imp/Paho result codes.
pub mod code {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Socket error, broker unreachable, TLS failure.
    pub const FAILURE: i32 = -1;
    /// Not connected: the operation was pending when the connection closed.
    pub const DISCONNECTED: i32 = -3;
    /// An inbound message was over the size limit (imp's `onconnectionlost` -3).
    pub const MESSAGE_TOO_LARGE: i32 = -3;
    /// The broker sent a malformed MQTT frame.
    pub const MALFORMED_FRAME: i32 = -4;
    /// Too many messages buffered for sending.
    pub const MAX_BUFFERED_MESSAGES: i32 = -12;
    /// A subscription the broker refused.
    pub const SUBSCRIPTION_REFUSED: i32 = 128;
}

/// Requests queued per connection before `publish` reports -12.
const REQUEST_QUEUE: usize = 1000;

/// Clients whose last close cause is kept for `last-error`.
const CAUSES_KEPT: usize = 8;

/// What one connection reports, for client handle `.0`.
pub(crate) struct Report(u32, MqttEvent);

/// The host's side of every agent's connections: its trusted roots, and the connect
/// guard that connections limited to public addresses go through.
pub(crate) struct Network {
    pub tls: TlsTrust,
    pub guard: rumqttc::Proxy,
}

/// What one agent may do with MQTT.
pub(crate) struct Policy {
    network: Arc<Network>,
    allowed_hosts: AllowedHosts,
    /// Largest message in either direction, bytes (imp: 256 KiB).
    message_bytes: usize,
    /// Clients open at once, each a socket and a task of the host's.
    max_connections: usize,
    /// Bytes of publishes accepted and not yet done (QoS 0: written; QoS 1: acknowledged),
    /// which the host holds outside the agent's memory, over all its clients.
    pending: Budget,
    max_pending: usize,
}

impl Policy {
    pub fn new(network: Arc<Network>, allowed_hosts: AllowedHosts, limits: &Limits) -> Policy {
        Policy {
            network,
            allowed_hosts,
            message_bytes: limits.mqtt_message_bytes,
            max_connections: limits.mqtt_connections,
            pending: Budget::default(),
            max_pending: limits.mqtt_pending_bytes,
        }
    }
}

struct Connection {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
    disconnecting: Arc<AtomicBool>,
    ops: Arc<Mutex<Ops>>,
    inbound: Arc<AtomicUsize>,
    _task: TaskGuard,
}

/// An instance's MQTT clients: the capability's state; dropping it closes them.
pub(crate) struct Clients {
    policy: Arc<Policy>,
    handles: Handles,
    events: Events<Report>,
    next_client: u32,
    next_op: u64,
    connections: HashMap<u32, Connection>,
    /// Why recent clients failed to connect or lost their connection, oldest first.
    causes: VecDeque<(u32, String)>,
    /// When the log last said that `limits.mqtt_connections` was reached.
    full: Quiet,
}

impl Clients {
    pub fn new(policy: Arc<Policy>, handles: Handles, events: Events<Report>) -> Clients {
        Clients { policy, handles, events, next_client: 0, next_op: 0, connections: HashMap::new(), causes: VecDeque::new(), full: Quiet::default() }
    }

    /// Maps a connection's event to the WIT event; a connection that ended is forgotten.
    pub fn prepare(&mut self, Report(client, event): Report) -> Option<Event> {
        let event = match event {
            MqttEvent::Connected(code, cause) => {
                if code != code::SUCCESS {
                    self.connections.remove(&client);
                }
                if let Some(cause) = cause {
                    self.remember_cause(client, cause);
                }
                Event::MqttConnected((client, code))
            }
            MqttEvent::Message(m) => {
                if let Some(conn) = self.connections.get(&client) {
                    conn.inbound.fetch_sub(1, Ordering::AcqRel);
                }
                self.handles.metrics.add(Count::MqttMessage);
                self.handles.timeline.record(Edge::Broker, true, &m.topic, &m.payload);
                Event::MqttMessage((client, m))
            }
            MqttEvent::Published(op, code) => {
                if self.handles.timeline.watching() {
                    let what = if code == code::SUCCESS { format!("acknowledged publish {op}") } else { format!("publish {op} failed: code {code}") };
                    self.handles.timeline.record(Edge::Broker, true, &what, b"");
                }
                Event::MqttPublished((client, op, code))
            }
            MqttEvent::Subscribed(op, code, granted) => Event::MqttSubscribed((client, op, code, granted)),
            MqttEvent::Unsubscribed(op, code) => Event::MqttUnsubscribed((client, op, code)),
            MqttEvent::ConnectionLost(code, cause) => {
                self.connections.remove(&client);
                self.remember_cause(client, cause);
                Event::MqttConnectionLost((client, code))
            }
            MqttEvent::Disconnected => {
                self.connections.remove(&client);
                Event::MqttDisconnected(client)
            }
        };
        Some(event)
    }

    /// Keeps why `client` closed, for `last-error`: for the newest few clients only, so
    /// that an agent reconnecting for ever does not grow host memory.
    fn remember_cause(&mut self, client: u32, cause: String) {
        self.causes.retain(|(c, _)| *c != client);
        if self.causes.len() == CAUSES_KEPT {
            self.causes.pop_front();
        }
        self.causes.push_back((client, cause));
    }

    fn connected(&self, client: u32) -> Result<&Connection, MqttError> {
        let conn = self.connections.get(&client).ok_or(MqttError::UnknownClient)?;
        if conn.connected.load(Ordering::Acquire) { Ok(conn) } else { Err(MqttError::NotConnected) }
    }

    fn op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }
}

fn qos(q: u8) -> Result<QoS, MqttError> {
    match q {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(MqttError::InvalidArgument),
    }
}

fn queue_error(e: ClientError) -> MqttError {
    match e {
        ClientError::TryRequest(_) => MqttError::QueueFull,
        // The event loop is gone: the connection just closed.
        ClientError::Request(_) => MqttError::NotConnected,
    }
}

impl wit::Host for Clients {
    fn connect(&mut self, options: ConnectOptions) -> Result<u32, MqttError> {
        if self.connections.len() >= self.policy.max_connections {
            let n = self.policy.max_connections;
            self.handles.log.limit_refused(&self.full, || format!("mqtt: connect refused: {n} clients open, the most limits.mqtt_connections allows"));
            return Err(MqttError::TooManyConnections);
        }
        let mqtt_options = options::mqtt_options(&self.policy, &self.handles.log, &options)?;
        // Names allowed by a wildcard must resolve to public addresses: checked at connect
        // time by the connect guard, which such connections go through.
        let guarded = mqtt_options.proxy().is_some();
        let (host, port) = mqtt_options.broker_address();
        let broker = format!("{host}:{port}");
        let (client, eventloop) = AsyncClient::new(mqtt_options, REQUEST_QUEUE);
        self.next_client += 1;
        let handle = self.next_client;
        let connected = Arc::new(AtomicBool::new(false));
        let disconnecting = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Mutex::new(Ops::default()));
        let inbound = Arc::new(AtomicUsize::new(0));
        let driver = Driver {
            handle,
            events: self.events.clone(),
            connected: connected.clone(),
            disconnecting: disconnecting.clone(),
            ops: ops.clone(),
            inbound: inbound.clone(),
            broker,
            guarded,
            log: self.handles.log.clone(),
            metrics: self.handles.metrics.clone(),
        };
        // With the agent: on the slow lane a flooding agent and its connection share a
        // thread rather than handing each message across (BENCHMARKS.md, d2c profile).
        let task = TaskGuard::from(self.handles.lane.spawn(driver.run(eventloop)));
        self.connections.insert(handle, Connection { client, connected, disconnecting, ops, inbound, _task: task });
        Ok(handle)
    }

    fn publish(&mut self, c: u32, topic: String, payload: Vec<u8>, q: u8, retain: bool) -> Result<u64, MqttError> {
        let q = qos(q)?;
        if payload.len() > self.policy.message_bytes {
            return Err(MqttError::TooLarge);
        }
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(MqttError::InvalidArgument);
        }
        let size = topic.len() + payload.len();
        let Some(share) = self.policy.pending.take(size, self.policy.max_pending) else {
            let (used, max) = (self.policy.pending.used(), self.policy.max_pending);
            self.handles.log.limit_refused(&self.full, || format!("mqtt: publish refused: {used} bytes wait to be sent, and {size} more would pass limits.mqtt_pending_bytes = {max}"));
            return Err(MqttError::QueueFull);
        };
        let op = self.op();
        let conn = self.connected(c)?;
        // Copied only while someone watches, and noted only once the publish is queued.
        let seen = self.handles.timeline.watching().then(|| (format!("publish {op}: {topic}"), payload.clone()));
        lock(&conn.ops).publishes.push_back((op, share));
        conn.client.try_publish(topic, q, retain, payload).map_err(|e| {
            lock(&conn.ops).publishes.pop_back();
            queue_error(e)
        })?;
        if let Some((what, payload)) = seen {
            self.handles.timeline.record(Edge::Broker, false, &what, &payload);
        }
        Ok(op)
    }

    fn subscribe(&mut self, c: u32, topics: Vec<(String, u8)>) -> Result<u64, MqttError> {
        if topics.is_empty() || topics.len() > 10 || topics.iter().any(|(t, _)| t.is_empty()) {
            return Err(MqttError::InvalidArgument);
        }
        let filters = topics.into_iter().map(|(t, q)| Ok(SubscribeFilter::new(t, qos(q)?))).collect::<Result<Vec<_>, _>>()?;
        let op = self.op();
        let conn = self.connected(c)?;
        lock(&conn.ops).subscribes.push_back(op);
        conn.client.try_subscribe_many(filters).map_err(|e| {
            lock(&conn.ops).subscribes.pop_back();
            queue_error(e)
        })?;
        Ok(op)
    }

    fn unsubscribe(&mut self, c: u32, topics: Vec<String>) -> Result<u64, MqttError> {
        if topics.is_empty() || topics.len() > 10 || topics.iter().any(String::is_empty) {
            return Err(MqttError::InvalidArgument);
        }
        let op = self.op();
        let conn = self.connected(c)?;
        // rumqttc sends one UNSUBSCRIBE per topic; the operation completes with the last ack.
        let mut ops = lock(&conn.ops);
        ops.unsubscribe_parts.insert(op, topics.len());
        for topic in topics {
            ops.unsubscribes.push_back(op);
            if let Err(e) = conn.client.try_unsubscribe(topic) {
                ops.unsubscribes.retain(|o| *o != op);
                ops.unsubscribe_parts.remove(&op);
                return Err(queue_error(e));
            }
        }
        Ok(op)
    }

    fn disconnect(&mut self, c: u32) -> Result<(), MqttError> {
        let conn = self.connections.get(&c).ok_or(MqttError::UnknownClient)?;
        conn.disconnecting.store(true, Ordering::Release);
        if conn.connected.load(Ordering::Acquire) && conn.client.try_disconnect().is_ok() {
            return Ok(());
        }
        // Still connecting (or the queue is full): drop the attempt at once.
        self.connections.remove(&c);
        self.events.post(Report(c, MqttEvent::Disconnected));
        Ok(())
    }

    fn is_connected(&mut self, c: u32) -> bool {
        self.connections.get(&c).is_some_and(|conn| conn.connected.load(Ordering::Acquire))
    }

    fn last_error(&mut self, c: u32) -> Option<String> {
        self.causes.iter().rev().find(|(client, _)| *client == c).map(|(_, cause)| cause.clone())
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Clients) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Clients>>(linker, get)
}
