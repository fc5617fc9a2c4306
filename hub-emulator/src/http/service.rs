//! IoT Hub service REST API: registry CRUD, twins, direct methods, C2D purge,
//! statistics (protocol notes §2).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{ApiError, authorization, parse_json, require_api_version};
use crate::events::EventKind;
use crate::feedback::FEEDBACK_LOCK;
use crate::query::{self, Query as TwinQuery, QueryError};
use crate::state::Shared;
use crate::state::device::{Device, valid_device_id};
use crate::state::methods::{MAX_PAYLOAD_BYTES, MethodError};
use crate::state::policy::Permission;
use crate::twin::ServiceTwinError;
use crate::util::{b64_decode, iso8601, new_key};

type Q = Query<HashMap<String, String>>;
type S = State<Arc<Shared>>;

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/devices", get(list_devices))
        // The imp library lists with a trailing slash, which IoT Hub accepts.
        .route("/devices/", get(list_devices))
        .route(
            "/devices/{id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        // A fixed segment, so it wins over `/devices/{id}` as in IoT Hub.
        .route("/devices/query", post(query_twins))
        .route("/devices/{id}/commands", delete(purge_c2d))
        .route("/twins/{id}", get(get_twin).put(put_twin).patch(patch_twin))
        .route("/twins/{id}/methods", post(invoke_method))
        .route("/messages/serviceBound/feedback", get(receive_feedback))
        .route(
            "/messages/serviceBound/feedback/{lock_token}",
            delete(complete_feedback),
        )
        .route(
            "/messages/serviceBound/feedback/{lock_token}/abandon",
            post(abandon_feedback),
        )
        .route("/statistics/devices", get(statistics))
        .route("/statistics/service", get(service_statistics))
}

/// Checks api-version and the SAS `Authorization` header for any of `permissions`.
fn authorize(
    shared: &Shared,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    path: &[&str],
    permissions: &[Permission],
) -> Result<(), ApiError> {
    require_api_version(q)?;
    shared
        .authenticate_service(authorization(headers), path, permissions)
        .map_err(|e| {
            tracing::debug!("service request refused: {e}");
            ApiError::unauthorized()
        })
}

/// `If-Match` value without quotes; `None` when absent.
fn if_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// Whether `If-Match` allows a change of an entity whose etag is `current`.
fn etag_matches(wanted: &Option<String>, current: &str) -> bool {
    wanted.as_deref().is_none_or(|w| w == "*" || w == current)
}

