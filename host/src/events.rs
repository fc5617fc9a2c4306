//! What reaches an agent's queue. Backends post host-side events; the agent's task turns
//! each into a WIT event just before delivery (see `AgentCtx::prepare`).

use tokio::sync::{mpsc, oneshot};

use crate::bindings::http::{Response, TransportError};
use crate::bindings::mqtt::Message;

/// An event as a backend posts it.
pub(crate) enum HostEvent {
    Timer(u64),
    HttpResponse(u64, Result<Response, TransportError>),
    HttpRequest(crate::http::inbound::Pending),
    Mqtt(u32, MqttEvent),
    /// A `device-*` event, delivered as is (see `device`).
    Device(crate::bindings::events::Event),
}

/// What an MQTT connection reports.
pub(crate) enum MqttEvent {
    Connected(i32),
    Message(Message),
    Published(u64, i32),
    Subscribed(u64, i32, Vec<u8>),
    Unsubscribed(u64, i32),
    ConnectionLost(i32),
    Disconnected,
}

/// An event tagged with the instance it belongs to: events of an instance that has since
/// crashed refer to timers and requests that no longer exist and are dropped. `None`
/// goes to whichever instance runs (e.g. an incoming HTTP request).
pub(crate) struct Envelope {
    pub generation: Option<u64>,
    pub event: HostEvent,
}

/// Posts events to one instance of an agent.
#[derive(Clone)]
pub(crate) struct EventSender {
    tx: mpsc::UnboundedSender<Envelope>,
    generation: Option<u64>,
}

impl EventSender {
    pub fn new(tx: mpsc::UnboundedSender<Envelope>, generation: u64) -> Self {
        EventSender { tx, generation: Some(generation) }
    }

    /// Posts to whichever instance runs at delivery: for backends that outlive an
    /// instance, like the device channel.
    pub fn any_instance(tx: mpsc::UnboundedSender<Envelope>) -> Self {
        EventSender { tx, generation: None }
    }

    /// Queues an event; after the agent is gone there is no one left to tell.
    pub fn post(&self, event: HostEvent) {
        let _ = self.tx.send(Envelope { generation: self.generation, event });
    }
}

/// A task that is aborted when its owner drops this, so that an agent's timers and
/// connections end with the instance that started them.
pub(crate) struct TaskGuard(tokio::task::AbortHandle);

impl TaskGuard {
    /// Spawns `future` on `io`, the host's runtime (whichever thread the calling guest
    /// code runs on).
    pub fn spawn<F>(io: &tokio::runtime::Handle, future: F) -> TaskGuard
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        TaskGuard(io.spawn(future).abort_handle())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A one-shot reply channel used by backends that wait for the agent (incoming HTTP).
pub(crate) type Reply<T> = oneshot::Sender<T>;
