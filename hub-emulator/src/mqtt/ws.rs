//! MQTT over WebSocket (`wss://localhost:{https}/$iothub/websocket`, subprotocol `mqtt`):
//! binary frames are bridged to an in-memory byte pipe served by the ordinary MQTT
//! connection code, so both transports behave identically.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::state::Shared;

/// Pipe buffer per direction; MQTT packets larger than this simply take several writes.
const PIPE_BYTES: usize = 64 * 1024;

pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    // The HTTPS port asks for no client certificate: X.509 devices use port 8883.
    let conn = tokio::spawn(super::conn::run(ours, shared, Vec::new()));
    let (mut from_conn, mut to_conn) = tokio::io::split(theirs);
    let (mut sink, mut stream) = socket.split();
    let inbound = async {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    if to_conn.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) => {}
                // Close, or text frames (MQTT over WebSocket is binary only).
                Message::Text(_) | Message::Close(_) => break,
            }
        }
    };
    let outbound = async {
        let mut buf = BytesMut::with_capacity(PIPE_BYTES);
        while matches!(from_conn.read_buf(&mut buf).await, Ok(n) if n > 0) {
            if sink
                .send(Message::Binary(buf.split().freeze()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    };
    // Either side ending ends both: dropping the pipe ends the MQTT connection (as an
    // ungraceful close unless the client sent DISCONNECT), and vice versa.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    drop((from_conn, to_conn));
    let _ = conn.await;
}
