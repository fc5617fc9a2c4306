//! The listener of the agents' URLs: hyper's HTTP/1 server with what a port open to
//! anyone needs. A client has `http_header_timeout_secs` to send a request's headers (a
//! slowloris peer is cut off), at most `http_max_connections` connections are open at
//! once, and at most `http_max_connections_per_address` from one address (over either, a
//! new one is closed at once, so that the host keeps file descriptors for its agents' own
//! connections and one peer cannot take them all). The body deadline is the handler's
//! (see `inbound`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::kit::budget::Budget;
use crate::kit::log::Quiet;

/// The most a connection buffers of what a client sends ahead of being read.
const READ_BUFFER: usize = 64 << 10;

/// How long open connections get to finish when the host stops.
const DRAIN: Duration = Duration::from_secs(5);

/// How many connections the listener takes, in all and from one address.
pub(crate) struct Caps {
    pub connections: usize,
    pub per_address: usize,
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` changes.
pub(crate) async fn serve(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>, caps: Caps) {
    let (max_connections, header_timeout) = (caps.connections, caps.header_timeout);
    let slots = Arc::new(Semaphore::new(max_connections));
    let addresses: Arc<Mutex<HashMap<IpAddr, Budget>>> = Arc::default();
    let graceful = GracefulShutdown::new();
    let full = Quiet::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: waiting beats spinning.
                tracing::warn!("agent URLs: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if full.due() {
                tracing::warn!("agent URLs: {max_connections} connections open (http_max_connections); closing new ones");
            }
            continue;
        };
        let from_address = {
            let mut addresses = addresses.lock().unwrap_or_else(|p| p.into_inner());
            // Forget addresses with nothing open, so that the map stays as small as the
            // connections are few.
            if addresses.len() > max_connections {
                addresses.retain(|_, b| b.used() > 0);
            }
            addresses.entry(peer.ip()).or_default().take(1, caps.per_address)
        };
        let Some(from_address) = from_address else {
            if full.due() {
                tracing::warn!("agent URLs: {} connections open from {} (http_max_connections_per_address); closing new ones", caps.per_address, peer.ip());
            }
            continue;
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // What a connection may buffer of a client's bytes: 64 KiB, not hyper's 400.
            .max_buf_size(READ_BUFFER)
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A peer that goes away or breaks the protocol ends only its own connection.
            let _ = connection.await;
            drop((slot, from_address));
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::debug!("agent URLs: connections still open after {} s; leaving them", DRAIN.as_secs());
    }
}
