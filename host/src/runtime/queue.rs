//! An agent's event queue. Capabilities post their own event types through
//! [`Events`](crate::kit::events::Events); the queue wraps each in a [`HostEvent`], and the
//! agent's task turns it into a WIT event just before delivery (see
//! [`AgentCtx::prepare`](super::instance::AgentCtx::prepare)).

use crate::capabilities::device::DeviceEvent;
use crate::capabilities::http::inbound::Pending;
use crate::capabilities::http::outbound::Finished;
use crate::capabilities::mqtt::Report;
use crate::capabilities::timers::Fired;
use crate::kit::events::Sink;

/// An event as a capability posted it.
pub(crate) enum HostEvent {
    Timer(Fired),
    HttpResponse(Finished),
    HttpRequest(Pending),
    Mqtt(Report),
    Device(DeviceEvent),
}

macro_rules! from_capability {
    ($($variant:ident($event:ty)),* $(,)?) => {$(
        impl From<$event> for HostEvent {
            fn from(event: $event) -> HostEvent {
                HostEvent::$variant(event)
            }
        }
    )*};
}

from_capability!(Timer(Fired), HttpResponse(Finished), HttpRequest(Pending), Mqtt(Report), Device(DeviceEvent));

/// An event tagged with the instance it belongs to; `None` goes to whichever instance
/// runs (see [`Events`](crate::kit::events::Events)).
pub(crate) struct Envelope {
    pub generation: Option<u64>,
    pub event: HostEvent,
}

/// The sending end of an agent's queue, as every capability's [`Sink`].
pub(crate) struct Queue(pub flume::Sender<Envelope>);

impl<E> Sink<E> for Queue
where
    HostEvent: From<E>,
{
    fn post(&self, generation: Option<u64>, event: E) -> bool {
        self.0.send(Envelope { generation, event: event.into() }).is_ok()
    }
}
