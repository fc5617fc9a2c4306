//! An MQTT 3.1.1 client (imp: `mqtt.createclient()` and `mqttclient`).
//!
//! Like imp's, a client closes its connection when the last handle to it is dropped, and
//! never reconnects by itself: [`Client::on_connection_lost`] tells the agent, which
//! decides.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};

use crate::bindings::tether::agent::mqtt as host;

/// QoS 0.
pub const AT_MOST_ONCE: u8 = 0;
/// QoS 1.
pub const AT_LEAST_ONCE: u8 = 1;
/// QoS 2.
pub const EXACTLY_ONCE: u8 = 2;

/// imp/Paho result codes passed to callbacks.
pub mod codes {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Socket error, broker unreachable or TLS failure (also `onconnectionlost`: socket failed).
    pub const FAILURE: i32 = -1;
    /// The connection closed before the operation completed; or an inbound message was
    /// over the size limit (`onconnectionlost`).
    pub const DISCONNECTED: i32 = -3;
    /// The broker sent a malformed frame (`onconnectionlost`).
    pub const MALFORMED_FRAME: i32 = -4;
    /// Too many messages buffered for sending.
    pub const MAX_BUFFERED_MESSAGES: i32 = -12;
    /// CONNACK: unacceptable protocol version.
    pub const REFUSED_PROTOCOL: i32 = 1;
    /// CONNACK: client id rejected.
    pub const REFUSED_CLIENT_ID: i32 = 2;
    /// CONNACK: server unavailable.
    pub const REFUSED_SERVER_UNAVAILABLE: i32 = 3;
    /// CONNACK: bad user name or password.
    pub const REFUSED_BAD_CREDENTIALS: i32 = 4;
    /// CONNACK: not authorized.
    pub const REFUSED_NOT_AUTHORIZED: i32 = 5;
    /// SUBACK: subscription refused.
    pub const SUBSCRIPTION_REFUSED: i32 = 128;
}

/// Why a call was refused at once (where imp throws).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// Bad URL scheme, client id length, QoS, topic, or more than 10 topics.
    #[error("invalid argument")]
    InvalidArgument,
    /// The client is not connected.
    #[error("not connected")]
    NotConnected,
    /// The client is already connecting or connected.
    #[error("already connecting or connected")]
    AlreadyConnected,
    /// Too many operations wait to be sent (imp -12).
    #[error("too many buffered messages")]
    QueueFull,
    /// The payload is over the size limit.
    #[error("message too large")]
    TooLarge,
    /// The host does not allow this agent to reach that broker.
    #[error("destination not allowed")]
    NotAllowed,
    /// The agent has as many clients open as its host allows (`limits.mqtt_connections`);
    /// disconnect one first. Beyond imp.
    #[error("too many MQTT clients open")]
    TooManyConnections,
}

impl MqttError {
    /// The imp/Paho code for this error.
    pub fn code(self) -> i32 {
        match self {
            MqttError::NotConnected => codes::DISCONNECTED,
            MqttError::QueueFull => codes::MAX_BUFFERED_MESSAGES,
            _ => codes::FAILURE,
        }
    }
}

impl From<host::MqttError> for MqttError {
    fn from(e: host::MqttError) -> Self {
        match e {
            host::MqttError::InvalidArgument => MqttError::InvalidArgument,
            host::MqttError::NotConnected | host::MqttError::UnknownClient => MqttError::NotConnected,
            host::MqttError::QueueFull => MqttError::QueueFull,
            host::MqttError::TooLarge => MqttError::TooLarge,
            host::MqttError::NotAllowed => MqttError::NotAllowed,
            host::MqttError::TooManyConnections => MqttError::TooManyConnections,
        }
    }
}

/// A last-will message.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub message: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// Options of [`Client::connect`], with imp's defaults.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub username: Option<String>,
    pub password: Option<String>,
    /// Seconds, 0 disables it. Default 60.
    pub keepalive: u16,
    /// Default true.
    pub clean_session: bool,
    pub will: Option<Will>,
    /// Extra CA certificates (PEM) trusted for this connection.
    pub ca_pem: Option<String>,
    /// A TLS client certificate, presented for `ssl://` when the server asks (beyond imp).
    /// A certificate or key that cannot be used is refused at `connect` with
    /// [`MqttError::InvalidArgument`], and the host logs why.
    pub client_certificate: Option<ClientCertificate>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { username: None, password: None, keepalive: 60, clean_session: true, will: None, ca_pem: None, client_certificate: None }
    }
}

/// A TLS client certificate and its key (beyond imp): X.509 authentication.
///
/// ```
/// use tether_guest::mqtt::{ClientCertificate, ConnectOptions};
/// let options = ConnectOptions {
///     client_certificate: Some(ClientCertificate { cert_pem: "-----BEGIN CERTIFICATE-----...".into(), key_pem: "-----BEGIN PRIVATE KEY-----...".into() }),
///     ..ConnectOptions::default()
/// };
/// # let _ = options;
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate, then any intermediates, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

