//! Messages with the agent's device (imp: `device.send`, `device.on`, `device.onconnect`,
//! `device.ondisconnect`, `device.isconnected`), plus a MessageManager-like request helper
//! with acknowledgement, reply, failure and timeout callbacks.
//!
//! Payloads are any serde type (or a raw [`Value`]); they travel as CBOR of the imp data
//! model (null, bool, integer, float, string, bytes, array, table with string keys).
//!
//! ```no_run
//! use tether_guest::{device, server};
//!
//! device::on("temperature", |celsius: f64| server::log(format!("{celsius} °C")));
//! device::on_connect(|info| server::log(format!("device {} connected", info.id)));
//! let _ = device::send("led", &true);
//! let _ = device::request("get-led", &())
//!     .on_reply(|on: bool| server::log(format!("LED is {}", if on { "on" } else { "off" })))
//!     .on_fail(|f| server::error(format!("no answer: {f}")))
//!     .timeout(5.0)
//!     .send();
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::fmt;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use device_link::Value;

use crate::bindings::tether::agent::device as host;
use crate::{imp, server};

/// Why a message was refused at once (imp's send error codes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No device is connected (and the message was not queued).
    #[error("device not connected")]
    NotConnected,
    /// Name plus payload are over 256 KiB or what the device accepts.
    #[error("message too large")]
    TooLarge,
    /// Too many messages wait to be sent.
    #[error("too many messages waiting for the device")]
    QueueFull,
    /// The data could not be encoded as a payload (e.g. a map with non-string keys).
    #[error("cannot encode the payload: {0}")]
    Encode(String),
}

impl From<host::SendError> for SendError {
    fn from(e: host::SendError) -> Self {
        match e {
            host::SendError::NotConnected => SendError::NotConnected,
            host::SendError::TooLarge => SendError::TooLarge,
            host::SendError::QueueFull => SendError::QueueFull,
            host::SendError::InvalidPayload => SendError::Encode("not a payload of the imp data model".into()),
        }
    }
}

/// Why a sent message did not arrive or was not handled (MessageManager's `onFail` reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The device has no handler for the name ("No handler error").
    NoHandler,
    /// The device found it too large.
    TooLarge,
    /// The device was busy; try again later.
    Busy,
    /// The device could not decode the payload, or its reply did not decode as expected.
    BadPayload,
    /// The device refused it for another reason.
    Refused,
    /// No answer in time.
    TimedOut,
    /// The device disconnected first ("No connection error").
    Disconnected,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Failure::NoHandler => "no handler",
            Failure::TooLarge => "too large",
            Failure::Busy => "device busy",
            Failure::BadPayload => "bad payload",
            Failure::Refused => "refused",
            Failure::TimedOut => "timed out",
            Failure::Disconnected => "no connection",
        })
    }
}

impl From<host::Failure> for Failure {
    fn from(f: host::Failure) -> Self {
        match f {
            host::Failure::NoHandler => Failure::NoHandler,
            host::Failure::TooLarge => Failure::TooLarge,
            host::Failure::Busy => Failure::Busy,
            host::Failure::BadPayload => Failure::BadPayload,
            host::Failure::Refused => Failure::Refused,
            host::Failure::TimedOut => Failure::TimedOut,
            host::Failure::Disconnected => Failure::Disconnected,
        }
    }
}

/// What the device said about itself when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's id.
    pub id: String,
    /// Its firmware version.
    pub firmware: String,
    /// Largest name plus payload one message may carry, bytes.
    pub max_message: u32,
}

/// Identifies a sent message in callbacks and logs.
pub type MessageId = u64;

/// A handler: decodes the payload and answers (`None`: ack, `Some`: reply).
type Handler = Rc<dyn Fn(&[u8]) -> Result<Option<Vec<u8>>, String>>;

/// Decodes a reply and runs the request's `on_reply`.
type ReplyHandler = Box<dyn FnOnce(&[u8]) -> Result<(), String>>;
type ConnectHandler = Rc<dyn Fn(&DeviceInfo)>;
type DisconnectHandler = Rc<dyn Fn(&str)>;

/// Callbacks of one request.
#[derive(Default)]
struct Callbacks {
    /// An awaited request: gets the outcome, and the other callbacks are not used.
    on_outcome: Option<Box<dyn FnOnce(Outcome)>>,
    on_ack: Option<Box<dyn FnOnce()>>,
    on_reply: Option<ReplyHandler>,
    on_fail: Option<Box<dyn FnOnce(Failure)>>,
    on_timeout: Option<Box<dyn FnOnce()>>,
    timer: Option<imp::Timer>,
}

