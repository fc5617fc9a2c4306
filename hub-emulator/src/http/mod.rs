//! HTTPS front end: the IoT Hub service REST API, DPS device REST API and the emulator's
//! control API share one port (paths: `/devices..`, `/twins..`, `/statistics..`;
//! `/{scopeId}/registrations/..`; `/emulator/..`).

mod control;
mod dps;
mod service;

pub(crate) use service::valid_device_id;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::state::Shared;
use crate::util::{iso8601, new_uuid};

/// Largest WebSocket message: above the largest MQTT packet the emulator reads.
const WS_MAX_MESSAGE: usize = 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/$iothub/websocket", axum::routing::get(websocket))
        .merge(service::routes())
        .merge(dps::routes())
        .merge(control::routes())
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
pub(crate) async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let router = router(shared.clone());
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

/// Which error body format to use: IoT Hub's JSON-in-`Message` or DPS's flat one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Hub,
    Dps,
}

/// An error response in IoT Hub's (or DPS's) exact shape (protocol notes §2.5, §3.1).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: u32,
    name: &'static str,
    message: String,
    info: Option<Value>,
    flavor: Flavor,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: u32,
        name: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code,
            name,
            message: message.into(),
            info: None,
            flavor: Flavor::Hub,
        }
    }

    fn with_info(mut self, info: Value) -> Self {
        self.info = Some(info);
        self
    }

    fn dps(mut self) -> Self {
        self.flavor = Flavor::Dps;
        self
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            401002,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, 400004, "ArgumentInvalid", message)
    }

    pub fn format(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            400006,
            "IotHubFormatError",
            message,
        )
    }

    pub fn device_not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            404001,
            "DeviceNotFound",
            format!("Device {id} not registered"),
        )
    }

    pub fn precondition_failed() -> Self {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            412001,
            "PreconditionFailed",
            "Precondition failed: Invalid ETag",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let now = iso8601(SystemTime::now());
        let mut inner = json!({ "errorCode": self.code, "trackingId": new_uuid().replace('-', ""), "message": self.message });
        if let Some(info) = self.info {
            inner["info"] = info;
        }
        inner["timestampUtc"] = now.into();
        let (body, header, value) = match self.flavor {
            Flavor::Hub => (
                json!({ "Message": inner.to_string(), "ExceptionMessage": "" }),
                "iothub-errorcode",
                self.name.to_string(),
            ),
            Flavor::Dps => (inner, "x-ms-error-code", self.code.to_string()),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header, v);
        }
        resp
    }
}

/// IoT Hub rejects requests without `api-version` (400001 InvalidProtocolVersion).
pub(crate) fn require_api_version(q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("api-version") {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            400001,
            "InvalidProtocolVersion",
            "Invalid or missing api-version query parameter",
        )),
    }
}

pub(crate) fn authorization(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Parses a JSON request body, mapping failures to IoT Hub's 400 format error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::format(format!("Failed to parse the request body: {e}")))
}

/// `hh:mm:ss`, the .NET `TimeSpan` form IoT Hub uses in `info.timeout`.
fn timespan(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespan_format() {
        assert_eq!(timespan(Duration::from_secs(30)), "00:00:30");
        assert_eq!(timespan(Duration::from_secs(3725)), "01:02:05");
    }
}