/// Shows the certificate's length only: the key is a secret and must not reach a log.
impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate").field("cert_pem", &format_args!("{} bytes", self.cert_pem.len())).field("key_pem", &"..").finish()
    }
}

/// A message received on a subscription (imp's message item).
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub topic: String,
    pub message: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

/// Options of [`Client::create_message`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageOptions {
    /// Default [`AT_MOST_ONCE`].
    pub qos: u8,
    /// Default false.
    pub retain: bool,
}

type Handler<T> = RefCell<Option<Rc<dyn Fn(T)>>>;

/// Callbacks waiting for their operation's outcome, by operation id.
type Waiting<F> = RefCell<BTreeMap<u64, F>>;
/// What a subscribe's caller gets: the result code and the granted QoS per filter.
type OnSubscribed = Box<dyn FnOnce(i32, Vec<u8>)>;
/// What a publish's caller gets: the result code.
pub(crate) type OnPublished = Box<dyn FnOnce(i32)>;

#[derive(Default)]
struct Inner {
    handle: Cell<Option<u32>>,
    /// The handle of the newest connection, kept after it ends for `last_error`.
    last_handle: Cell<Option<u32>>,
    on_connect: Handler<i32>,
    on_connection_lost: Handler<i32>,
    on_message: Handler<ReceivedMessage>,
    published: Waiting<OnPublished>,
    subscribed: Waiting<OnSubscribed>,
    unsubscribed: Waiting<Box<dyn FnOnce(i32)>>,
    on_disconnected: RefCell<Option<Box<dyn FnOnce()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.get() {
            let _ = host::disconnect(handle);
        }
    }
}

thread_local! {
    static CLIENTS: RefCell<BTreeMap<u32, Weak<Inner>>> = RefCell::default();
}

/// An MQTT client. Clones share one connection.
#[derive(Clone, Default)]
pub struct Client(Rc<Inner>);

/// A new, unconnected client (imp: `mqtt.createclient()`).
pub fn create_client() -> Client {
    Client::default()
}

impl Client {
    /// Connects to `url` (`tcp://host[:port]` or `ssl://host[:port]`); the result code
    /// goes to [`Client::on_connect`].
    ///
    /// ```no_run
    /// use tether_guest::mqtt;
    /// let client = mqtt::create_client();
    /// client.on_connect(|code| tether_guest::server::log(format!("connected: {code}")));
    /// client.connect("tcp://broker.local", "agent-1", &mqtt::ConnectOptions::default()).unwrap();
    /// ```
    pub fn connect(&self, url: &str, client_id: &str, options: &ConnectOptions) -> Result<(), MqttError> {
        if self.0.handle.get().is_some() {
            return Err(MqttError::AlreadyConnected);
        }
        let will = options.will.as_ref().map(|w| host::Will { topic: w.topic.clone(), payload: w.message.clone(), qos: w.qos, retain: w.retain });
        let handle = host::connect(&host::ConnectOptions {
            url: url.to_owned(),
            client_id: client_id.to_owned(),
            username: options.username.clone(),
            password: options.password.clone(),
            keep_alive: options.keepalive,
            clean_session: options.clean_session,
            will,
            ca_pem: options.ca_pem.clone(),
            client_certificate: options.client_certificate.as_ref().map(|c| host::ClientCertificate { cert_pem: c.cert_pem.clone(), key_pem: c.key_pem.clone() }),
        })?;
        self.0.handle.set(Some(handle));
        self.0.last_handle.set(Some(handle));
        CLIENTS.with_borrow_mut(|c| c.insert(handle, Rc::downgrade(&self.0)));
        Ok(())
    }

    /// Called with the connect result code: 0 connected, -1 socket error, 1-5 CONNACK refusals.
    pub fn on_connect(&self, handler: impl Fn(i32) + 'static) {
        *self.0.on_connect.borrow_mut() = Some(Rc::new(handler));
    }

    /// Called when the connection breaks without [`Client::disconnect`]: -1 socket failed,
    /// -3 inbound message too large, -4 malformed frame.
    pub fn on_connection_lost(&self, handler: impl Fn(i32) + 'static) {
        *self.0.on_connection_lost.borrow_mut() = Some(Rc::new(handler));
    }

    /// Called for each message on a subscribed topic.
    pub fn on_message(&self, handler: impl Fn(ReceivedMessage) + 'static) {
        *self.0.on_message.borrow_mut() = Some(Rc::new(handler));
    }

    /// Whether the client is connected.
    pub fn is_connected(&self) -> bool {
        self.0.handle.get().is_some_and(host::is_connected)
    }

    /// Why the newest connect attempt failed or the connection was lost, in words the
    /// host chose (e.g. "keep-alive timeout: the broker did not answer a ping"); `None`
    /// when it did not. Beyond imp, whose callbacks give only the code.
    pub fn last_error(&self) -> Option<String> {
        self.0.last_handle.get().and_then(host::last_error)
    }

    fn handle(&self) -> Result<u32, MqttError> {
        self.0.handle.get().ok_or(MqttError::NotConnected)
    }