#[derive(Default)]
struct Table {
    handlers: HashMap<String, Handler>,
    on_connect: Option<ConnectHandler>,
    on_disconnect: Option<DisconnectHandler>,
    requests: HashMap<MessageId, Callbacks>,
    /// Requests the SDK's own timeout ended: the host's later outcome for them is old news.
    timed_out: HashSet<MessageId>,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::default();
}

/// Registers the handler for messages named `name` (imp: `device.on`), replacing any
/// previous one. The payload is decoded as `T` (use [`Value`] to take anything); when the
/// device asked for an answer, it gets an ack after the handler returns.
pub fn on<T: DeserializeOwned + 'static>(name: &str, handler: impl Fn(T) + 'static) {
    set_handler(name, move |bytes| {
        handler(device_link::from_cbor(bytes).map_err(|e| e.to_string())?);
        Ok(None)
    });
}

/// The messages named `name`, decoded as `T`, to take one at a time with
/// [`Messages::next`] (beyond imp: the async form of [`on`], which it replaces). They are
/// kept, in order, from this call on until taken; a payload that does not decode as `T`
/// is refused to the device and never reaches the stream.
///
/// ```no_run
/// tether_guest::task::spawn(async {
///     let mut readings = tether_guest::device::messages::<f64>("temperature");
///     while let Some(celsius) = readings.next().await {
///         tether_guest::server::log(format!("{celsius} °C"));
///     }
/// });
/// ```
pub fn messages<T: DeserializeOwned + 'static>(name: &str) -> Messages<T> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    set_handler(name, move |bytes| {
        let value = device_link::from_cbor(bytes).map_err(|e| e.to_string())?;
        // The stream was dropped: the message is refused rather than dropped unseen.
        tx.unbounded_send(value).map_err(|_| "nobody takes these messages any more".to_owned())?;
        Ok(None)
    });
    Messages(rx)
}

/// The stream of [`messages`].
pub struct Messages<T>(futures::channel::mpsc::UnboundedReceiver<T>);

impl<T> Messages<T> {
    /// The next message; `None` once its handler was replaced or removed.
    pub async fn next(&mut self) -> Option<T> {
        futures::StreamExt::next(&mut self.0).await
    }
}

/// Registers a handler whose return value is sent back as the reply (the device's
/// `on_reply`; MessageManager's `reply(data)`).
pub fn on_request<T: DeserializeOwned + 'static, R: Serialize>(name: &str, handler: impl Fn(T) -> R + 'static) {
    set_handler(name, move |bytes| {
        let reply = handler(device_link::from_cbor(bytes).map_err(|e| e.to_string())?);
        device_link::to_cbor(&reply).map(Some).map_err(|e| format!("cannot encode the reply: {e}"))
    });
}

fn set_handler(name: &str, handler: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, String> + 'static) {
    TABLE.with_borrow_mut(|t| t.handlers.insert(name.to_owned(), Rc::new(handler)));
}

/// Stops handling `name`: its messages are refused with "no handler" again.
pub fn remove(name: &str) {
    TABLE.with_borrow_mut(|t| t.handlers.remove(name));
}

/// Calls `handler` each time the device connects (imp: `device.onconnect`).
pub fn on_connect(handler: impl Fn(&DeviceInfo) + 'static) {
    TABLE.with_borrow_mut(|t| t.on_connect = Some(Rc::new(handler)));
}

/// Calls `handler` with the reason each time the device disconnects or stops answering
/// (imp: `device.ondisconnect`).
pub fn on_disconnect(handler: impl Fn(&str) + 'static) {
    TABLE.with_borrow_mut(|t| t.on_disconnect = Some(Rc::new(handler)));
}

/// Whether the device is connected now (imp: `device.isconnected`).
pub fn is_connected() -> bool {
    host::is_connected()
}

/// Sends a message (imp: `device.send`): fails at once with [`SendError::NotConnected`]
/// when no device is connected. A [`Value`] is sent as is.
pub fn send<T: Serialize + ?Sized>(name: &str, data: &T) -> Result<MessageId, SendError> {
    raw_send(name, data, host::SendFlags::empty())
}

/// Like [`send`], but while no device is connected the message waits (a bounded queue)
/// and goes out when one connects.
pub fn send_queued<T: Serialize + ?Sized>(name: &str, data: &T) -> Result<MessageId, SendError> {
    raw_send(name, data, host::SendFlags::QUEUED)
}

fn raw_send<T: Serialize + ?Sized>(name: &str, data: &T, flags: host::SendFlags) -> Result<MessageId, SendError> {
    let payload = device_link::to_cbor(data).map_err(|e| SendError::Encode(e.to_string()))?;
    Ok(host::send(name, &payload, flags)?)
}

