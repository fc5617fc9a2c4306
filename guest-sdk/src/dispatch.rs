//! Routes each event to the capability module that holds its callbacks.

use crate::bindings::tether::agent::events::{self, Event};
use crate::{device, http, imp, mqtt, server, task};

/// Runs the agent's start function; a panic's message goes to the agent's error log
/// before the instance traps, so the host's crash line has a cause to point to.
pub fn start(f: fn()) {
    std::panic::set_hook(Box::new(|info| server::error(format!("panic: {info}"))));
    f();
    task::run_ready();
}

/// Delivers an event, then every further one already waiting: a burst costs one call
/// into the agent rather than one each.
pub fn on_event(event: Event) {
    let mut next = Some(event);
    while let Some(event) = next {
        deliver(event);
        task::run_ready();
        next = events::next();
    }
}

fn deliver(event: Event) {
    match event {
        Event::Timer(id) => imp::fire(id),
        Event::HttpResponse((id, result)) => http::response_arrived(id, result),
        Event::HttpRequest(request) => http::request_arrived(request),
        Event::MqttConnected((c, code)) => mqtt::connected(c, code),
        Event::MqttMessage((c, m)) => mqtt::message(c, m),
        Event::MqttPublished((c, op, code)) => mqtt::published(c, op, code),
        Event::MqttSubscribed((c, op, code, granted)) => mqtt::subscribed(c, op, code, granted),
        Event::MqttUnsubscribed((c, op, code)) => mqtt::unsubscribed(c, op, code),
        Event::MqttConnectionLost((c, code)) => mqtt::connection_lost(c, code),
        Event::MqttDisconnected(c) => mqtt::disconnected(c),
        Event::DeviceMessage((name, payload, id)) => device::message(name, payload, id),
        Event::DeviceConnected(info) => device::connected(info),
        Event::DeviceDisconnected(reason) => device::disconnected(reason),
        Event::DeviceAck(id) => device::acked(id),
        Event::DeviceReply((id, payload)) => device::replied(id, payload),
        Event::DeviceFailed((id, failure)) => device::failed(id, failure),
    }
}
