//! DPS device REST API: register (202 + operation), operation status, registration
//! status (protocol notes §3.1).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use super::api::{ApiError, authorization, require_api_version};
use crate::dps::{DpsError, RETRY_AFTER_SECS};
use crate::state::Shared;
use crate::state::provisioning::EnrollmentMatch;
use crate::util::new_uuid;

type Q = Query<HashMap<String, String>>;
type S = State<Arc<Shared>>;

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/{scope}/registrations/{reg}/register", put(register))
        .route(
            "/{scope}/registrations/{reg}/operations/{op}",
            get(operation),
        )
        .route("/{scope}/registrations/{reg}", post(registration))
}

impl From<DpsError> for ApiError {
    fn from(e: DpsError) -> Self {
        let (status, code) = e.status_and_code();
        let name = match e {
            DpsError::Unauthorized => "Unauthorized",
            DpsError::BadRequest(_) => "BadRequest",
            DpsError::OperationNotFound | DpsError::RegistrationNotFound => "NotFound",
        };
        ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            name,
            e.to_string(),
        )
        .dps()
    }
}

/// Checks scope, api-version and the registration SAS token.
fn authorize(
    shared: &Shared,
    scope: &str,
    reg: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<EnrollmentMatch, ApiError> {
    if !scope.eq_ignore_ascii_case(&shared.scope_id) {
        return Err(ApiError::from(DpsError::RegistrationNotFound));
    }
    require_api_version(q).map_err(ApiError::dps)?;
    if !crate::dps::valid_registration_id(reg) {
        return Err(DpsError::BadRequest(format!("invalid registration id {reg}")).into());
    }
    shared
        .dps_authenticate(reg, authorization(headers))
        .map_err(|e| {
            tracing::debug!("dps request for {reg} refused: {e}");
            ApiError::from(DpsError::Unauthorized)
        })
}

fn with_headers(mut resp: Response, extra: &[(header::HeaderName, String)]) -> Response {
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(name.clone(), v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&new_uuid()) {
        resp.headers_mut().insert("x-ms-request-id", v);
    }
    resp
}

async fn register(
    State(shared): S,
    Path((scope, reg)): Path<(String, String)>,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let enrollment = authorize(&shared, &scope, &reg, &q, &headers)?;
    let status = shared.dps_register(&reg, enrollment, &body)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(&shared.hostname);
    let location = format!("https://{host}/{scope}/registrations/{reg}/register");
    Ok(with_headers(
        (StatusCode::ACCEPTED, axum::Json(status)).into_response(),
        &[
            (header::LOCATION, location),
            (header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()),
        ],
    ))
}

async fn operation(
    State(shared): S,
    Path((scope, reg, op)): Path<(String, String, String)>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &scope, &reg, &q, &headers)?;
    let throttled = shared.test_faults.lock().is_ok_and(|mut f| {
        let throttled = f.dps_throttled_polls > 0;
        f.dps_throttled_polls = f.dps_throttled_polls.saturating_sub(1);
        throttled
    });
    if throttled {
        let body = serde_json::json!({"errorCode": 429001, "trackingId": "", "message": "Operations are being throttled for this tenant.", "timestampUtc": ""});
        return Ok(with_headers(
            (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response(),
            &[(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
        ));
    }
    let status = shared.dps_poll(&reg, &op)?;
    Ok(with_headers(axum::Json(status).into_response(), &[]))
}

async fn registration(
    State(shared): S,
    Path((scope, reg)): Path<(String, String)>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &scope, &reg, &q, &headers)?;
    let state = shared.dps_registration(&reg)?;
    Ok(with_headers(axum::Json(state).into_response(), &[]))
}
