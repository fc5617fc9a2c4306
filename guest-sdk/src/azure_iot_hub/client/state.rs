//! The client's state machine, without I/O: where the connection stands, which features
//! are enabled or being enabled, and the operations in flight (sends, twin requests, direct
//! method calls) with their request ids and deadlines.
//!
//! Each method takes one input (an agent's call, an MQTT result, a response's status and
//! request id, the time) and returns what follows; `transport` performs it. Callbacks are
//! stored as data and handed back as [`Completion`]s, to be run once the state is no longer
//! borrowed. Keeping MQTT, timers and logging out of here is what lets the rules (the
//! documented error codes, the transitions, the timeouts, when a token refresh may start)
//! be unit-tested on the host.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

use serde_json::{Map, Value};

use super::retry::{Backoff, Outcome};
use super::{ClientOptions, MethodReply};
use crate::azure_iot_hub::{
    DirectMethodResponse, ERROR_ALREADY_CONNECTED, ERROR_ALREADY_ENABLED, ERROR_GENERAL, ERROR_NOT_CONNECTED, ERROR_NOT_ENABLED, ERROR_OP_NOT_ALLOWED_NOW, ERROR_OP_TIMED_OUT, Message,
};

/// `on_done` of enabling or disabling a feature.
pub(super) type Done = Box<dyn FnOnce(i32)>;
/// `on_sent` of a device-to-cloud message.
pub(super) type OnSent = Box<dyn FnOnce(i32, Message)>;
/// `on_retrieved(err, reported, desired)` of a twin retrieve.
pub(super) type OnRetrieved = Box<dyn FnOnce(i32, Option<Value>, Option<Value>)>;
/// `on_updated` of a reported-properties update.
pub(super) type OnUpdated = Box<dyn FnOnce(i32, Map<String, Value>)>;
/// `on_reply_sent` of a direct method reply.
pub(super) type OnReplySent = Box<dyn FnOnce(i32, DirectMethodResponse)>;
/// The agent's handler of cloud-to-device messages.
pub(super) type OnMessage = Rc<dyn Fn(Message)>;
/// The agent's handler of desired-properties patches.
pub(super) type OnDesired = Rc<dyn Fn(Map<String, Value>)>;
/// The agent's direct method handler.
pub(super) type OnMethod = Rc<dyn Fn(String, Option<Value>, MethodReply)>;

/// The optional features, each enabled by subscribing to its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feature {
    Messages = 0,
    Twin = 1,
    Methods = 2,
}

impl Feature {
    const ALL: [Feature; 3] = [Feature::Messages, Feature::Twin, Feature::Methods];
}

/// The agent's handler of an enabled feature.
pub(super) enum Handler {
    Messages(OnMessage),
    Twin(OnDesired),
    Methods(OnMethod),
}

/// An agent's call made during a token refresh, replayed once the refresh is over (or
/// against the disconnected client if it fails).
pub(super) enum Call {
    Send(Message, OnSent),
    /// `None`: disable.
    Enable(Feature, Option<Handler>, Done),
    Retrieve(OnRetrieved),
    Update(Map<String, Value>, OnUpdated),
    /// Close the connection: `disconnect()` came during the refresh.
    Close,
}

/// A callback with its arguments, ready to run.
pub(super) enum Completion {
    Done(Done, i32),
    Sent(OnSent, i32, Message),
    Retrieved(OnRetrieved, i32, Option<Value>, Option<Value>),
    Updated(OnUpdated, i32, Map<String, Value>),
    Replied(OnReplySent, i32, DirectMethodResponse),
}

impl Completion {
    /// Calls the callback.
    pub(super) fn run(self) {
        match self {
            Completion::Done(done, code) => done(code),
            Completion::Sent(done, code, message) => done(code, message),
            Completion::Retrieved(done, code, reported, desired) => done(code, reported, desired),
            Completion::Updated(done, code, props) => done(code, props),
            Completion::Replied(done, code, response) => done(code, response),
        }
    }
}

/// What to do with an agent's call that starts an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Start it now.
    Go,
    /// Keep it until the token refresh under way is over.
    Queue,
    /// Answer it at once with this code.
    Refuse(i32),
}

/// What follows an MQTT connect result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterConnect {
    /// A token refresh reconnected: re-subscribe the enabled features, then end it.
    Resubscribe,
    /// A token refresh could not reconnect: the connection is lost.
    Lost,
    /// `disconnect()` came while connecting: close the new connection.
    Close,
    /// `disconnect()` came while connecting and the connect failed: the disconnect is done.
    Closed,
    /// Tell the agent the result.
    Report,
    /// A transient failure while the client reconnects by itself: try again later.
    Retry,
}

/// What `disconnect()` does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closing {
    /// Close the MQTT connection; `on_disconnected(0)` follows when it is closed.
    Close,
    /// Nothing yet: the connection closes once established, or once the refresh is over.
    Later,
    /// The client was waiting to reconnect: it stops, and the agent is told at once.
    Stopped,
    /// Already disconnected or disconnecting.
    Nothing,
}

/// What a twin response answers.
pub(super) enum TwinAnswer {
    Answered(Completion),
    /// A successful retrieve whose body is not a twin document: answered with 1100.
    BadDocument(Completion),
    /// No pending request has that id.
    UnknownRequest,
}

/// Where the connection stands. `then_disconnect`: `disconnect()` came meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    Disconnected,
    /// `connect()` waits for the MQTT connect result.
    Connecting { then_disconnect: bool },
    Connected,
    /// Reconnecting with a new SAS token, invisibly to the agent.
    Refreshing { then_disconnect: bool },
    /// `disconnect()` waits for the MQTT connection to close.
    Disconnecting,
    /// Lost, and reconnecting by itself (beyond 5.1.0): waiting for the next attempt, or
    /// (`trying`) in one.
    Reconnecting { trying: bool },
}

