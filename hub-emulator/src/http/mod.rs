//! HTTPS front end: the IoT Hub service REST API, DPS device REST API and the emulator's
//! control API share one port (paths: `/devices..`, `/twins..`, `/statistics..`;
//! `/{scopeId}/registrations/..`; `/emulator/..`, which alone needs the control token).

mod api;
mod control;
mod dps;
mod service;

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::control_token::ControlToken;
use crate::state::Shared;
use api::ApiError;

/// Largest WebSocket message: above the largest MQTT packet the emulator reads.
const WS_MAX_MESSAGE: usize = 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>, control_token: Arc<ControlToken>) -> Router {
    Router::new()
        .route("/$iothub/websocket", axum::routing::get(websocket))
        .merge(service::routes())
        .merge(dps::routes())
        .merge(control::routes(control_token))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                404000,
                "NotFound",
                "The requested resource does not exist.",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                405000,
                "MethodNotAllowed",
                "The HTTP method is not supported for this resource.",
            )
        })
        .with_state(shared)
}

/// Upgrades to MQTT over WebSocket. The subprotocol must be `mqtt` in any case (the C
/// SDK's DPS client sends `MQTT`); the reply echoes the client's spelling.
async fn websocket(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return ApiError::invalid("WebSocket upgrade required").into_response();
    };
    let protocol = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .find(|p| p.eq_ignore_ascii_case("mqtt"))
        .map(str::to_string);
    let Some(protocol) = protocol else {
        return ApiError::invalid("WebSocket subprotocol mqtt required").into_response();
    };
    ws.protocols([protocol])
        .max_message_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| crate::mqtt::serve_websocket(socket, shared))
}

/// Serves HTTPS until the hub shuts down.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    control_token: Arc<ControlToken>,
) {
    let router = router(shared.clone(), control_token);
    let shutdown = shared.shutdown.clone();
    crate::net::serve_tls(
        listener,
        acceptor,
        shutdown.clone(),
        || true,
        move |tls| {
            let (router, mut shutdown) = (router.clone(), shutdown.clone());
            async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                    .with_upgrades();
                tokio::select! {
                    r = conn => if let Err(e) = r { tracing::debug!("https connection: {e}") },
                    _ = shutdown.changed() => {}
                }
            }
        },
    )
    .await
}