fn json_with_etag(body: Value, etag: &str) -> Response {
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

const READ: &[Permission] = &[Permission::RegistryRead];
const WRITE: &[Permission] = &[Permission::RegistryWrite];
const TWIN_READ: &[Permission] = &[Permission::RegistryRead, Permission::ServiceConnect];
const TWIN_WRITE: &[Permission] = &[Permission::RegistryWrite, Permission::ServiceConnect];
const SERVICE: &[Permission] = &[Permission::ServiceConnect];

async fn list_devices(
    State(shared): S,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices"], READ)?;
    // azure-iot-hub documents values outside 1..=1000 as meaning 1000.
    let top = q
        .get("top")
        .and_then(|t| t.parse::<usize>().ok())
        .filter(|t| (1..=1000).contains(t))
        .unwrap_or(1000);
    let st = shared.lock();
    let list: Vec<Value> =
        st.p.devices
            .values()
            .take(top)
            .map(|d| d.identity_json(st.is_connected(&d.id)))
            .collect();
    Ok(axum::Json(list).into_response())
}

async fn get_device(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices", &id], READ)?;
    let st = shared.lock();
    let d =
        st.p.devices
            .get(&id)
            .ok_or_else(|| ApiError::device_not_found(&id))?;
    Ok(json_with_etag(
        d.identity_json(st.is_connected(&id)),
        &d.etag(),
    ))
}

#[derive(Deserialize)]
struct QueryBody {
    query: String,
}

/// Page size without `x-ms-max-item-count` (**emulator choice**), and the largest one.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// `POST /devices/query`: the twin query language (docs section 5.1), paged.
async fn query_twins(
    State(shared): S,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices", "query"], READ)?;
    let body: QueryBody = parse_json(&body)?;
    // A paging header that is present but not text is refused, not ignored.
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::invalid(format!("{name} must be text")))
            })
            .transpose()
    };
    let max = match header("x-ms-max-item-count")? {
        None => DEFAULT_PAGE,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| n.min(MAX_PAGE))
            .ok_or_else(|| ApiError::invalid("x-ms-max-item-count must be a positive integer"))?,
    };
    let bad_query =
        |e: QueryError| ApiError::new(StatusCode::BAD_REQUEST, 400000, "BadRequest", e.to_string());
    let parsed = TwinQuery::parse(&body.query).map_err(bad_query)?;
    let twins: Vec<Value> = {
        let st = shared.lock();
        // BTreeMap order: stable across pages.
        st.p.devices
            .values()
            .map(|d| d.twin_json(st.is_connected(&d.id)))
            .collect()
    };
    // An empty token, as a client may send before the first page, asks for the first.
    let token = header("x-ms-continuation")?.filter(|t| !t.is_empty());
    let page = query::page(parsed.run(twins), token, max).map_err(bad_query)?;
    let mut resp = axum::Json(page.items).into_response();
    let h = resp.headers_mut();
    h.insert(
        "x-ms-item-type",
        HeaderValue::from_static(parsed.item_type().as_str()),
    );
    if let Some(token) = page
        .continuation
        .and_then(|t| HeaderValue::from_str(&t).ok())
    {
        h.insert("x-ms-continuation", token);
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceBody {
    device_id: Option<String>,
    status: Option<String>,
    status_reason: Option<String>,
    authentication: Option<AuthBody>,
    capabilities: Option<Capabilities>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<SymmetricKey>,
    x509_thumbprint: Option<Thumbprints>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Thumbprints {
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SymmetricKey {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    iot_edge: Option<bool>,
}

/// Symmetric keys must be base64 of 16 to 64 bytes.
fn check_key(key: &Option<String>) -> Result<Option<String>, ApiError> {
    match key.as_deref() {
        None | Some("") => Ok(None),
        Some(k) if b64_decode(k).is_some_and(|b| (16..=64).contains(&b.len())) => {
            Ok(Some(k.to_string()))
        }
        Some(_) => Err(ApiError::invalid(
            "The symmetric key must be a base64 string of 16 to 64 bytes",
        )),
    }
}

/// Thumbprints are the hex SHA-1 (40 digits) or SHA-256 (64 digits) of a certificate.
fn check_thumbprint(t: &Option<String>) -> Result<Option<String>, ApiError> {
    match t.as_deref() {
        None | Some("") => Ok(None),
        Some(t) if [40, 64].contains(&t.len()) && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(t.to_string()))
        }
        Some(t) => Err(ApiError::invalid(format!(
            "Invalid thumbprint {t}: expected the hex SHA-1 or SHA-256 of a certificate"
        ))),
    }
}

/// The credentials a PUT gives a device, checked against its authentication type so
/// nothing sent is silently dropped.
struct Credentials {
    kind: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
}

fn credentials(auth: Option<&AuthBody>) -> Result<Credentials, ApiError> {
    let keys = auth.and_then(|a| a.symmetric_key.as_ref());
    let prints = auth.and_then(|a| a.x509_thumbprint.as_ref());
    let c = Credentials {
        kind: auth
            .and_then(|a| a.kind.clone())
            .unwrap_or_else(|| "sas".into()),
        primary_key: check_key(&keys.and_then(|k| k.primary_key.clone()))?,
        secondary_key: check_key(&keys.and_then(|k| k.secondary_key.clone()))?,
        primary_thumbprint: check_thumbprint(&prints.and_then(|p| p.primary_thumbprint.clone()))?,
        secondary_thumbprint: check_thumbprint(
            &prints.and_then(|p| p.secondary_thumbprint.clone()),
        )?,
    };
    let has_keys = c.primary_key.is_some() || c.secondary_key.is_some();
    let has_prints = c.primary_thumbprint.is_some() || c.secondary_thumbprint.is_some();
    match c.kind.as_str() {
        "sas" | "none" if has_prints => Err(ApiError::invalid(format!(
            "Thumbprints are not allowed with authentication type {}",
            c.kind
        ))),
        "selfSigned" if has_keys => Err(ApiError::invalid(
            "Symmetric keys are not allowed with authentication type selfSigned",
        )),
        "selfSigned" if c.primary_thumbprint.is_none() => Err(ApiError::invalid(
            "A selfSigned device needs a primary thumbprint",
        )),
        "certificateAuthority" if has_keys || has_prints => Err(ApiError::invalid(
            "Keys and thumbprints are not allowed with authentication type certificateAuthority",
        )),
        "sas" | "none" | "selfSigned" | "certificateAuthority" => Ok(c),
        other => Err(ApiError::invalid(format!(
            "Invalid authentication type {other}"
        ))),
    }
}

async fn put_device(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices", &id], WRITE)?;
    let body: DeviceBody = parse_json(&body)?;
    if !valid_device_id(&id) {
        return Err(ApiError::invalid(format!("Device Id {id} is invalid")));
    }
    if body.device_id.as_deref().is_some_and(|b| b != id) {
        return Err(ApiError::invalid(
            "The deviceId in the body does not match the deviceId in the URL",
        ));
    }
    // IoT Hub parses the enum case-insensitively: "Disabled" (as the imp library's docs
    // write it) is as good as "disabled".
    let status = body.status.as_deref().map(str::to_ascii_lowercase);
    let enabled = match status.as_deref() {
        None | Some("enabled") => true,
        Some("disabled") => false,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "Invalid device status {}",
                body.status.as_deref().unwrap_or_default()
            )));
        }
    };
    let creds = credentials(body.authentication.as_ref())?;
    let wanted = if_match(&headers);

    let mut st = shared.lock();
    let etag = st.next_etag();
    let exists = st.p.devices.contains_key(&id);
    let created = match (exists, &wanted) {
        // Without If-Match, PUT only creates.
        (true, None) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                409001,
                "DeviceAlreadyExists",
                format!("A device with ID '{id}' is already registered."),
            ));
        }
        (false, Some(_)) => return Err(ApiError::device_not_found(&id)),
        (false, None) => {
            st.p.devices.insert(
                id.clone(),
                Device::new(
                    &id,
                    etag,
                    creds.primary_key.clone(),
                    creds.secondary_key.clone(),
                ),
            );
            true
        }
        (true, Some(_)) => false,
    };
    let connected = st.is_connected(&id);
    let Some(d) = st.p.devices.get_mut(&id) else {
        return Err(ApiError::device_not_found(&id));
    };
    if !created && !etag_matches(&wanted, &d.etag()) {
        return Err(ApiError::precondition_failed());
    }
    if !created {
        d.etag = etag;
    }
    if creds.kind == "sas" || creds.kind == "none" {
        // Keys not sent are kept, or generated for a device leaving X.509.
        d.primary_key = creds
            .primary_key
            .or(d.primary_key.take())
            .or_else(|| Some(new_key()));
        d.secondary_key = creds
            .secondary_key
            .or(d.secondary_key.take())
            .or_else(|| Some(new_key()));
    } else {
        // X.509 devices have no keys: a SAS token must not open them.
        d.primary_key = None;
        d.secondary_key = None;
    }
    d.primary_thumbprint = creds.primary_thumbprint;
    d.secondary_thumbprint = creds.secondary_thumbprint;
    if d.enabled != enabled {
        d.status_updated = iso8601(SystemTime::now());
    }
    d.enabled = enabled;
    d.status_reason = body.status_reason;
    d.auth_type = creds.kind;
    d.iot_edge = body.capabilities.and_then(|c| c.iot_edge).unwrap_or(false);
    let resp = json_with_etag(d.identity_json(connected), &d.etag());
    drop(st);
    shared.changed();
    if created {
        shared.events.record(&id, EventKind::DeviceCreated);
    }
    if !enabled {
        shared.disconnect(&id, "device disabled");
    }
    Ok(resp)
}

