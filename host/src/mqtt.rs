//! The `mqtt` capability: one rumqttc connection per client handle, driven by a task that
//! turns the event loop's packets into `mqtt-*` events. Like imp's client it never
//! reconnects by itself: a broken connection is reported and the agent decides.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, ConnectReturnCode, ConnectionError, Event as LoopEvent, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};

use crate::agent::AgentCtx;
use crate::allowed_hosts::{DENIED_ADDRESS, Reach};
use crate::connect_guard::DENIED_STATUS;
use crate::bindings::events::Event;
use crate::bindings::mqtt::{ConnectOptions, Message, MqttError};
use crate::events::{EventSender, HostEvent, MqttEvent, TaskGuard};
use crate::log::{Level, Logger};
use crate::metrics::{AgentMetrics, Count};

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

/// Messages received but not yet delivered to the agent, per connection: past this the
/// connection stops reading, so a flooding broker is slowed by TCP, not held in host memory.
const INBOUND_LIMIT: usize = 1024;
/// How often a paused connection looks again.
const PAUSE_RECHECK: Duration = Duration::from_millis(10);

/// Requests queued per connection before `publish` reports -12.
const REQUEST_QUEUE: usize = 1000;

/// Operation ids in the order their requests were queued, and by packet id once the
/// event loop has sent them. The event loop sends requests in queue order, so the n-th
/// `Outgoing::Publish` is the n-th queued publish.
#[derive(Default)]
struct Ops {
    publishes: VecDeque<u64>,
    subscribes: VecDeque<u64>,
    unsubscribes: VecDeque<u64>,
    publish_acks: HashMap<u16, u64>,
    subscribe_acks: HashMap<u16, u64>,
    unsubscribe_acks: HashMap<u16, u64>,
    /// Unsubscribe packets still unacknowledged per operation (one packet per topic).
    unsubscribe_parts: HashMap<u64, usize>,
}

struct Connection {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
    disconnecting: Arc<AtomicBool>,
    ops: Arc<Mutex<Ops>>,
    inbound: Arc<AtomicUsize>,
    _task: TaskGuard,
}

/// An instance's MQTT clients; dropping it closes them.
#[derive(Default)]
pub(crate) struct Clients {
    next_client: u32,
    next_op: u64,
    connections: HashMap<u32, Connection>,
}

impl Clients {
    /// Maps a connection's event to the WIT event; a connection that ended is forgotten.
    pub fn prepare(&mut self, client: u32, event: MqttEvent) -> Option<Event> {
        let event = match event {
            MqttEvent::Connected(code) => {
                if code != code::SUCCESS {
                    self.connections.remove(&client);
                }
                Event::MqttConnected((client, code))
            }
            MqttEvent::Message(m) => {
                if let Some(conn) = self.connections.get(&client) {
                    conn.inbound.fetch_sub(1, Ordering::AcqRel);
                }
                Event::MqttMessage((client, m))
            }
            MqttEvent::Published(op, code) => Event::MqttPublished((client, op, code)),
            MqttEvent::Subscribed(op, code, granted) => Event::MqttSubscribed((client, op, code, granted)),
            MqttEvent::Unsubscribed(op, code) => Event::MqttUnsubscribed((client, op, code)),
            MqttEvent::ConnectionLost(code) => {
                self.connections.remove(&client);
                Event::MqttConnectionLost((client, code))
            }
            MqttEvent::Disconnected => {
                self.connections.remove(&client);
                Event::MqttDisconnected(client)
            }
        };
        Some(event)
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

impl crate::bindings::mqtt::Host for AgentCtx {
    fn connect(&mut self, options: ConnectOptions) -> Result<u32, MqttError> {
        let mqtt_options = mqtt_options(self, &options)?;
        // Names allowed by a wildcard must resolve to public addresses: checked at connect
        // time by the connect guard, which such connections go through.
        let guarded = mqtt_options.proxy().is_some().then(|| {
            (self.agent.log.clone(), mqtt_options.broker_address().0)
        });
        let (client, eventloop) = AsyncClient::new(mqtt_options, REQUEST_QUEUE);
        let clients = &mut self.mqtt;
        clients.next_client += 1;
        let handle = clients.next_client;
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
            guarded,
            metrics: self.agent.metrics.clone(),
        };
        let task = TaskGuard::spawn(&self.agent.host.io, driver.run(eventloop));
        clients.connections.insert(handle, Connection { client, connected, disconnecting, ops, inbound, _task: task });
        Ok(handle)
    }

    fn publish(&mut self, c: u32, topic: String, payload: Vec<u8>, q: u8, retain: bool) -> Result<u64, MqttError> {
        let q = qos(q)?;
        if payload.len() > self.agent.limits.mqtt_message_bytes {
            return Err(MqttError::TooLarge);
        }
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(MqttError::InvalidArgument);
        }
        let op = self.mqtt.op();
        let conn = self.mqtt.connected(c)?;
        lock(&conn.ops).publishes.push_back(op);
        conn.client.try_publish(topic, q, retain, payload).map_err(|e| {
            lock(&conn.ops).publishes.pop_back();
            queue_error(e)
        })?;
        Ok(op)
    }