struct TwinGet {
    rid: String,
    done: OnRetrieved,
    /// When the request was published: its timeout runs from there.
    sent_at: Option<f64>,
}

struct TwinUpdate {
    props: Map<String, Value>,
    done: OnUpdated,
    sent_at: Option<f64>,
}

struct MethodCall {
    received_at: f64,
    /// Set while the reply is being published.
    reply: Option<(DirectMethodResponse, OnReplySent)>,
}

/// The client's state. Times are seconds on one monotonic clock, given by the caller.
pub(super) struct Machine {
    options: ClientOptions,
    connection: Connection,
    /// A token refresh fell due while operations were in flight: it starts when they end.
    refresh_paused: bool,
    token_expires_at: u64,
    on_message: Option<OnMessage>,
    on_twin: Option<OnDesired>,
    on_method: Option<OnMethod>,
    enabling: [Option<Done>; 3],
    next_send: u64,
    sending: BTreeMap<u64, (Message, OnSent)>,
    twin_get: Option<TwinGet>,
    twin_updates: BTreeMap<u64, TwinUpdate>,
    methods: HashMap<String, MethodCall>,
    /// The next twin request id, shared by retrieves and updates.
    req_num: u64,
    deferred: VecDeque<Call>,
    /// When to reconnect after a loss, with `options.reconnect`.
    backoff: Backoff,
    /// The refresh under way is a reconnect: the agent is told once it is over.
    announce: bool,
    /// Outbox messages being published (see `outbox`); they share
    /// `max_pending_send_requests` with the agent's own sends.
    outbox_in_flight: usize,
}

impl Machine {
    pub(super) fn new(options: ClientOptions) -> Machine {
        Machine {
            options,
            connection: Connection::Disconnected,
            refresh_paused: false,
            token_expires_at: 0,
            on_message: None,
            on_twin: None,
            on_method: None,
            enabling: Default::default(),
            next_send: 0,
            sending: BTreeMap::new(),
            twin_get: None,
            twin_updates: BTreeMap::new(),
            methods: HashMap::new(),
            req_num: 0,
            deferred: VecDeque::new(),
            backoff: Backoff::default(),
            announce: false,
            outbox_in_flight: 0,
        }
    }

    /// Connected, refreshing the token or disconnecting (imp: `isConnected`).
    pub(super) fn is_connected(&self) -> bool {
        matches!(self.connection, Connection::Connected | Connection::Refreshing { .. } | Connection::Disconnecting)
    }

    fn disconnecting(&self) -> bool {
        matches!(
            self.connection,
            Connection::Connecting { then_disconnect: true } | Connection::Refreshing { then_disconnect: true } | Connection::Disconnecting
        )
    }

    fn refreshing(&self) -> bool {
        matches!(self.connection, Connection::Refreshing { .. })
    }

    fn enabled(&self, f: Feature) -> bool {
        match f {
            Feature::Messages => self.on_message.is_some(),
            Feature::Twin => self.on_twin.is_some(),
            Feature::Methods => self.on_method.is_some(),
        }
    }