async fn delete_device(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices", &id], WRITE)?;
    let wanted = if_match(&headers);
    let mut st = shared.lock();
    let d =
        st.p.devices
            .get(&id)
            .ok_or_else(|| ApiError::device_not_found(&id))?;
    if !etag_matches(&wanted, &d.etag()) {
        return Err(ApiError::precondition_failed());
    }
    st.p.devices.remove(&id);
    drop(st);
    shared.changed();
    shared.disconnect(&id, "device deleted");
    shared.events.record(&id, EventKind::DeviceDeleted);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn purge_c2d(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["devices", &id], SERVICE)?;
    let mut st = shared.lock();
    let d =
        st.p.devices
            .get_mut(&id)
            .ok_or_else(|| ApiError::device_not_found(&id))?;
    let purged: Vec<_> = d.c2d.drain(..).collect();
    for m in &purged {
        shared.c2d_outcome(d, m, "Purged");
    }
    drop(st);
    shared.changed();
    Ok(
        axum::Json(
            json!({ "totalMessagesPurged": purged.len(), "deviceId": id, "moduleId": null }),
        )
        .into_response(),
    )
}

async fn statistics(
    State(shared): S,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["statistics"], READ)?;
    let st = shared.lock();
    let total = st.p.devices.len();
    let enabled = st.p.devices.values().filter(|d| d.enabled).count();
    Ok(axum::Json(json!({ "totalDeviceCount": total, "enabledDeviceCount": enabled, "disabledDeviceCount": total - enabled })).into_response())
}

