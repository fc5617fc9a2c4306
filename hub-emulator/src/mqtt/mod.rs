//! Device-facing MQTT 3.1.1 over TLS: IoT Hub device sessions and DPS registration
//! sessions on the same port, told apart by the CONNECT username (protocol notes §5.1).
//! The same sessions are served over WebSocket from the HTTPS port.

mod conn;
mod ws;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub(crate) use conn::{MAX_PACKET, Target, classify, next_packet};
pub(crate) use ws::serve as serve_websocket;

use crate::state::Shared;
use crate::state::faults::ActiveFault;

/// Accepts MQTT connections until the hub shuts down.
pub(crate) async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let admit = {
        let shared = shared.clone();
        // A hub-wide ShutDownMqtt fault closes new connections before the handshake.
        move || shared.lock().fault("*") != Some(ActiveFault::MqttDown)
    };
    let shutdown = shared.shutdown.clone();
    crate::net::serve_tls(listener, acceptor, shutdown, admit, move |tls| {
        // The client's certificate chain, leaf first, if it sent one (X.509 devices).
        let client_chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default();
        conn::run(tls, shared.clone(), client_chain)
    })
    .await
}