    fn subscribe(&mut self, c: u32, topics: Vec<(String, u8)>) -> Result<u64, MqttError> {
        if topics.is_empty() || topics.len() > 10 || topics.iter().any(|(t, _)| t.is_empty()) {
            return Err(MqttError::InvalidArgument);
        }
        let filters = topics.into_iter().map(|(t, q)| Ok(SubscribeFilter::new(t, qos(q)?))).collect::<Result<Vec<_>, _>>()?;
        let op = self.mqtt.op();
        let conn = self.mqtt.connected(c)?;
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
        let op = self.mqtt.op();
        let conn = self.mqtt.connected(c)?;
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
        let conn = self.mqtt.connections.get(&c).ok_or(MqttError::UnknownClient)?;
        conn.disconnecting.store(true, Ordering::Release);
        if conn.connected.load(Ordering::Acquire) && conn.client.try_disconnect().is_ok() {
            return Ok(());
        }
        // Still connecting (or the queue is full): drop the attempt at once.
        self.mqtt.connections.remove(&c);
        self.events.post(HostEvent::Mqtt(c, MqttEvent::Disconnected));
        Ok(())
    }

    fn is_connected(&mut self, c: u32) -> bool {
        self.mqtt.connections.get(&c).is_some_and(|conn| conn.connected.load(Ordering::Acquire))
    }
}

fn lock(ops: &Mutex<Ops>) -> std::sync::MutexGuard<'_, Ops> {
    ops.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn mqtt_options(ctx: &AgentCtx, o: &ConnectOptions) -> Result<MqttOptions, MqttError> {
    let (tls, rest) = if let Some(rest) = o.url.strip_prefix("tcp://") {
        (false, rest)
    } else if let Some(rest) = o.url.strip_prefix("ssl://") {
        (true, rest)
    } else {
        return Err(MqttError::InvalidArgument);
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| MqttError::InvalidArgument)?)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let id_len = o.client_id.chars().count();
    if host.is_empty() || !(1..=255).contains(&id_len) {
        return Err(MqttError::InvalidArgument);
    }
    let scheme = if tls { "mqtts" } else { "mqtt" };
    let Some(reach) = ctx.agent.allowed_hosts.check(scheme, host, port) else {
        ctx.agent.log.write(Level::Error, &format!("mqtt: {scheme}://{host}:{port} is not an allowed destination"));
        return Err(MqttError::NotAllowed);
    };
    let limit = ctx.agent.limits.mqtt_message_bytes;
    let mut m = MqttOptions::new(o.client_id.clone(), host, port);
    m.set_keep_alive(Duration::from_secs(o.keep_alive.into()))
        .set_clean_session(o.clean_session)
        .set_request_channel_capacity(REQUEST_QUEUE)
        // Room for the topic and header around a payload at the limit.
        .set_max_packet_size(limit + 64 * 1024, limit + 64 * 1024);
    if o.username.is_some() || o.password.is_some() {
        m.set_credentials(o.username.clone().unwrap_or_default(), o.password.clone().unwrap_or_default());
    }
    if let Some(will) = &o.will {
        if will.payload.len() > limit || will.topic.is_empty() {
            return Err(MqttError::InvalidArgument);
        }
        m.set_last_will(LastWill::new(will.topic.clone(), will.payload.clone(), qos(will.qos)?, will.retain));
    }
    if tls {
        let config = ctx.agent.host.tls.client_config(o.ca_pem.as_deref()).map_err(|_| MqttError::InvalidArgument)?;
        m.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    if reach == Reach::PublicOnly {
        m.set_proxy(ctx.agent.host.connect_guard.proxy());
    }
    Ok(m)
}