/// Starts a request: a message the device acknowledges, refuses or replies to
/// (MessageManager's `mm.send` with `onAck`/`onReply`/`onFail`/`onTimeout`).
pub fn request<T: Serialize + ?Sized>(name: &str, data: &T) -> Request {
    Request {
        name: name.to_owned(),
        payload: device_link::to_cbor(data).map_err(|e| SendError::Encode(e.to_string())),
        callbacks: Callbacks::default(),
        timeout: None,
        queued: false,
    }
}

/// A request being built; nothing is sent before [`Request::send`].
#[must_use = "a request is sent by .send()"]
pub struct Request {
    name: String,
    payload: Result<Vec<u8>, SendError>,
    callbacks: Callbacks,
    timeout: Option<f64>,
    queued: bool,
}

impl Request {
    /// Called when the device handled the message without reply data (or with reply data
    /// and no `on_reply` is set).
    pub fn on_ack(mut self, f: impl FnOnce() + 'static) -> Self {
        self.callbacks.on_ack = Some(Box::new(f));
        self
    }

    /// Called with the device's reply decoded as `T` (a reply that does not decode is a
    /// [`Failure::BadPayload`]).
    pub fn on_reply<T: DeserializeOwned + 'static>(mut self, f: impl FnOnce(T) + 'static) -> Self {
        self.callbacks.on_reply = Some(Box::new(move |bytes| {
            f(device_link::from_cbor(bytes).map_err(|e| e.to_string())?);
            Ok(())
        }));
        self
    }

    /// Called when the message was not delivered or not handled (and for a timeout when
    /// no `on_timeout` is set).
    pub fn on_fail(mut self, f: impl FnOnce(Failure) + 'static) -> Self {
        self.callbacks.on_fail = Some(Box::new(f));
        self
    }

    /// Called when no answer came in time.
    pub fn on_timeout(mut self, f: impl FnOnce() + 'static) -> Self {
        self.callbacks.on_timeout = Some(Box::new(f));
        self
    }

    /// Gives up after `seconds` (default: the link's acknowledgement timeout, 10 s). An
    /// answer arriving later is ignored.
    pub fn timeout(mut self, seconds: f64) -> Self {
        self.timeout = Some(seconds);
        self
    }

    /// Holds the request while no device is connected, instead of failing at once.
    pub fn queued(mut self) -> Self {
        self.queued = true;
        self
    }

    /// Sends it. Errors here are immediate refusals; later outcomes go to the callbacks.
    pub fn send(self) -> Result<MessageId, SendError> {
        let Request { name, payload, mut callbacks, timeout, queued } = self;
        let flags = if queued { host::SendFlags::ACK | host::SendFlags::QUEUED } else { host::SendFlags::ACK };
        let id = host::send(&name, &payload?, flags)?;
        if let Some(seconds) = timeout {
            callbacks.timer = Some(imp::wakeup(seconds, move || {
                TABLE.with_borrow_mut(|t| t.timed_out.insert(id));
                finish(id, Outcome::Failed(Failure::TimedOut))
            }));
        }
        TABLE.with_borrow_mut(|t| t.requests.insert(id, callbacks));
        Ok(id)
    }
}

/// Waits for the device's answer (beyond imp: the async form of the callbacks).
/// Callbacks set on the request are not called when it is awaited.
///
/// ```no_run
/// use tether_guest::device::{self, DeviceError};
/// # async fn f() -> Result<(), DeviceError> {
/// let position: u8 = device::request("vent", &50u8).timeout(5.0).await?.decode()?;
/// # Ok(()) }
/// ```
impl IntoFuture for Request {
    type Output = Result<Reply, DeviceError>;
    type IntoFuture = futures::future::LocalBoxFuture<'static, Self::Output>;

    fn into_future(mut self) -> Self::IntoFuture {
        let (tx, rx) = crate::task::oneshot();
        self.callbacks = Callbacks {
            on_outcome: Some(Box::new(move |outcome| {
                tx.send(outcome);
            })),
            ..Callbacks::default()
        };
        let sent = self.send();
        Box::pin(async move {
            sent?;
            // The callback is only dropped unsent when the agent is ending.
            match rx.await.unwrap_or(Outcome::Failed(Failure::Disconnected)) {
                Outcome::Acked => Ok(Reply { payload: None }),
                Outcome::Replied(payload) => Ok(Reply { payload: Some(payload) }),
                Outcome::Failed(failure) => Err(DeviceError::Failed(failure)),
            }
        })
    }
}

/// The device's answer to an awaited [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// CBOR; `None` when the device acknowledged without reply data.
    payload: Option<Vec<u8>>,
}

impl Reply {
    /// Whether the device acknowledged without reply data.
    pub fn is_ack(&self) -> bool {
        self.payload.is_none()
    }

