//! The emulator's control API under `/emulator/`: what Azure offers only over
//! AMQP/Event Hubs (C2D send, telemetry and twin-change reads) plus fault injection.
//! Documented in docs/hub-emulator.md. Every route needs `Authorization: Bearer <control
//! token>` (see `control_token.rs`): loopback alone does not keep out other local
//! processes, nor agents allowed to reach the port, and the clock and enrollments would
//! let them past the hub's own credentials.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiError, authorization, parse_json};
use crate::control::{Control, Enrollment, Fault};
use crate::control_token::ControlToken;
use crate::events::EventFilter;
use crate::messages::C2dRequest;
use crate::state::{ControlError, Shared};

type Q = Query<HashMap<String, String>>;
type S = State<Arc<Shared>>;

/// Longest long-poll accepted by `GET /emulator/events?wait=`.
const MAX_WAIT_SECS: u64 = 60;

pub(super) fn routes(token: Arc<ControlToken>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/emulator/events", get(events))
        .route("/emulator/devices/{id}/c2d", post(send_c2d))
        .route("/emulator/devices/{id}/connection", get(connection))
        .route("/emulator/devices/{id}/disconnect", post(disconnect))
        .route("/emulator/devices/{id}/expire-token", post(expire_token))
        .route("/emulator/faults", post(fault))
        .route("/emulator/clock", post(clock))
        .route("/emulator/enrollments", post(enrollment))
        .route("/emulator/cas", post(add_ca))
        .route("/emulator/metrics", get(metrics))
        // On every route above, before its handler reads anything.
        .route_layer(middleware::from_fn_with_state(token, require_token))
}

/// The emulator's metrics, OpenMetrics text.
async fn metrics(State(shared): S) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], control(shared).metrics_text()).into_response()
}

/// Refuses a request without the right bearer token: 401 in IoT Hub's error shape, with
/// `WWW-Authenticate: Bearer` and a message saying where the token is.
async fn require_token(
    State(token): State<Arc<ControlToken>>,
    req: Request,
    next: Next,
) -> Response {
    match token.check(authorization(req.headers())) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                401002,
                "IotHubUnauthorizedAccess",
                token.hint(refusal),
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tether-hub-emulator\""),
            );
            resp
        }
    }
}

fn control(shared: Arc<Shared>) -> Control {
    Control { shared }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let msg = e.to_string();
        match e {
            ControlError::DeviceNotFound(id) => ApiError::device_not_found(&id),
            ControlError::DeviceExists(_) => {
                ApiError::new(StatusCode::CONFLICT, 409001, "DeviceAlreadyExists", msg)
            }
            ControlError::Invalid(_) => ApiError::invalid(msg),
            ControlError::QueueFull(_) => ApiError::new(
                StatusCode::FORBIDDEN,
                403004,
                "DeviceMaximumQueueDepthExceeded",
                msg,
            ),
            ControlError::MessageTooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                413001,
                "MessageTooLarge",
                msg,
            ),
        }
    }
}

fn number<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::invalid(format!("{key} must be a non-negative integer")))
        })
        .transpose()
}

async fn events(State(shared): S, Query(q): Q) -> Result<Response, ApiError> {
    let since = number(&q, "since")?.unwrap_or(0);
    let wait = number::<u64>(&q, "wait")?.unwrap_or(0).min(MAX_WAIT_SECS);
    let filter = EventFilter {
        device_id: q.get("deviceId").cloned(),
        kind: q.get("type").cloned(),
    };
    let events = shared
        .events
        .wait_since(since, &filter, Duration::from_secs(wait))
        .await;
    // `next` is the cursor for the following read.
    let next = events.last().map_or(since, |e| e.seq);
    Ok(axum::Json(json!({ "events": events, "next": next })).into_response())
}

/// C2D send. The body is the message; properties come as IoT Hub's HTTPS headers
/// (`iothub-messageid`, `iothub-correlationid`, `iothub-contenttype`,
/// `iothub-contentencoding`, `iothub-ack`, `iothub-app-{name}`), TTL as `?ttlSecs=`.
async fn send_c2d(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let properties = headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.as_str().strip_prefix("iothub-app-")?.to_string(),
                Some(v.to_str().ok()?.to_string()),
            ))
        })
        .collect();
    let req = C2dRequest {
        body: body.to_vec(),
        message_id: header("iothub-messageid"),
        correlation_id: header("iothub-correlationid"),
        content_type: header("iothub-contenttype"),
        content_encoding: header("iothub-contentencoding"),
        ack: header("iothub-ack"),
        ttl: number(&q, "ttlSecs")?.map(Duration::from_secs),
        properties,
    };
    if req
        .ack
        .as_deref()
        .is_some_and(|a| !["none", "positive", "negative", "full"].contains(&a))
    {
        return Err(ApiError::invalid(
            "iothub-ack must be none, positive, negative or full",
        ));
    }
    let message_id = control(shared).send_c2d(&id, req)?;
    Ok(axum::Json(json!({ "messageId": message_id })).into_response())
}

async fn connection(State(shared): S, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !shared.lock().p.devices.contains_key(&id) {
        return Err(ApiError::device_not_found(&id));
    }
    let connected = control(shared).is_connected(&id);
    Ok(axum::Json(json!({ "deviceId": id, "connected": connected })).into_response())
}

async fn disconnect(State(shared): S, Path(id): Path<String>) -> Response {
    let was = control(shared).disconnect(&id);
    axum::Json(json!({ "deviceId": id, "disconnected": was })).into_response()
}

async fn expire_token(State(shared): S, Path(id): Path<String>) -> Result<Response, ApiError> {
    control(shared).expire_token(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FaultBody {
    #[serde(rename = "type")]
    kind: String,
    device_id: Option<String>,
    #[serde(default)]
    duration_secs: u64,
}

async fn fault(State(shared): S, body: Bytes) -> Result<Response, ApiError> {
    let body: FaultBody = parse_json(&body)?;
    let fault = Fault::from_operation_type(&body.kind)
        .ok_or_else(|| ApiError::invalid(format!("unknown fault type {}", body.kind)))?;
    control(shared).inject_fault(
        body.device_id.as_deref(),
        fault,
        Duration::from_secs(body.duration_secs),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClockBody {
    offset_secs: i64,
}

async fn clock(State(shared): S, body: Bytes) -> Result<Response, ApiError> {
    let body: ClockBody = parse_json(&body)?;
    control(shared).set_clock_offset(body.offset_secs);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct CaBody {
    /// The CA certificate in PEM.
    certificate: String,
}

async fn add_ca(State(shared): S, body: Bytes) -> Result<Response, ApiError> {
    let body: CaBody = parse_json(&body)?;
    let info = control(shared).add_ca(&body.certificate)?;
    Ok(axum::Json(info).into_response())
}

async fn enrollment(State(shared): S, body: Bytes) -> Result<Response, ApiError> {
    let enrollment: Enrollment = parse_json(&body)?;
    let info = control(shared).add_enrollment(enrollment)?;
    Ok(axum::Json(info).into_response())
}