/// Drives one connection's event loop.
struct Driver {
    handle: u32,
    events: EventSender,
    connected: Arc<AtomicBool>,
    disconnecting: Arc<AtomicBool>,
    ops: Arc<Mutex<Ops>>,
    inbound: Arc<AtomicUsize>,
    /// For a connection through the connect guard: the agent's log and the broker's host,
    /// to log the guard's refusal.
    guarded: Option<(Logger, String)>,
    metrics: Arc<AgentMetrics>,
}

impl Driver {
    fn post(&self, event: MqttEvent) {
        self.events.post(HostEvent::Mqtt(self.handle, event));
    }

    async fn run(self, mut eventloop: EventLoop) {
        loop {
            if self.inbound.load(Ordering::Acquire) >= INBOUND_LIMIT {
                self.metrics.add(Count::MqttPause);
                while self.inbound.load(Ordering::Acquire) >= INBOUND_LIMIT {
                    tokio::time::sleep(PAUSE_RECHECK).await;
                }
            }
            match eventloop.poll().await {
                Ok(LoopEvent::Incoming(packet)) => self.incoming(packet),
                Ok(LoopEvent::Outgoing(out)) => {
                    if self.outgoing(out) {
                        self.close(MqttEvent::Disconnected);
                        return;
                    }
                }
                Err(e) => {
                    if let Some((log, host)) = &self.guarded
                        && denied_by_guard(&e)
                    {
                        log.write(Level::Error, &format!("mqtt: {host} {DENIED_ADDRESS}; not allowed"));
                    }
                    let was_connected = self.connected.swap(false, Ordering::AcqRel);
                    let event = if !was_connected {
                        MqttEvent::Connected(connect_code(&e))
                    } else if self.disconnecting.load(Ordering::Acquire) {
                        MqttEvent::Disconnected
                    } else {
                        MqttEvent::ConnectionLost(lost_code(&e))
                    };
                    self.close(event);
                    return;
                }
            }
        }
    }