    /// The reply data as `T`. An acknowledgement decodes as `()` or `Option::None`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DeviceError> {
        let decoded = match &self.payload {
            Some(bytes) => device_link::from_cbor(bytes).map_err(|e| e.to_string()),
            None => T::deserialize(serde::de::value::UnitDeserializer::<serde::de::value::Error>::new()).map_err(|_| "the device acknowledged without reply data".to_owned()),
        };
        decoded.map_err(|reason| DeviceError::BadReply { expected: std::any::type_name::<T>(), reason })
    }
}

/// Why an awaited [`Request`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Refused before sending.
    #[error("not sent: {0}")]
    NotSent(#[from] SendError),
    /// Sent, and not handled.
    #[error("{}", explain(*.0))]
    Failed(Failure),
    /// The device answered with data that is not the type asked for.
    #[error("the device's reply is not a {expected}: {reason}")]
    BadReply { expected: &'static str, reason: String },
}

/// What a person can do about each failure.
fn explain(failure: Failure) -> &'static str {
    match failure {
        Failure::NoHandler => "the device has no handler for this message name",
        Failure::TooLarge => "the device found the message too large",
        Failure::Busy => "the device was busy; try again later",
        Failure::BadPayload => "the device could not decode the payload",
        Failure::Refused => "the device refused the message",
        Failure::TimedOut => "no answer from the device in time; allow longer with .timeout(seconds)",
        Failure::Disconnected => "the device disconnected before answering; .queued() waits for it to come back",
    }
}

/// How a request ended.
enum Outcome {
    Acked,
    Replied(Vec<u8>),
    Failed(Failure),
}

/// Runs the callbacks of request `id` for `outcome`; each request finishes once.
fn finish(id: MessageId, outcome: Outcome) {
    let (callbacks, ended_already) = TABLE.with_borrow_mut(|t| {
        let callbacks = t.requests.remove(&id);
        // The SDK's timeout answered it; what the host says now changes nothing.
        let ended_already = callbacks.is_none() && t.timed_out.remove(&id);
        (callbacks, ended_already)
    });
    let Some(mut cb) = callbacks else {
        // A plain `send` that failed has no callbacks: say so rather than drop it silently.
        if let Outcome::Failed(f) = outcome
            && !ended_already
        {
            server::error(format!("device message {id} not delivered: {f}"));
        }
        return;
    };
    if let Some(timer) = cb.timer.take() {
        imp::cancel_wakeup(timer);
    }
    if let Some(f) = cb.on_outcome {
        return f(outcome);
    }
    match outcome {
        Outcome::Replied(bytes) if cb.on_reply.is_some() => {
            if let Some(Err(e)) = cb.on_reply.map(|f| f(&bytes)) {
                server::error(format!("device reply to message {id}: {e}"));
                if let Some(f) = cb.on_fail {
                    f(Failure::BadPayload)
                }
            }
        }
        Outcome::Acked | Outcome::Replied(_) => {
            if let Some(f) = cb.on_ack {
                f()
            }
        }
        Outcome::Failed(Failure::TimedOut) if cb.on_timeout.is_some() => {
            if let Some(f) = cb.on_timeout {
                f()
            }
        }
        Outcome::Failed(failure) => {
            if let Some(f) = cb.on_fail {
                f(failure)
            }
        }
    }
}

pub(crate) fn message(name: String, payload: Vec<u8>, id: Option<u64>) {
    // Cloned out: the handler may register or remove handlers.
    let handler = TABLE.with_borrow(|t| t.handlers.get(&name).cloned());
    let answer = match handler {
        None => {
            server::error(format!("no handler for device message {name:?}"));
            host::Answer::NoHandler
        }
        Some(h) => match h(&payload) {
            Ok(None) => host::Answer::Ack,
            Ok(Some(reply)) => host::Answer::Reply(reply),
            Err(e) => {
                server::error(format!("device message {name:?}: {e}"));
                host::Answer::BadPayload
            }
        },
    };
    if let Some(id) = id {
        host::respond(id, &answer);
    }
}

pub(crate) fn connected(info: host::DeviceInfo) {
    let info = DeviceInfo { id: info.id, firmware: info.firmware, max_message: info.max_message };
    if let Some(f) = TABLE.with_borrow(|t| t.on_connect.clone()) {
        f(&info)
    }
}

pub(crate) fn disconnected(reason: String) {
    if let Some(f) = TABLE.with_borrow(|t| t.on_disconnect.clone()) {
        f(&reason)
    }
}

pub(crate) fn acked(id: u64) {
    finish(id, Outcome::Acked)
}

pub(crate) fn replied(id: u64, payload: Vec<u8>) {
    finish(id, Outcome::Replied(payload))
}

pub(crate) fn failed(id: u64, failure: host::Failure) {
    finish(id, Outcome::Failed(failure.into()))
}