    /// A message to send later with [`Message::send_async`].
    pub fn create_message(&self, topic: &str, message: impl Into<Vec<u8>>, options: MessageOptions) -> Message {
        Message { client: self.clone(), topic: topic.to_owned(), payload: message.into(), options }
    }

    /// Subscribes to up to 10 topic filters at `qos`; `done` gets the result code (0, or
    /// 128 if the broker refused any) and the granted QoS per filter.
    pub fn subscribe(&self, topics: &[&str], qos: u8, done: impl FnOnce(i32, Vec<u8>) + 'static) -> Result<(), MqttError> {
        let filters: Vec<(String, u8)> = topics.iter().map(|t| ((*t).to_owned(), qos)).collect();
        let op = host::subscribe(self.handle()?, &filters)?;
        self.0.subscribed.borrow_mut().insert(op, Box::new(done));
        Ok(())
    }

    /// Unsubscribes from up to 10 topic filters; `done` gets the result code.
    pub fn unsubscribe(&self, topics: &[&str], done: impl FnOnce(i32) + 'static) -> Result<(), MqttError> {
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let op = host::unsubscribe(self.handle()?, &topics)?;
        self.0.unsubscribed.borrow_mut().insert(op, Box::new(done));
        Ok(())
    }

    /// Closes the connection; `done` runs once it is closed, after which the client may
    /// connect again.
    pub fn disconnect(&self, done: impl FnOnce() + 'static) -> Result<(), MqttError> {
        let handle = self.handle()?;
        *self.0.on_disconnected.borrow_mut() = Some(Box::new(done));
        host::disconnect(handle)?;
        Ok(())
    }
}

/// A message created by [`Client::create_message`].
pub struct Message {
    client: Client,
    topic: String,
    payload: Vec<u8>,
    options: MessageOptions,
}

impl Message {
    /// Publishes; `done` gets 0 once delivered per the QoS (QoS 0: written; QoS 1: PUBACK),
    /// or -3 if the connection closed first.
    pub fn send_async(&self, done: impl FnOnce(i32) + 'static) -> Result<(), MqttError> {
        self.client.publish(&self.topic, &self.payload, self.options, Box::new(done)).map_err(|(e, _)| e)
    }
}

impl Client {
    /// Publishes without a [`Message`] in between (no copy of topic or payload): for the
    /// SDK's own hot paths. A refusal gives `done` back, so the caller can answer it.
    pub(crate) fn publish(&self, topic: &str, payload: &[u8], options: MessageOptions, done: OnPublished) -> Result<(), (MqttError, OnPublished)> {
        let published = self.handle().and_then(|handle| Ok(host::publish(handle, topic, payload, options.qos, options.retain)?));
        match published {
            Ok(op) => {
                self.0.published.borrow_mut().insert(op, done);
                Ok(())
            }
            Err(e) => Err((e, done)),
        }
    }
}

fn client(handle: u32) -> Option<Rc<Inner>> {
    CLIENTS.with_borrow(|c| c.get(&handle).and_then(Weak::upgrade))
}

/// The connection `handle` is over: the client may connect again.
fn forget(inner: &Inner, handle: u32) {
    inner.handle.set(None);
    CLIENTS.with_borrow_mut(|c| c.remove(&handle));
}

pub(crate) fn connected(handle: u32, code: i32) {
    let Some(inner) = client(handle) else { return };
    if code != codes::SUCCESS {
        forget(&inner, handle);
    }
    let handler = inner.on_connect.borrow().clone();
    if let Some(h) = handler {
        h(code)
    }
}

pub(crate) fn message(handle: u32, m: host::Message) {
    let Some(inner) = client(handle) else { return };
    let handler = inner.on_message.borrow().clone();
    if let Some(h) = handler {
        h(ReceivedMessage { topic: m.topic, message: m.payload, qos: m.qos, retain: m.retain, dup: m.dup })
    }
}

pub(crate) fn published(handle: u32, op: u64, code: i32) {
    let Some(inner) = client(handle) else { return };
    let done = inner.published.borrow_mut().remove(&op);
    if let Some(done) = done {
        done(code)
    }
}

pub(crate) fn subscribed(handle: u32, op: u64, code: i32, granted: Vec<u8>) {
    let Some(inner) = client(handle) else { return };
    let done = inner.subscribed.borrow_mut().remove(&op);
    if let Some(done) = done {
        done(code, granted)
    }
}

pub(crate) fn unsubscribed(handle: u32, op: u64, code: i32) {
    let Some(inner) = client(handle) else { return };
    let done = inner.unsubscribed.borrow_mut().remove(&op);
    if let Some(done) = done {
        done(code)
    }
}

pub(crate) fn connection_lost(handle: u32, code: i32) {
    let Some(inner) = client(handle) else { return };
    forget(&inner, handle);
    let handler = inner.on_connection_lost.borrow().clone();
    if let Some(h) = handler {
        h(code)
    }
}

pub(crate) fn disconnected(handle: u32) {
    let Some(inner) = client(handle) else { return };
    forget(&inner, handle);
    let done = inner.on_disconnected.borrow_mut().take();
    if let Some(done) = done {
        done()
    }
}