    fn incoming(&self, packet: Packet) {
        match packet {
            Packet::ConnAck(_) => {
                self.connected.store(true, Ordering::Release);
                self.post(MqttEvent::Connected(code::SUCCESS));
            }
            Packet::Publish(p) => {
                self.inbound.fetch_add(1, Ordering::AcqRel);
                self.post(MqttEvent::Message(Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                }))
            }
            Packet::PubAck(ack) => self.acked_publish(ack.pkid),
            Packet::PubComp(comp) => self.acked_publish(comp.pkid),
            Packet::SubAck(ack) => {
                let op = lock(&self.ops).subscribe_acks.remove(&ack.pkid);
                if let Some(op) = op {
                    let granted: Vec<u8> = ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => *q as u8,
                            SubscribeReasonCode::Failure => code::SUBSCRIPTION_REFUSED as u8,
                        })
                        .collect();
                    let refused = ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure));
                    let result = if refused { code::SUBSCRIPTION_REFUSED } else { code::SUCCESS };
                    self.post(MqttEvent::Subscribed(op, result, granted));
                }
            }
            Packet::UnsubAck(ack) => {
                let mut ops = lock(&self.ops);
                if let Some(op) = ops.unsubscribe_acks.remove(&ack.pkid) {
                    let left = ops.unsubscribe_parts.get_mut(&op).map(|n| {
                        *n -= 1;
                        *n
                    });
                    if left == Some(0) {
                        ops.unsubscribe_parts.remove(&op);
                        drop(ops);
                        self.post(MqttEvent::Unsubscribed(op, code::SUCCESS));
                    }
                }
            }
            _ => {}
        }
    }

    /// Returns true once the disconnect the agent asked for has been sent.
    fn outgoing(&self, out: Outgoing) -> bool {
        let mut ops = lock(&self.ops);
        match out {
            Outgoing::Publish(pkid) => {
                if let Some(op) = ops.publishes.pop_front() {
                    if pkid == 0 {
                        drop(ops);
                        self.post(MqttEvent::Published(op, code::SUCCESS));
                    } else {
                        ops.publish_acks.insert(pkid, op);
                    }
                }
            }
            Outgoing::Subscribe(pkid) => {
                if let Some(op) = ops.subscribes.pop_front() {
                    ops.subscribe_acks.insert(pkid, op);
                }
            }
            Outgoing::Unsubscribe(pkid) => {
                if let Some(op) = ops.unsubscribes.pop_front() {
                    ops.unsubscribe_acks.insert(pkid, op);
                }
            }
            Outgoing::Disconnect => return true,
            _ => {}
        }
        false
    }

    fn acked_publish(&self, pkid: u16) {
        let op = lock(&self.ops).publish_acks.remove(&pkid);
        if let Some(op) = op {
            self.post(MqttEvent::Published(op, code::SUCCESS));
        }
    }

    /// Ends the connection: every pending operation completes with -3, then `last`.
    fn close(&self, last: MqttEvent) {
        self.connected.store(false, Ordering::Release);
        let ops = std::mem::take(&mut *lock(&self.ops));
        for op in ops.publishes.into_iter().chain(ops.publish_acks.into_values()) {
            self.post(MqttEvent::Published(op, code::DISCONNECTED));
        }
        for op in ops.subscribes.into_iter().chain(ops.subscribe_acks.into_values()) {
            self.post(MqttEvent::Subscribed(op, code::DISCONNECTED, Vec::new()));
        }
        for op in ops.unsubscribe_parts.into_keys() {
            self.post(MqttEvent::Unsubscribed(op, code::DISCONNECTED));
        }
        self.post(last);
    }
}

/// Whether the connect guard refused the target (rumqttc's proxy error wraps the status).
fn denied_by_guard(e: &ConnectionError) -> bool {
    let ConnectionError::Proxy(e) = e else { return false };
    let status = std::error::Error::source(e).and_then(|s| s.downcast_ref::<async_http_proxy::HttpError>());
    matches!(status, Some(async_http_proxy::HttpError::HttpCode200(DENIED_STATUS)))
}

fn connect_code(e: &ConnectionError) -> i32 {
    match e {
        ConnectionError::ConnectionRefused(rc) => match rc {
            ConnectReturnCode::Success => code::FAILURE,
            ConnectReturnCode::RefusedProtocolVersion => 1,
            ConnectReturnCode::BadClientId => 2,
            ConnectReturnCode::ServiceUnavailable => 3,
            ConnectReturnCode::BadUserNamePassword => 4,
            ConnectReturnCode::NotAuthorized => 5,
        },
        _ => code::FAILURE,
    }
}

fn lost_code(e: &ConnectionError) -> i32 {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_))) => {
            code::MESSAGE_TOO_LARGE
        }
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(_)) => code::MALFORMED_FRAME,
        _ => code::FAILURE,
    }
}
