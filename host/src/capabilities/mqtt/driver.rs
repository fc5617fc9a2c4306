//! Drives one connection's rumqttc event loop: turns packets into `mqtt-*` reports,
//! matches acknowledgements to the agent's operation ids, and stops reading while the
//! agent has too many messages waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError, Event as LoopEvent, EventLoop, Outgoing, Packet, SubscribeReasonCode};

use super::{Report, code};
use crate::bindings::mqtt::Message;
use crate::kit::budget::Share;
use crate::kit::events::Events;
use crate::kit::log::{Level, Logger};
use crate::kit::metrics::{AgentMetrics, Count};
use crate::policy::allowed_hosts::DENIED_ADDRESS;
use crate::policy::connect_guard::DENIED_STATUS;

/// Messages received but not yet delivered to the agent, per connection: past this the
/// connection stops reading, so a flooding broker is slowed by TCP, not held in host memory.
const INBOUND_LIMIT: usize = 1024;
/// How often a paused connection looks again.
const PAUSE_RECHECK: Duration = Duration::from_millis(10);

/// What a connection reports.
pub(crate) enum MqttEvent {
    /// A connect attempt's result code, with why it failed.
    Connected(i32, Option<String>),
    Message(Message),
    Published(u64, i32),
    Subscribed(u64, i32, Vec<u8>),
    Unsubscribed(u64, i32),
    /// The connection broke: the code, and the cause in words.
    ConnectionLost(i32, String),
    Disconnected,
}

/// Operation ids in the order their requests were queued, and by packet id once the
/// event loop has sent them. The event loop sends requests in queue order, so the n-th
/// `Outgoing::Publish` is the n-th queued publish.
#[derive(Default)]
pub(super) struct Ops {
    /// Publishes not yet written, with their share of the agent's pending bytes.
    pub publishes: VecDeque<(u64, Share)>,
    pub subscribes: VecDeque<u64>,
    pub unsubscribes: VecDeque<u64>,
    pub publish_acks: HashMap<u16, (u64, Share)>,
    pub subscribe_acks: HashMap<u16, u64>,
    pub unsubscribe_acks: HashMap<u16, u64>,
    /// Unsubscribe packets still unacknowledged per operation (one packet per topic).
    pub unsubscribe_parts: HashMap<u64, usize>,
}

pub(super) fn lock(ops: &Mutex<Ops>) -> std::sync::MutexGuard<'_, Ops> {
    ops.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Drives one connection's event loop.
pub(super) struct Driver {
    pub handle: u32,
    pub events: Events<Report>,
    pub connected: Arc<AtomicBool>,
    pub disconnecting: Arc<AtomicBool>,
    pub ops: Arc<Mutex<Ops>>,
    pub inbound: Arc<AtomicUsize>,
    /// The broker's `host:port`, for log lines.
    pub broker: String,
    /// Whether the connection goes through the connect guard, whose refusal is logged.
    pub guarded: bool,
    pub log: Logger,
    pub metrics: Arc<AgentMetrics>,
}

impl Driver {
    fn post(&self, event: MqttEvent) {
        self.events.post(Report(self.handle, event));
    }

    pub async fn run(self, mut eventloop: EventLoop) {
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
                    let host = self.broker.rsplit_once(':').map_or(self.broker.as_str(), |(host, _)| host);
                    if self.guarded && denied_by_guard(&e) {
                        self.log.write(Level::Error, &format!("mqtt: {host} {DENIED_ADDRESS}; not allowed"));
                    }
                    let was_connected = self.connected.swap(false, Ordering::AcqRel);
                    let cause = cause(&e);
                    let event = if !was_connected {
                        self.log.write(Level::Error, &format!("mqtt: cannot connect to {}: {cause}", self.broker));
                        MqttEvent::Connected(connect_code(&e), Some(cause))
                    } else if self.disconnecting.load(Ordering::Acquire) {
                        MqttEvent::Disconnected
                    } else {
                        self.log.write(Level::Info, &format!("mqtt: connection to {} lost: {cause}", self.broker));
                        MqttEvent::ConnectionLost(lost_code(&e), cause)
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
                self.post(MqttEvent::Connected(code::SUCCESS, None));
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
                if let Some((op, share)) = ops.publishes.pop_front() {
                    if pkid == 0 {
                        drop((ops, share));
                        self.post(MqttEvent::Published(op, code::SUCCESS));
                    } else {
                        ops.publish_acks.insert(pkid, (op, share));
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
        if let Some((op, _share)) = op {
            self.post(MqttEvent::Published(op, code::SUCCESS));
        }
    }

    /// Ends the connection: every pending operation completes with -3, then `last`.
    fn close(&self, last: MqttEvent) {
        self.connected.store(false, Ordering::Release);
        let ops = std::mem::take(&mut *lock(&self.ops));
        for (op, _share) in ops.publishes.into_iter().chain(ops.publish_acks.into_values()) {
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

/// Why a connection failed or closed, in words a person can act on.
fn cause(e: &ConnectionError) -> String {
    use std::io::ErrorKind;
    let io = |e: &std::io::Error| match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused (nothing listens there)".to_owned(),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "the broker closed the connection".to_owned()
        }
        ErrorKind::TimedOut => "network timeout".to_owned(),
        _ => format!("network error: {e}"),
    };
    match e {
        ConnectionError::ConnectionRefused(rc) => {
            let why = match rc {
                ConnectReturnCode::Success => "no reason given",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::BadClientId => "client id refused",
                ConnectReturnCode::ServiceUnavailable => "server unavailable",
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
            };
            format!("refused by the broker: CONNACK {} ({why})", connect_code(e))
        }
        ConnectionError::Io(e) | ConnectionError::MqttState(rumqttc::StateError::Io(e)) => io(e),
        ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => "the broker closed the connection".to_owned(),
        ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp) => "keep-alive timeout: the broker did not answer a ping".to_owned(),
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n))) => {
            format!("an incoming message of {n} bytes is over the size limit")
        }
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(e)) => format!("malformed packet from the broker: {e}"),
        ConnectionError::Tls(e) => format!("TLS: {e}"),
        ConnectionError::NetworkTimeout => "connect timeout".to_owned(),
        ConnectionError::FlushTimeout => "write timeout: the broker stopped reading".to_owned(),
        ConnectionError::Proxy(_) if denied_by_guard(e) => format!("the address {DENIED_ADDRESS}"),
        other => other.to_string(),
    }
}