async fn service_statistics(
    State(shared): S,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["statistics"], SERVICE)?;
    let connected = shared.lock().sessions.len();
    Ok(axum::Json(json!({ "connectedDeviceCount": connected })).into_response())
}

async fn get_twin(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["twins", &id], TWIN_READ)?;
    let st = shared.lock();
    let d =
        st.p.devices
            .get(&id)
            .ok_or_else(|| ApiError::device_not_found(&id))?;
    Ok(json_with_etag(
        d.twin_json(st.is_connected(&id)),
        &d.twin.etag(),
    ))
}

async fn put_twin(
    state: S,
    path: Path<String>,
    q: Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_twin(state, path, q, headers, body, true).await
}

async fn patch_twin(
    state: S,
    path: Path<String>,
    q: Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_twin(state, path, q, headers, body, false).await
}

/// Twin PUT (replace tags and desired) and PATCH (merge).
async fn update_twin(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
    replace: bool,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["twins", &id], TWIN_WRITE)?;
    let body: Value = parse_json(&body)?;
    let wanted = if_match(&headers);
    let now = iso8601(SystemTime::now());
    let mut st = shared.lock();
    let connected = st.is_connected(&id);
    let d =
        st.p.devices
            .get_mut(&id)
            .ok_or_else(|| ApiError::device_not_found(&id))?;
    if !etag_matches(&wanted, &d.twin.etag()) {
        return Err(ApiError::precondition_failed());
    }
    let tags_before = d.twin.tags.clone();
    let notification = d
        .twin
        .service_update(&body, replace, &now)
        .map_err(|e| match e {
            ServiceTwinError::ReportedIsReadOnly => ApiError::invalid(e.to_string()),
            ServiceTwinError::Twin(e) => ApiError::invalid(e.to_string()),
        })?;
    let tags_after =
        (d.twin.tags != tags_before).then(|| (d.twin.version, Value::Object(d.twin.tags.clone())));
    let resp = json_with_etag(d.twin_json(connected), &d.twin.etag());
    if let Some(n) = &notification {
        st.notify_desired(&id, n);
    }
    drop(st);
    shared.changed();
    if let Some((version, tags)) = tags_after {
        shared.events.record(
            &id,
            EventKind::TwinChange {
                section: "tags",
                version,
                patch: tags,
            },
        );
    }
    if let Some(n) = notification {
        let version = n.get("$version").and_then(Value::as_u64).unwrap_or(0);
        shared.events.record(
            &id,
            EventKind::TwinChange {
                section: "desired",
                version,
                patch: n,
            },
        );
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodBody {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// Method names: printable ASCII except ``$ ( ) < > @ , ; : \ " / [ ] ? = { }`` and space;
/// at most 1 KB (emulator choice: the name travels in an MQTT topic, at most 64 KB).
fn valid_method_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !"$()<>@,;:\\\"/[]?={}".contains(c))
}

