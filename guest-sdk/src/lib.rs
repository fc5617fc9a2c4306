//! The SDK for Tether agents: the Electric Imp agent API in idiomatic Rust.
//!
//! An agent is a `cdylib` built for `wasm32-wasip2`. Its start function registers
//! handlers and timers; afterwards the host delivers events one at a time, and the SDK
//! calls the closures registered for them.
//!
//! ```no_run
//! use tether_guest::{imp, server};
//!
//! fn start() {
//!     server::log("hello");
//!     imp::wakeup(1.0, || server::log("a second later"));
//! }
//! tether_guest::agent!(start);
//! ```
//!
//! | imp | Rust |
//! |---|---|
//! | `server.log(s)` / `server.error(s)` | [`server::log`] / [`server::error`] |
//! | `server.save(t)` / `server.load()` | [`server::save`] / [`server::load`] |
//! | `imp.wakeup(t, cb)` / `imp.cancelwakeup(t)` | [`imp::wakeup`] / [`imp::cancel_wakeup`] |
//! | `time()` | [`imp::time`] |
//! | `http.get/post/put/httpdelete/request` | [`http::get`], [`http::post`], [`http::put`], [`http::delete`], [`http::request`] |
//! | `req.sendasync(cb)` | [`http::Request::send_async`] |
//! | `http.onrequest(cb)` | [`http::on_request`] |
//! | `response.header(n, v)` / `response.send(code, body)` | [`http::HttpResponse::header`] / [`http::HttpResponse::send`] |
//! | `http.agenturl()` | [`http::agent_url`] |
//! | `mqtt.createclient()` | [`mqtt::create_client`] |
//! | `client.connect/onconnect/onconnectionlost/onmessage` | [`mqtt::Client::connect`], [`mqtt::Client::on_connect`], [`mqtt::Client::on_connection_lost`], [`mqtt::Client::on_message`] |
//! | `client.createmessage(..).sendasync(cb)` | [`mqtt::Client::create_message`], [`mqtt::Message::send_async`] |
//! | `client.subscribe/unsubscribe/disconnect/isconnected` | [`mqtt::Client::subscribe`], [`mqtt::Client::unsubscribe`], [`mqtt::Client::disconnect`], [`mqtt::Client::is_connected`] |
//! | `device.send(name, data)` | [`device::send`] ([`device::send_queued`] to hold it while offline) |
//! | `device.on(name, cb)` | [`device::on`] ([`device::on_request`] to reply) |
//! | `device.onconnect(cb)` / `device.ondisconnect(cb)` / `device.isconnected()` | [`device::on_connect`] / [`device::on_disconnect`] / [`device::is_connected`] |
//! | MessageManager `mm.send(name, data, {onAck, onReply, onFail, onTimeout}, timeout)` | [`device::request`]`(name, data).on_ack(..).on_reply(..).on_fail(..).on_timeout(..).timeout(s).send()` |
//! | (beyond imp) async/await over the same events | [`task::spawn`], [`imp::sleep`], [`http::Request::send`], [`http::serve`], awaiting a [`device::Request`], [`device::messages`], [`azure_iot_hub::DeviceClient`] |
//! | (beyond imp) a durable FIFO, e.g. an outbox | [`queue::Queue::open`], [`queue::Queue::append`], [`queue::Queue::entries`], [`queue::Queue::remove`], [`queue::stats`] |

// The generated import of `connect-options` takes one argument per field.
#[allow(clippy::too_many_arguments)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "agent",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "tether_guest::__private::bindings",
    });
}

pub mod device;
mod dispatch;
pub mod azure_iot_hub;
pub mod http;
pub mod imp;
pub mod mqtt;
pub mod queue;
pub mod server;
pub mod task;

pub use server::config;

#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::Guest;
    pub use crate::bindings::tether::agent::events::Event;
    pub use crate::dispatch::{on_event, start};
    pub mod bindings {
        pub use crate::bindings::*;
    }
}

/// Declares the agent's start function: `tether_guest::agent!(start);` once per agent.
#[macro_export]
macro_rules! agent {
    ($start:path) => {
        struct __TetherAgent;
        impl $crate::__private::Guest for __TetherAgent {
            fn start() {
                $crate::__private::start($start)
            }
            fn on_event(event: $crate::__private::Event) {
                $crate::__private::on_event(event)
            }
        }
        $crate::__export_agent_impl!(__TetherAgent with_types_in $crate::__private::bindings);
    };
}