    /// The enabled features, in [`Feature`] order.
    pub(super) fn enabled_features(&self) -> impl Iterator<Item = Feature> + '_ {
        Feature::ALL.into_iter().filter(|&f| self.enabled(f))
    }

    /// Two-phase operations and sends in flight: a token refresh waits for them.
    fn busy(&self) -> bool {
        self.enabling.iter().any(Option::is_some)
            || !self.sending.is_empty()
            || self.outbox_in_flight > 0
            || self.twin_get.is_some()
            || !self.twin_updates.is_empty()
            || !self.methods.is_empty()
            || self.refreshing()
    }

    /// The error for an operation while not (fully) connected, if any.
    fn not_ready(&self) -> Option<i32> {
        match self.connection {
            // Documented as 1004 ("the connection is still being established"); 5.1.0's
            // code answered 1000 here.
            Connection::Connecting { .. } => Some(ERROR_OP_NOT_ALLOWED_NOW),
            Connection::Disconnected | Connection::Reconnecting { .. } => Some(ERROR_NOT_CONNECTED),
            Connection::Disconnecting | Connection::Refreshing { then_disconnect: true } => Some(ERROR_OP_NOT_ALLOWED_NOW),
            Connection::Connected | Connection::Refreshing { then_disconnect: false } => None,
        }
    }

    /// Refuses with `refusal`, else queues during a token refresh.
    fn gate(&self, refusal: Option<i32>) -> Verdict {
        match refusal {
            Some(code) => Verdict::Refuse(code),
            None if self.refreshing() => Verdict::Queue,
            None => Verdict::Go,
        }
    }

    /// Keeps a call until the token refresh is over.
    pub(super) fn defer(&mut self, call: Call) {
        self.deferred.push_back(call);
    }

    /// The calls kept during a token refresh, oldest first.
    pub(super) fn take_deferred(&mut self) -> VecDeque<Call> {
        std::mem::take(&mut self.deferred)
    }

    /// `connect()`: `Err` is the code for `on_connected` (1001, 1004).
    pub(super) fn connect(&mut self) -> Result<(), i32> {
        match self.connection {
            Connection::Connected | Connection::Refreshing { .. } | Connection::Disconnecting => Err(ERROR_ALREADY_CONNECTED),
            Connection::Connecting { .. } | Connection::Reconnecting { .. } => Err(ERROR_OP_NOT_ALLOWED_NOW),
            Connection::Disconnected => {
                self.connection = Connection::Connecting { then_disconnect: false };
                Ok(())
            }
        }
    }

    /// The MQTT connect could not even start.
    pub(super) fn connect_failed(&mut self) {
        self.stop();
    }

    /// Disconnected for good (not reconnecting): features kept through a reconnect wait
    /// end here, so that enabling them again subscribes on the next connection.
    fn stop(&mut self) {
        self.connection = Connection::Disconnected;
        self.on_message = None;
        self.on_twin = None;
        self.on_method = None;
    }

    /// The MQTT connect result `err` (0 = connected) at `now`.
    pub(super) fn connect_result(&mut self, err: i32, now: f64) -> AfterConnect {
        if err == 0 {
            self.backoff.connected(now);
        }
        match self.connection {
            Connection::Reconnecting { .. } if err == 0 => {
                // Features come back before the agent is told, as in a token refresh.
                self.connection = Connection::Refreshing { then_disconnect: false };
                self.announce = true;
                AfterConnect::Resubscribe
            }
            Connection::Reconnecting { .. } => self.retry_or_give_up(err),
            Connection::Connecting { then_disconnect: false } if err != 0 && self.options.reconnect.is_some() => self.retry_or_give_up(err),
            Connection::Refreshing { .. } if err != 0 => {
                self.end_refresh();
                AfterConnect::Lost
            }
            Connection::Refreshing { .. } => AfterConnect::Resubscribe,
            Connection::Connecting { then_disconnect: true } if err == 0 => {
                self.connection = Connection::Disconnecting;
                AfterConnect::Close
            }
            // 5.1.0 stayed stuck "disconnecting" here; the documented outcome is a
            // completed disconnect.
            Connection::Connecting { then_disconnect: true } => {
                self.stop();
                AfterConnect::Closed
            }
            _ => {
                self.connection = if err == 0 { Connection::Connected } else { Connection::Disconnected };
                AfterConnect::Report
            }
        }
    }

    /// A failed attempt of a client that reconnects by itself: another one follows after
    /// [`Machine::retry_delay`], unless the failure will not heal.
    fn retry_or_give_up(&mut self, err: i32) -> AfterConnect {
        match self.backoff.failed(err) {
            Outcome::Retry => {
                self.connection = Connection::Reconnecting { trying: false };
                AfterConnect::Retry
            }
            Outcome::GiveUp => {
                self.stop();
                AfterConnect::Report
            }
        }
    }

    /// `disconnect()`. While connecting the connection is closed once established; during
    /// a token refresh, once the refresh is over.
    pub(super) fn disconnect(&mut self) -> Closing {
        match self.connection {
            Connection::Connected => {
                self.connection = Connection::Disconnecting;
                Closing::Close
            }
            Connection::Connecting { then_disconnect: false } | Connection::Reconnecting { trying: true } => {
                self.connection = Connection::Connecting { then_disconnect: true };
                Closing::Later
            }
            Connection::Refreshing { then_disconnect: false } => {
                self.connection = Connection::Refreshing { then_disconnect: true };
                self.defer(Call::Close);
                Closing::Later
            }
            Connection::Reconnecting { trying: false } => {
                self.stop();
                Closing::Stopped
            }
            _ => Closing::Nothing,
        }
    }

    /// Whether a connection lost at `now` (not asked for) is to be reconnected by the
    /// client: then it waits for its next attempt, features kept; see [`Machine::lose`].
    pub(super) fn reconnects_after_loss(&mut self, now: f64) -> bool {
        if self.options.reconnect.is_none() || self.disconnecting() {
            return false;
        }
        self.backoff.lost(now);
        self.connection = Connection::Reconnecting { trying: false };
        true
    }

    /// The wait before the next reconnect attempt, s, for `random` in [0, 1).
    pub(super) fn retry_delay(&self, random: f64) -> f64 {
        self.options.reconnect.map_or(0.0, |settings| self.backoff.delay(&settings, random))
    }

    /// The reconnect timer fired: whether to attempt now (not if `disconnect()` came).
    pub(super) fn start_attempt(&mut self) -> bool {
        if self.connection != (Connection::Reconnecting { trying: false }) {
            return false;
        }
        self.connection = Connection::Reconnecting { trying: true };
        true
    }

    /// Whether the agent is to be told that a reconnect is complete (once).
    pub(super) fn take_announce(&mut self) -> bool {
        std::mem::take(&mut self.announce)
    }

    /// The code for `on_disconnected` when the connection closes now: 0 if asked for.
    pub(super) fn disconnect_reason(&self) -> i32 {
        if self.disconnecting() { 0 } else { ERROR_GENERAL }
    }

    /// Back to disconnected with every feature off. Returns the answers (1000) to every
    /// pending callback, in the order they are due. Calls kept during a refresh stay, to be
    /// taken and replayed against the disconnected client.
    pub(super) fn reset(&mut self) -> Vec<Completion> {
        self.stop();
        self.lose()
    }

    /// The connection is gone but the client reconnects: the enabled features stay, to
    /// be subscribed again; every pending callback is answered (1000), as in [`reset`].
    ///
    /// [`reset`]: Machine::reset
    pub(super) fn lose(&mut self) -> Vec<Completion> {
        self.refresh_paused = false;
        self.announce = false;
        self.outbox_in_flight = 0;
        let enabling = std::mem::take(&mut self.enabling).into_iter().flatten().map(|done| Completion::Done(done, ERROR_NOT_CONNECTED));
        let sending = std::mem::take(&mut self.sending).into_values().map(|(msg, done)| Completion::Sent(done, ERROR_NOT_CONNECTED, msg));
        let get = self.twin_get.take().map(|get| Completion::Retrieved(get.done, ERROR_NOT_CONNECTED, None, None));
        let updates = std::mem::take(&mut self.twin_updates).into_values().map(|u| Completion::Updated(u.done, ERROR_NOT_CONNECTED, u.props));
        let replies = std::mem::take(&mut self.methods).into_values().filter_map(|call| call.reply).map(|(resp, done)| Completion::Replied(done, ERROR_NOT_CONNECTED, resp));
        enabling.chain(sending).chain(get).chain(updates).chain(replies).collect()
    }

    /// `send_message()`.
    pub(super) fn send_verdict(&self) -> Verdict {
        match self.gate(self.not_ready()) {
            Verdict::Go if self.sending.len() >= self.options.max_pending_send_requests => Verdict::Refuse(ERROR_OP_NOT_ALLOWED_NOW),
            verdict => verdict,
        }
    }

    /// How many outbox messages may be published now: none unless connected, and none
    /// while a token refresh waits for the operations in flight to end.
    pub(super) fn outbox_slots(&self) -> usize {
        if self.connection != Connection::Connected || self.refresh_paused {
            return 0;
        }
        self.options.max_pending_send_requests.saturating_sub(self.sending.len() + self.outbox_in_flight)
    }

    /// An outbox message is being published.
    pub(super) fn outbox_publishing(&mut self) {
        self.outbox_in_flight += 1;
    }

    /// An outbox message's publish completed with `code`.
    pub(super) fn outbox_published(&mut self, code: i32) {
        self.outbox_in_flight = self.outbox_in_flight.saturating_sub(1);
        if code == 0 {
            self.backoff.acked();
        }
    }

    /// Records a send about to be published; returns its id.
    pub(super) fn start_send(&mut self, message: Message, on_sent: OnSent) -> u64 {
        self.next_send += 1;
        self.sending.insert(self.next_send, (message, on_sent));
        self.next_send
    }

    /// The body of send `id`, while it is in flight.
    pub(super) fn sending_body(&self, id: u64) -> Option<&[u8]> {
        self.sending.get(&id).map(|(message, _)| message.body())
    }

    /// The publish of send `id` completed with `code`.
    pub(super) fn sent(&mut self, id: u64, code: i32) -> Option<Completion> {
        if code == 0 {
            self.backoff.acked();
        }
        self.sending.remove(&id).map(|(message, done)| Completion::Sent(done, code, message))
    }

    /// Enabling (`enable`) or disabling a feature.
    pub(super) fn enable_verdict(&self, feature: Feature, enable: bool) -> Verdict {
        let enabled = self.enabled(feature);
        self.gate(self.not_ready().or(if self.enabling[feature as usize].is_some() {
            Some(ERROR_OP_NOT_ALLOWED_NOW)
        } else if enabled && enable {
            Some(ERROR_ALREADY_ENABLED)
        } else if !enabled && !enable {
            Some(ERROR_NOT_ENABLED)
        } else {
            None
        }))
    }

    /// Records a feature being (un)subscribed.
    pub(super) fn start_enabling(&mut self, feature: Feature, on_done: Done) {
        self.enabling[feature as usize] = Some(on_done);
    }

    /// The feature's (un)subscribe completed with `code`; only success changes the
    /// feature, to `handler` (`None`: disabled).
    pub(super) fn enable_done(&mut self, feature: Feature, handler: Option<Handler>, code: i32) -> Option<Completion> {
        if code == 0 {
            match handler {
                Some(Handler::Messages(h)) => self.on_message = Some(h),
                Some(Handler::Twin(h)) => self.on_twin = Some(h),
                Some(Handler::Methods(h)) => self.on_method = Some(h),
                None => match feature {
                    Feature::Messages => self.on_message = None,
                    Feature::Twin => self.on_twin = None,
                    Feature::Methods => self.on_method = None,
                },
            }
        }
        self.enabling[feature as usize].take().map(|done| Completion::Done(done, code))
    }

    /// The handler of cloud-to-device messages, if enabled.
    pub(super) fn message_handler(&self) -> Option<OnMessage> {
        self.on_message.clone()
    }

    /// The handler of desired-properties patches, if twins are enabled.
    pub(super) fn twin_handler(&self) -> Option<OnDesired> {
        self.on_twin.clone()
    }

    /// `retrieve_twin_properties()`.
    pub(super) fn retrieve_verdict(&self) -> Verdict {
        self.gate(self.not_ready().or(if self.on_twin.is_none() {
            Some(ERROR_NOT_ENABLED)
        } else if self.twin_get.is_some() {
            Some(ERROR_OP_NOT_ALLOWED_NOW)
        } else {
            None
        }))
    }

    /// Records a retrieve about to be published; returns its request id.
    pub(super) fn start_retrieve(&mut self, done: OnRetrieved) -> String {
        let rid = self.req_num.to_string();
        self.req_num += 1;
        self.twin_get = Some(TwinGet { rid: rid.clone(), done, sent_at: None });
        rid
    }

    /// The publish of retrieve `rid` completed with `code` at `now`; a failure answers it.
    pub(super) fn retrieve_published(&mut self, rid: &str, code: i32, now: f64) -> Option<Completion> {
        if code == 0 {
            if let Some(get) = self.twin_get.as_mut().filter(|g| g.rid == rid) {
                get.sent_at = Some(now);
            }
            None
        } else {
            self.twin_get.take().map(|get| Completion::Retrieved(get.done, code, None, None))
        }
    }

    /// `update_twin_properties()`.
    pub(super) fn update_verdict(&self) -> Verdict {
        self.gate(self.not_ready().or(if self.on_twin.is_none() {
            Some(ERROR_NOT_ENABLED)
        } else if self.twin_updates.len() >= self.options.max_pending_twin_requests {
            Some(ERROR_OP_NOT_ALLOWED_NOW)
        } else {
            None
        }))
    }

    /// Records an update about to be published; returns its request id.
    pub(super) fn start_update(&mut self, props: Map<String, Value>, done: OnUpdated) -> u64 {
        let rid = self.req_num;
        self.req_num += 1;
        self.twin_updates.insert(rid, TwinUpdate { props, done, sent_at: None });
        rid
    }

    /// The publish of update `rid` completed with `code` at `now`; a failure answers it.
    pub(super) fn update_published(&mut self, rid: u64, code: i32, now: f64) -> Option<Completion> {
        if code == 0 {
            if let Some(u) = self.twin_updates.get_mut(&rid) {
                u.sent_at = Some(now);
            }
            None
        } else {
            self.twin_updates.remove(&rid).map(|u| Completion::Updated(u.done, code, u.props))
        }
    }

    /// A twin response with `status` for request `rid`: a 2xx is success (0), anything
    /// else is passed on as the error code.
    pub(super) fn twin_response(&mut self, status: i32, rid: &str, body: &[u8]) -> TwinAnswer {
        let ok = status / 100 == 2;
        if let Some(u) = rid.parse::<u64>().ok().and_then(|r| self.twin_updates.remove(&r)) {
            return TwinAnswer::Answered(Completion::Updated(u.done, if ok { 0 } else { status }, u.props));
        }
        let Some(get) = self.twin_get.take_if(|g| g.rid == rid) else {
            return TwinAnswer::UnknownRequest;
        };
        if !ok {
            return TwinAnswer::Answered(Completion::Retrieved(get.done, status, None, None));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut twin)) if twin.contains_key("reported") && twin.contains_key("desired") => {
                TwinAnswer::Answered(Completion::Retrieved(get.done, 0, twin.remove("reported"), twin.remove("desired")))
            }
            _ => TwinAnswer::BadDocument(Completion::Retrieved(get.done, ERROR_GENERAL, None, None)),
        }
    }

    /// A direct method call `rid` arrived at `now`: returns the handler to give it to, if
    /// direct methods are enabled (otherwise the call is ignored).
    pub(super) fn method_called(&mut self, rid: String, now: f64) -> Option<OnMethod> {
        let handler = self.on_method.clone()?;
        self.methods.insert(rid, MethodCall { received_at: now, reply: None });
        Some(handler)
    }

    /// The agent replies to call `rid` at `now`: `None` to publish the reply, or the 1005
    /// answer if the call timed out, is unknown or was answered already.
    pub(super) fn reply(&mut self, rid: &str, response: DirectMethodResponse, done: OnReplySent, now: f64) -> Option<Completion> {
        let timeout = f64::from(self.options.d_methods_timeout);
        match self.methods.get_mut(rid) {
            Some(call) if call.reply.is_none() && now - call.received_at <= timeout => {
                call.reply = Some((response, done));
                None
            }
            Some(call) => {
                if call.reply.is_none() {
                    self.methods.remove(rid);
                }
                Some(Completion::Replied(done, ERROR_OP_TIMED_OUT, response))
            }
            None => Some(Completion::Replied(done, ERROR_OP_TIMED_OUT, response)),
        }
    }

    /// The publish of the reply to call `rid` completed with `code`.
    pub(super) fn reply_sent(&mut self, rid: &str, code: i32) -> Option<Completion> {
        let (response, done) = self.methods.remove(rid)?.reply?;
        Some(Completion::Replied(done, code, response))
    }

    /// The earliest deadline of a published twin request or an unanswered direct method.
    pub(super) fn next_deadline(&self) -> Option<f64> {
        let twins = f64::from(self.options.twins_timeout);
        let methods = f64::from(self.options.d_methods_timeout);
        let twin_deadlines = self.twin_get.iter().filter_map(|g| g.sent_at).chain(self.twin_updates.values().filter_map(|u| u.sent_at)).map(|t| t + twins);
        let method_deadlines = self.methods.values().filter(|m| m.reply.is_none()).map(|m| m.received_at + methods);
        twin_deadlines.chain(method_deadlines).reduce(f64::min)
    }

    /// Times out, at `now`, twin requests without a response (answered 1005) and direct
    /// methods without a reply (forgotten: a late reply gets 1005).
    pub(super) fn expire(&mut self, now: f64) -> Vec<Completion> {
        let twins = f64::from(self.options.twins_timeout);
        let methods = f64::from(self.options.d_methods_timeout);
        let late = |sent_at: Option<f64>| sent_at.is_some_and(|at| now - at >= twins);
        let get = self.twin_get.take_if(|g| late(g.sent_at)).map(|get| Completion::Retrieved(get.done, ERROR_OP_TIMED_OUT, None, None));
        let expired: Vec<u64> = self.twin_updates.iter().filter(|(_, u)| late(u.sent_at)).map(|(rid, _)| *rid).collect();
        let updates = expired.into_iter().filter_map(|rid| self.twin_updates.remove(&rid)).map(|u| Completion::Updated(u.done, ERROR_OP_TIMED_OUT, u.props));
        let completions = get.into_iter().chain(updates).collect();
        self.methods.retain(|_, m| m.reply.is_some() || now - m.received_at < methods);
        completions
    }

    /// A new token expiring at `expires_at` (Unix seconds) is in use.
    pub(super) fn token_issued(&mut self, expires_at: u64) {
        self.token_expires_at = expires_at;
    }

    /// When (Unix seconds) to refresh the token, if auto-refresh is on: a little before
    /// expiry, 2 minutes or a tenth of a short TTL (5.1.0 refreshed exactly at expiry; the
    /// documentation says before).
    /// Never for an X.509 device: it has no token.
    pub(super) fn refresh_due(&self) -> Option<u64> {
        let margin = (self.options.token_ttl / 10).min(120);
        (self.options.token_auto_refresh && self.options.client_certificate.is_none()).then(|| self.token_expires_at.saturating_sub(margin))
    }

    /// The token refresh is due: whether to start it now. It waits (pauses) while
    /// operations are in flight, and is dropped when not connected or disconnecting.
    pub(super) fn start_refresh(&mut self) -> bool {
        self.refresh_paused = false;
        if !self.is_connected() || self.disconnecting() {
            return false;
        }
        if self.busy() {
            self.refresh_paused = true;
            return false;
        }
        self.connection = Connection::Refreshing { then_disconnect: false };
        true
    }

    /// Whether a paused token refresh can start now.
    pub(super) fn refresh_waiting(&self) -> bool {
        self.refresh_paused && !self.busy()
    }

    /// The token refresh is over, done or failed.
    pub(super) fn end_refresh(&mut self) {
        if let Connection::Refreshing { then_disconnect } = self.connection {
            self.connection = if then_disconnect { Connection::Disconnecting } else { Connection::Connected };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_CONNECTED: Verdict = Verdict::Refuse(ERROR_NOT_CONNECTED);
    const NOT_NOW: Verdict = Verdict::Refuse(ERROR_OP_NOT_ALLOWED_NOW);

    impl Completion {
        fn code(&self) -> i32 {
            match self {
                Completion::Done(_, code) | Completion::Sent(_, code, _) | Completion::Retrieved(_, code, ..) | Completion::Updated(_, code, _) | Completion::Replied(_, code, _) => *code,
            }
        }
    }

    fn codes(completions: &[Completion]) -> Vec<i32> {
        completions.iter().map(Completion::code).collect()
    }

    fn twin() -> Handler {
        Handler::Twin(Rc::new(|_| ()))
    }

    fn connected() -> Machine {
        let mut m = Machine::new(ClientOptions::default());
        assert_eq!(m.connect(), Ok(()));
        assert_eq!(m.connect_result(0, 0.0), AfterConnect::Report);
        m
    }

    fn with_twin() -> Machine {
        let mut m = connected();
        m.start_enabling(Feature::Twin, Box::new(|_| ()));
        assert_eq!(m.enable_done(Feature::Twin, Some(twin()), 0).map(|c| c.code()), Some(0));
        m
    }

    #[test]
    fn calls_get_the_documented_code_in_each_state() {
        let mut m = Machine::new(ClientOptions::default());
        assert_eq!((m.send_verdict(), m.enable_verdict(Feature::Twin, true), m.retrieve_verdict()), (NOT_CONNECTED, NOT_CONNECTED, NOT_CONNECTED));
        assert_eq!(m.connect(), Ok(()));
        assert_eq!(m.connect(), Err(ERROR_OP_NOT_ALLOWED_NOW));
        assert_eq!((m.send_verdict(), m.update_verdict()), (NOT_NOW, NOT_NOW), "documented 1004 while connecting");
        assert_eq!(m.connect_result(0, 0.0), AfterConnect::Report);
        assert!(m.is_connected());
        assert_eq!(m.connect(), Err(ERROR_ALREADY_CONNECTED));
        assert_eq!(m.send_verdict(), Verdict::Go);
        assert_eq!(m.enable_verdict(Feature::Twin, false), Verdict::Refuse(ERROR_NOT_ENABLED));
        assert_eq!((m.retrieve_verdict(), m.update_verdict()), (Verdict::Refuse(ERROR_NOT_ENABLED), Verdict::Refuse(ERROR_NOT_ENABLED)));
        assert_eq!(m.disconnect(), Closing::Close);
        assert_eq!(m.disconnect(), Closing::Nothing, "a second disconnect does nothing");
        assert_eq!((m.send_verdict(), m.enable_verdict(Feature::Methods, true)), (NOT_NOW, NOT_NOW));
        assert_eq!(m.disconnect_reason(), 0);
        m.reset();
        assert!(!m.is_connected());
        assert_eq!(m.disconnect_reason(), ERROR_GENERAL, "an unasked-for disconnection");
    }

    #[test]
    fn disconnect_while_connecting_closes_once_connected() {
        let mut m = Machine::new(ClientOptions::default());
        m.connect().unwrap();
        assert_eq!(m.disconnect(), Closing::Later);
        assert_eq!(m.connect_result(0, 0.0), AfterConnect::Close);
        assert_eq!(m.disconnect_reason(), 0);
        let mut m = Machine::new(ClientOptions::default());
        m.connect().unwrap();
        m.disconnect();
        assert_eq!(m.connect_result(5, 0.0), AfterConnect::Closed);
        assert_eq!(m.connect(), Ok(()), "a failed connect leaves the client disconnected");
    }

    #[test]
    fn a_feature_changes_only_when_its_subscription_succeeds() {
        let mut m = connected();
        assert_eq!(m.enable_verdict(Feature::Twin, true), Verdict::Go);
        m.start_enabling(Feature::Twin, Box::new(|_| ()));
        assert_eq!(m.enable_verdict(Feature::Twin, true), NOT_NOW, "already being enabled");
        assert_eq!(m.enable_done(Feature::Twin, Some(twin()), 128).map(|c| c.code()), Some(128));
        assert_eq!(m.enabled_features().count(), 0);
        m.start_enabling(Feature::Twin, Box::new(|_| ()));
        m.enable_done(Feature::Twin, Some(twin()), 0);
        assert_eq!(m.enabled_features().collect::<Vec<_>>(), [Feature::Twin]);
        assert_eq!(m.enable_verdict(Feature::Twin, true), Verdict::Refuse(ERROR_ALREADY_ENABLED));
        m.start_enabling(Feature::Twin, Box::new(|_| ()));
        m.enable_done(Feature::Twin, None, 0);
        assert!(m.twin_handler().is_none());
    }

    #[test]
    fn twin_responses_answer_the_request_with_their_id() {
        let mut m = with_twin();
        let update = m.start_update(Map::new(), Box::new(|_, _| ()));
        assert!(m.update_published(update, 0, 1.0).is_none());
        let get = m.start_retrieve(Box::new(|_, _, _| ()));
        assert_eq!(m.retrieve_verdict(), NOT_NOW, "one retrieve at a time");
        assert!(matches!(m.twin_response(204, "99", b""), TwinAnswer::UnknownRequest));
        assert!(matches!(m.twin_response(400, &update.to_string(), b""), TwinAnswer::Answered(Completion::Updated(_, 400, _))));
        let doc = br#"{"reported": {"a": 1}, "desired": {"$version": 2}}"#;
        match m.twin_response(200, &get, doc) {
            TwinAnswer::Answered(Completion::Retrieved(_, 0, Some(reported), Some(desired))) => assert_eq!((reported["a"].as_i64(), desired["$version"].as_i64()), (Some(1), Some(2))),
            _ => panic!("not the twin"),
        }
        let get = m.start_retrieve(Box::new(|_, _, _| ()));
        assert!(matches!(m.twin_response(200, &get, b"{}"), TwinAnswer::BadDocument(Completion::Retrieved(_, ERROR_GENERAL, None, None))));
        assert!(!m.busy());
    }

    #[test]
    fn twin_requests_time_out_from_their_publish() {
        let mut m = with_twin();
        let first = m.start_update(Map::new(), Box::new(|_, _| ()));
        let second = m.start_update(Map::new(), Box::new(|_, _| ()));
        m.start_update(Map::new(), Box::new(|_, _| ()));
        assert_eq!(m.update_verdict(), NOT_NOW, "max_pending_twin_requests");
        assert_eq!(m.next_deadline(), None, "unpublished requests have no deadline yet");
        m.update_published(first, 0, 1.0);
        m.update_published(second, 0, 2.0);
        assert_eq!(m.next_deadline(), Some(11.0));
        assert!(m.expire(10.9).is_empty());
        assert_eq!(codes(&m.expire(11.0)), [ERROR_OP_TIMED_OUT]);
        assert_eq!(m.next_deadline(), Some(12.0));
    }

    #[test]
    fn late_or_repeated_method_replies_get_1005() {
        let mut m = connected();
        assert!(m.method_called("1".into(), 0.0).is_none(), "ignored while methods are disabled");
        m.start_enabling(Feature::Methods, Box::new(|_| ()));
        m.enable_done(Feature::Methods, Some(Handler::Methods(Rc::new(|_, _, _| ()))), 0);
        assert!(m.method_called("1".into(), 0.0).is_some());
        assert!(m.method_called("2".into(), 0.0).is_some());
        assert_eq!(m.next_deadline(), Some(30.0));
        let reply = || DirectMethodResponse::new(200, None);
        assert!(m.reply("1", reply(), Box::new(|_, _| ()), 30.0).is_none());
        assert_eq!(m.reply("1", reply(), Box::new(|_, _| ()), 30.0).map(|c| c.code()), Some(ERROR_OP_TIMED_OUT), "answered already");
        assert_eq!(m.reply_sent("1", 0).map(|c| c.code()), Some(0));
        assert_eq!(m.reply("2", reply(), Box::new(|_, _| ()), 30.5).map(|c| c.code()), Some(ERROR_OP_TIMED_OUT));
        assert!(!m.busy());
    }

    #[test]
    fn an_x509_device_has_no_token_to_refresh() {
        let certificate = crate::mqtt::ClientCertificate { cert_pem: "cert".into(), key_pem: "key".into() };
        let mut m = Machine::new(ClientOptions { client_certificate: Some(certificate), ..ClientOptions::default() });
        m.token_issued(1000);
        assert_eq!(m.refresh_due(), None);
    }

    #[test]
    fn token_refresh_waits_for_operations_and_queues_calls() {
        let mut m = connected();
        m.token_issued(1000);
        assert_eq!(m.refresh_due(), Some(880));
        let id = m.start_send(Message::new("x"), Box::new(|_, _| ()));
        assert!(!m.start_refresh(), "a send is in flight");
        assert!(!m.refresh_waiting());
        assert_eq!(m.sent(id, 0).map(|c| c.code()), Some(0));
        assert!(m.refresh_waiting());
        assert!(m.start_refresh());
        assert!(m.is_connected(), "invisible to the agent");
        assert_eq!((m.send_verdict(), m.enable_verdict(Feature::Twin, true)), (Verdict::Queue, Verdict::Queue));
        assert_eq!(m.enable_verdict(Feature::Twin, false), Verdict::Refuse(ERROR_NOT_ENABLED), "refusals are not queued");
        m.defer(Call::Send(Message::new("y"), Box::new(|_, _| ())));
        assert_eq!(m.disconnect(), Closing::Later);
        assert_eq!(m.send_verdict(), NOT_NOW, "disconnecting");
        assert_eq!(m.connect_result(0, 0.0), AfterConnect::Resubscribe);
        m.end_refresh();
        let calls = m.take_deferred();
        assert!(matches!(calls.iter().collect::<Vec<_>>()[..], [Call::Send(..), Call::Close]));
        assert_eq!(m.disconnect_reason(), 0);
    }

    #[test]
    fn a_failed_refresh_is_a_lost_connection() {
        let mut m = connected();
        assert!(m.start_refresh());
        assert_eq!(m.connect_result(4, 0.0), AfterConnect::Lost);
        assert_eq!(m.disconnect_reason(), ERROR_GENERAL);
    }

    fn reconnecting() -> Machine {
        let options = ClientOptions { reconnect: Some(super::super::Reconnect::default()), ..ClientOptions::default() };
        let mut m = Machine::new(options);
        m.connect().unwrap();
        assert_eq!(m.connect_result(0, 0.0), AfterConnect::Report);
        m.start_enabling(Feature::Twin, Box::new(|_| ()));
        m.enable_done(Feature::Twin, Some(twin()), 0);
        m
    }

    #[test]
    fn a_lost_connection_is_reconnected_with_its_features() {
        let mut m = with_twin();
        assert!(!m.reconnects_after_loss(1.0), "off by default, as in 5.1.0");

        let mut m = reconnecting();
        m.start_retrieve(Box::new(|_, _, _| ()));
        assert!(m.reconnects_after_loss(1.0));
        assert_eq!(codes(&m.lose()), [ERROR_NOT_CONNECTED], "operations in flight still fail");
        assert!(!m.is_connected());
        assert_eq!(m.send_verdict(), NOT_CONNECTED);
        assert_eq!(m.connect(), Err(ERROR_OP_NOT_ALLOWED_NOW), "it is connecting by itself");
        assert!(m.start_attempt());
        assert_eq!(m.connect_result(-1, 2.0), AfterConnect::Retry, "refused TCP is transient");
        assert!(m.retry_delay(0.0) > 0.0);
        assert!(m.start_attempt());
        assert_eq!(m.connect_result(0, 3.0), AfterConnect::Resubscribe);
        assert_eq!(m.enabled_features().collect::<Vec<_>>(), [Feature::Twin], "the twin is re-enabled");
        assert_eq!(m.send_verdict(), Verdict::Queue, "calls wait for the features");
        m.end_refresh();
        assert!(m.take_announce() && !m.take_announce(), "the agent is told once");
        assert!(m.is_connected());
    }

    #[test]
    fn reconnecting_stops_at_an_error_that_will_not_heal_or_at_disconnect() {
        let mut m = reconnecting();
        m.reconnects_after_loss(1.0);
        m.lose();
        assert!(m.start_attempt());
        assert_eq!(m.connect_result(4, 2.0), AfterConnect::Report, "bad credentials: reported, not retried");
        assert_eq!(m.enabled_features().count(), 0, "a client that gave up keeps no features");
        assert_eq!(m.connect(), Ok(()), "disconnected");
        assert_eq!(m.connect_result(0, 3.0), AfterConnect::Report);
        assert_eq!(m.enable_verdict(Feature::Twin, true), Verdict::Go, "the twin can be enabled again");

        let mut m = reconnecting();
        m.reconnects_after_loss(1.0);
        assert_eq!(m.disconnect(), Closing::Stopped);
        assert!(!m.start_attempt(), "the pending attempt is dropped");
        assert_eq!(m.enabled_features().count(), 0, "a disconnect ends the features");
        let mut m = reconnecting();
        m.reconnects_after_loss(1.0);
        assert!(m.start_attempt());
        assert_eq!(m.disconnect(), Closing::Later);
        assert_eq!(m.connect_result(0, 2.0), AfterConnect::Close);
        let mut m = reconnecting();
        m.reconnects_after_loss(1.0);
        assert!(m.start_attempt());
        m.disconnect();
        assert_eq!(m.connect_result(-1, 2.0), AfterConnect::Closed);
        assert_eq!(m.enabled_features().count(), 0, "a disconnect during an attempt ends the features");

        let options = ClientOptions { reconnect: Some(super::super::Reconnect::default()), ..ClientOptions::default() };
        let mut m = Machine::new(options);
        m.connect().unwrap();
        assert_eq!(m.connect_result(-1, 0.0), AfterConnect::Retry, "a first connect is retried too");
        assert!(m.start_attempt());
        assert_eq!(m.connect_result(5, 1.0), AfterConnect::Report, "a key that never worked");
    }

    #[test]
    fn reset_answers_everything_pending_with_1000_in_order() {
        let mut m = with_twin();
        m.start_enabling(Feature::Messages, Box::new(|_| ()));
        m.start_send(Message::new("1"), Box::new(|_, _| ()));
        m.start_send(Message::new("2"), Box::new(|_, _| ()));
        m.start_retrieve(Box::new(|_, _, _| ()));
        m.start_update(Map::new(), Box::new(|_, _| ()));
        let completions = m.reset();
        let kinds: Vec<&str> = completions
            .iter()
            .map(|c| match c {
                Completion::Done(..) => "done",
                Completion::Sent(_, _, msg) => if msg.body() == b"1" { "sent 1" } else { "sent 2" },
                Completion::Retrieved(..) => "retrieved",
                Completion::Updated(..) => "updated",
                Completion::Replied(..) => "replied",
            })
            .collect();
        assert_eq!(kinds, ["done", "sent 1", "sent 2", "retrieved", "updated"]);
        assert!(codes(&completions).iter().all(|&c| c == ERROR_NOT_CONNECTED));
        assert_eq!(m.enabled_features().count(), 0, "features are off after a disconnection");
        assert!(!m.busy());
    }
}