/// `hh:mm:ss`, the .NET `TimeSpan` form IoT Hub uses in `info.timeout`.
fn timespan(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

async fn invoke_method(
    State(shared): S,
    Path(id): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &["twins", &id], SERVICE)?;
    let body: MethodBody = parse_json(&body)?;
    if !valid_method_name(&body.method_name) {
        return Err(ApiError::invalid(format!(
            "Invalid method name {}",
            body.method_name
        )));
    }
    let response_timeout = body.response_timeout_in_seconds.unwrap_or(30);
    if !(5..=300).contains(&response_timeout) {
        return Err(ApiError::invalid(
            "responseTimeoutInSeconds must be within [5; 300].",
        ));
    }
    let connect_timeout = body.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > 300 {
        return Err(ApiError::invalid(
            "connectTimeoutInSeconds must be within [0; 300].",
        ));
    }
    // Azure documents the 128 KB limit but not the error for it. The message follows the
    // one IoT Hub answered when the limit was 8 KB (Azure/azure-iot-sdks#1052: "'payload'
    // size should be less than 8192 bytes"); 400 ArgumentInvalid 400004 is the emulator's
    // choice, as for the other argument checks here. (400027 is
    // ConnectionForcefullyClosedOnNewConnection, not a payload error.)
    let payload_len = body.payload.to_string().len();
    if payload_len > MAX_PAYLOAD_BYTES {
        return Err(ApiError::invalid(format!(
            "'payload' size should be at most {MAX_PAYLOAD_BYTES} bytes (got {payload_len})."
        )));
    }
    let started = std::time::Instant::now();
    let result = shared
        .invoke_method(
            &id,
            &body.method_name,
            &body.payload,
            Duration::from_secs(response_timeout),
            Duration::from_secs(connect_timeout),
        )
        .await;
    let outcome = match &result {
        Ok(_) => "answered",
        Err(MethodError::DeviceNotFound) => "device_not_found",
        Err(MethodError::NotOnline(_)) => "not_online",
        Err(MethodError::ResponseTooLarge(_)) => "response_too_large",
        Err(MethodError::Timeout(_)) => "timeout",
    };
    shared.metrics.method(outcome, started.elapsed());
    match result {
        Ok((status, payload)) => {
            Ok(axum::Json(json!({ "status": status, "payload": payload })).into_response())
        }
        Err(MethodError::DeviceNotFound) => Err(ApiError::device_not_found(&id)),
        Err(MethodError::NotOnline(t)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            404103,
            "DeviceNotOnline",
            "Timed out waiting for device to connect.",
        )
        .with_info(json!({ "timeout": timespan(t) }))),
        // Emulator choice (Azure does not document what the caller then gets): the
        // caller learns at once, with 413 MessageTooLarge, instead of timing out.
        Err(MethodError::ResponseTooLarge(n)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            413001,
            "MessageTooLarge",
            format!(
                "The device's method response payload ({n} bytes) exceeds {MAX_PAYLOAD_BYTES} bytes."
            ),
        )),
        Err(MethodError::Timeout(t)) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            504101,
            "GatewayTimeout",
            "Timed out waiting for the response from device.",
        )
        .with_info(json!({ "timeout": timespan(t) }))),
    }
}

const FEEDBACK_PATH: [&str; 3] = ["messages", "serviceBound", "feedback"];

/// One batch of C2D feedback records, locked for a minute: 200 with a JSON array, or 204
/// when there is none. The headers follow IoT Hub's HTTPS message receive (device side):
/// the lock token is the `ETag`, with `iothub-messageid`, `iothub-enqueuedtime` and
/// `iothub-deliverycount` (**emulator choice**: the feedback endpoint's headers are not
/// documented, Microsoft's SDKs read it over AMQP).
async fn receive_feedback(
    State(shared): S,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &FEEDBACK_PATH, SERVICE)?;
    let Some(batch) = shared.feedback.receive(FEEDBACK_LOCK) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut resp = (StatusCode::OK, batch.body.to_string()).into_response();
    let h = resp.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_TYPE.as_str(),
            "application/vnd.microsoft.iothub.feedback.json".to_string(),
        ),
        (header::ETAG.as_str(), format!("\"{}\"", batch.lock_token)),
        ("iothub-messageid", batch.message_id),
        ("iothub-enqueuedtime", batch.enqueued_time),
        ("iothub-deliverycount", batch.delivery_count.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

/// A lock token that is unknown, expired or already used: 412 DeviceMessageLockLost,
/// IoT Hub's code for a lost C2D message lock (**emulator choice** for feedback).
fn lock_lost() -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        412002,
        "DeviceMessageLockLost",
        "The feedback message's lock token is unknown or has expired.",
    )
}

/// Completes (deletes) the feedback batch received with `lock_token`: 204.
async fn complete_feedback(
    State(shared): S,
    Path(lock_token): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &FEEDBACK_PATH, SERVICE)?;
    // The token may come back as the quoted ETag.
    if shared.feedback.complete(lock_token.trim_matches('"')) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(lock_lost())
    }
}

/// Gives up the lock on a feedback batch, so the next receive returns it again: 204.
async fn abandon_feedback(
    State(shared): S,
    Path(lock_token): Path<String>,
    Query(q): Q,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&shared, &q, &headers, &FEEDBACK_PATH, SERVICE)?;
    if shared.feedback.abandon(lock_token.trim_matches('"')) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(lock_lost())
    }
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
