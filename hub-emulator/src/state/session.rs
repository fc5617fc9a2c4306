//! What the state records about live device connections: the command channel into
//! each connection task, its subscriptions, and direct-method calls awaiting the
//! device's answer. Plain data below the state core, which holds it; the operations on
//! it are in `connections` and `methods`.

use std::time::Duration;

use rumqttc::mqttbytes::v4::Publish;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Outcome of a direct method invocation that did not get a usable device response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MethodError {
    DeviceNotFound,
    NotOnline(Duration),
    Timeout(Duration),
    /// The device answered with a payload of this many bytes, above the 128 KB limit of
    /// direct-method payloads.
    ResponseTooLarge(usize),
}


/// Which of the four device topics a session subscribed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Subs {
    pub c2d: bool,
    pub twin_res: bool,
    pub desired: bool,
    pub methods: bool,
}

/// Commands to a live MQTT connection task.
#[derive(Debug)]
pub(crate) enum SessionCmd {
    Publish(Publish),
    /// New C2D messages may be deliverable.
    C2dWake,
    Close(String),
}

pub(crate) struct Session {
    pub conn_id: u64,
    /// `se` of the token the connection authenticated with.
    pub token_expiry: u64,
    pub tx: mpsc::UnboundedSender<SessionCmd>,
    pub subs: Subs,
}

pub(crate) struct PendingMethod {
    pub device_id: String,
    /// The device's status and payload, or why its answer is refused.
    pub reply: oneshot::Sender<Result<(i64, Value), MethodError>>,
}
