//! The hub page of `tether hub` and `tether demo`, in the manner of Azure IoT Explorer:
//! the emulator's devices with their connection state, live device-to-cloud telemetry,
//! twins (view, edit desired properties), direct methods, cloud-to-device messages, the
//! emulator's event log and fault injection.
//!
//! Like IoT Explorer, it is a service client: a browser logs in with a shared access
//! policy's connection string (or a one-time link for `iothubowner`, printed at start),
//! and every registry, twin and method call is made to the emulator's own service REST
//! API with a SAS token of that policy, so the page sees exactly what a service SDK sees,
//! refusals included. C2D, events and faults have no service REST API in IoT Hub (they are
//! AMQP and the emulator's control API); those go to the in-process emulator, for a
//! logged-in policy with the `ServiceConnect` right.
//!
//! It listens on loopback unless told otherwise (`--page-listen`). `/metrics` has the
//! emulator's metrics for Prometheus, with the control token as bearer.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tether_hub_emulator::{C2dRequest, Control, EventFilter, Fault, Hub};
use tokio::sync::watch;

use super::web::session::{Sessions, set_cookie};
use super::web::{self, page};

/// The service REST API version the page speaks.
const API_VERSION: &str = "2021-04-12";
/// The policy the printed one-time link logs in as.
const OWNER: &str = "iothubowner";

struct PageState {
    control: Control,
    /// `https://localhost:<port>`: the emulator's service REST API.
    service: String,
    /// The hub's host name, the resource of the SAS tokens.
    hostname: String,
    hub_name: String,
    http: reqwest::Client,
    sessions: Sessions,
    /// What `/metrics` wants as its bearer token: the emulator's control token.
    control_token: String,
    /// The key of each policy someone logged in as, for the SAS tokens of its calls.
    keys: Mutex<HashMap<String, String>>,
    stop: watch::Receiver<bool>,
}

/// The running hub page.
pub struct HubPage {
    addr: SocketAddr,
    state: Arc<PageState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A refusal, as JSON `{"error": ...}`.
struct PageError(StatusCode, String);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "application/json")], json!({ "error": self.1 }).to_string()).into_response()
    }
}

fn bad(why: impl Into<String>) -> PageError {
    PageError(StatusCode::BAD_REQUEST, why.into())
}

/// The value of `key` in a connection string (`HostName=...;SharedAccessKeyName=...`).
fn part<'a>(connection_string: &'a str, key: &str) -> Option<&'a str> {
    connection_string.split(';').find_map(|p| p.trim().strip_prefix(key)?.strip_prefix('='))
}

impl HubPage {
    /// Serves the page for `hub` on `listen`.
    pub async fn start(hub: &Hub, listen: SocketAddr) -> anyhow::Result<HubPage> {
        let owner = hub.service_connection_string();
        let owner_key = part(&owner, "SharedAccessKey").ok_or_else(|| anyhow::anyhow!("the hub's owner connection string has no key"))?.to_owned();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(hub.ca_cert_pem().as_bytes())?])
            .timeout(Duration::from_secs(330))
            .build()?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(PageState {
            control: hub.control(),
            service: format!("https://localhost:{}", hub.https_addr().port()),
            hostname: hub.hostname().to_owned(),
            hub_name: hub.hub_name().to_owned(),
            http,
            sessions: Sessions::default(),
            control_token: hub.control_token().to_owned(),
            keys: Mutex::new(HashMap::from([(OWNER.to_owned(), owner_key)])),
            stop: stop_rx.clone(),
        });
        let router = axum::Router::new()
            .route("/", get(|| async { page(web::HUB) }))
            .route("/login", get(|| async { page(web::HUB_LOGIN) }).post(login))
            .route("/login/{code}", get(login_link))
            .route("/logout", post(logout))
            .route("/console/{file}", get(web::file))
            .route("/api/session", get(session))
            .route("/api/devices", get(devices))
            .route("/api/devices/{id}/twin", get(twin).patch(patch_desired))
            .route("/api/devices/{id}/methods", post(invoke))
            .route("/api/devices/{id}/c2d", post(c2d))
            .route("/api/devices/{id}/disconnect", post(disconnect))
            .route("/api/faults", post(fault))
            .route("/api/events", get(events))
            .route("/metrics", get(metrics))
            .layer(axum::middleware::map_response(web::security_headers))
            .with_state(state.clone());
        let mut stopped = stop_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("hub page stopped: {e}");
            }
        });
        Ok(HubPage { addr, state, stop, task })
    }

    /// Where the page listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A one-time login link as `iothubowner`, valid for 10 minutes.
    pub fn login_link(&self) -> std::io::Result<String> {
        Ok(format!("http://{}/login/{}", self.addr, self.state.sessions.link(OWNER)?))
    }

    /// Stops serving (ending open event streams) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl PageState {
    /// The policy the request's session acts for; `changes`: it must carry the CSRF token.
    fn caller(&self, headers: &HeaderMap, changes: bool) -> Result<String, PageError> {
        let session = self.sessions.of(headers).ok_or_else(|| PageError(StatusCode::UNAUTHORIZED, "not logged in".into()))?;
        if changes && !session.csrf_ok(headers) {
            return Err(PageError(StatusCode::FORBIDDEN, "missing or wrong X-CSRF-Token: reload the page".into()));
        }
        Ok(session.principal)
    }

    /// Calls the emulator's service REST API as `policy` (with `key`, or the one it
    /// logged in with): the hub's status and JSON answer.
    async fn service(&self, policy: &str, key: Option<&str>, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value), PageError> {
        let key = match key {
            Some(key) => key.to_owned(),
            None => self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(policy).cloned().ok_or_else(|| PageError(StatusCode::UNAUTHORIZED, "log in again".into()))?,
        };
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + 3600;
        let token = tether_hub_emulator::generate_sas_token(&self.hostname, &key, Some(policy), expiry).ok_or_else(|| bad("the key is not base64"))?;
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut request = self.http.request(method, format!("{}{path}{separator}api-version={API_VERSION}", self.service)).header(header::AUTHORIZATION, token);
        if let Some(body) = body {
            request = request.header(header::CONTENT_TYPE, "application/json").body(body.to_string());
        }
        let response = request.send().await.map_err(|e| PageError(StatusCode::BAD_GATEWAY, format!("the hub's service API did not answer: {e}")))?;
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let text = response.text().await.map_err(|e| PageError(StatusCode::BAD_GATEWAY, format!("the hub's answer broke off: {e}")))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// [`PageState::service`], with the hub's refusal passed on as the page's.
    async fn call(&self, policy: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Response, PageError> {
        let (status, value) = self.service(policy, None, method, path, body).await?;
        if !status.is_success() {
            let why = value.get("Message").or_else(|| value.get("message")).and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| value.to_string());
            return Err(PageError(status, format!("the hub refused: {why}")));
        }
        Ok(axum::Json(value).into_response())
    }

    /// Checks that `policy` may act as a service (C2D, faults): its key answers the one
    /// service call that needs `ServiceConnect` and changes nothing, the service
    /// statistics.
    async fn may_connect_as_service(&self, policy: &str) -> Result<(), PageError> {
        let (status, _) = self.service(policy, None, reqwest::Method::GET, "/statistics/service", None).await?;
        if !status.is_success() {
            return Err(PageError(StatusCode::FORBIDDEN, format!("policy {policy} may not act as a service (ServiceConnect): the hub answered {status}")));
        }
        Ok(())
    }
}

fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

type S = State<Arc<PageState>>;

#[derive(Deserialize)]
struct LoginForm {
    connection_string: String,
}

fn logged_in(state: &PageState, policy: &str) -> Result<Response, PageError> {
    let id = state.sessions.start(policy).map_err(|e| PageError(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot start a session: {e}")))?;
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&id));
    Ok(response)
}

/// `POST /login`: a policy's connection string, checked by a call to the service API.
async fn login(State(state): S, Form(form): Form<LoginForm>) -> Result<Response, PageError> {
    let cs = form.connection_string.trim();
    let (Some(policy), Some(key)) = (part(cs, "SharedAccessKeyName"), part(cs, "SharedAccessKey")) else {
        return Ok(Redirect::to("/login?failed").into_response());
    };
    let (status, _) = state.service(policy, Some(key), reqwest::Method::GET, "/devices?top=1", None).await?;
    if !status.is_success() {
        return Ok(Redirect::to("/login?failed").into_response());
    }
    state.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(policy.to_owned(), key.to_owned());
    logged_in(&state, policy)
}

async fn login_link(State(state): S, Path(code): Path<String>) -> Result<Response, PageError> {
    match state.sessions.redeem(&code) {
        Some(policy) => logged_in(&state, &policy),
        None => Ok(Redirect::to("/login?expired").into_response()),
    }
}

async fn logout(State(state): S, headers: HeaderMap) -> Result<Response, PageError> {
    state.caller(&headers, true)?;
    state.sessions.end(&headers);
    let mut response = axum::Json(json!({ "logged_out": true })).into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(""));
    Ok(response)
}

async fn session(State(state): S, headers: HeaderMap) -> Result<Response, PageError> {
    let policy = state.caller(&headers, false)?;
    let csrf = state.sessions.of(&headers).map(|s| s.csrf);
    Ok(axum::Json(json!({ "who": format!("policy {policy}"), "csrf": csrf, "hub": state.hub_name })).into_response())
}

async fn devices(State(state): S, headers: HeaderMap) -> Result<Response, PageError> {
    let policy = state.caller(&headers, false)?;
    state.call(&policy, reqwest::Method::GET, "/devices", None).await
}

async fn twin(State(state): S, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, PageError> {
    let policy = state.caller(&headers, false)?;
    state.call(&policy, reqwest::Method::GET, &format!("/twins/{}", encode(&id)), None).await
}

/// `PATCH /api/devices/{id}/twin` with the desired properties to merge.
async fn patch_desired(State(state): S, headers: HeaderMap, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Response, PageError> {
    let policy = state.caller(&headers, true)?;
    let desired: Value = serde_json::from_slice(&body).map_err(|e| bad(format!("the desired properties are not JSON: {e}")))?;
    if !desired.is_object() {
        return Err(bad("the desired properties must be a JSON object"));
    }
    state.call(&policy, reqwest::Method::PATCH, &format!("/twins/{}", encode(&id)), Some(json!({ "properties": { "desired": desired } }))).await
}

#[derive(Deserialize)]
struct MethodBody {
    method: String,
    #[serde(default)]
    payload: Value,
    #[serde(default = "default_timeout")]
    timeout_s: u64,
}

fn default_timeout() -> u64 {
    10
}

async fn invoke(State(state): S, headers: HeaderMap, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Response, PageError> {
    let policy = state.caller(&headers, true)?;
    let body: MethodBody = serde_json::from_slice(&body).map_err(|e| bad(format!("send {{method, payload, timeout_s}}: {e}")))?;
    let request = json!({ "methodName": body.method, "payload": body.payload, "responseTimeoutInSeconds": body.timeout_s });
    state.call(&policy, reqwest::Method::POST, &format!("/twins/{}/methods", encode(&id)), Some(request)).await
}

#[derive(Deserialize)]
struct C2dBody {
    body: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

async fn c2d(State(state): S, headers: HeaderMap, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Response, PageError> {
    let policy = state.caller(&headers, true)?;
    let body: C2dBody = serde_json::from_slice(&body).map_err(|e| bad(format!("send {{body, properties}}: {e}")))?;
    state.may_connect_as_service(&policy).await?;
    let request = C2dRequest {
        body: body.body.into_bytes(),
        message_id: None,
        correlation_id: None,
        content_type: None,
        content_encoding: None,
        ack: None,
        ttl: None,
        properties: body.properties.into_iter().map(|(k, v)| (k, Some(v))).collect(),
    };
    let message_id = state.control.send_c2d(&id, request).map_err(|e| bad(e.to_string()))?;
    Ok(axum::Json(json!({ "message_id": message_id })).into_response())
}

async fn disconnect(State(state): S, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, PageError> {
    let policy = state.caller(&headers, true)?;
    state.may_connect_as_service(&policy).await?;
    Ok(axum::Json(json!({ "disconnected": state.control.disconnect(&id) })).into_response())
}

#[derive(Deserialize)]
struct FaultBody {
    /// An `AzIoTHub_FaultOperationType`: `KillTcp`, `ShutDownMqtt`, `InvokeAuthError`,
    /// `InvokeThrottling`.
    kind: String,
    device: Option<String>,
    #[serde(default)]
    duration_s: u64,
}

async fn fault(State(state): S, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, PageError> {
    let policy = state.caller(&headers, true)?;
    let body: FaultBody = serde_json::from_slice(&body).map_err(|e| bad(format!("send {{kind, device, duration_s}}: {e}")))?;
    let fault = Fault::from_operation_type(&body.kind).ok_or_else(|| bad(format!("unknown fault {:?}: KillTcp, ShutDownMqtt, InvokeAuthError or InvokeThrottling", body.kind)))?;
    if body.duration_s > 3600 {
        return Err(bad("a fault lasts at most an hour (3600 s)"));
    }
    state.may_connect_as_service(&policy).await?;
    state.control.inject_fault(body.device.as_deref(), fault, Duration::from_secs(body.duration_s));
    Ok(axum::Json(json!({ "injected": body.kind })).into_response())
}

/// The emulator's metrics (OpenMetrics), for Prometheus: with the control token as bearer,
/// since a scraper has no browser session.
async fn metrics(State(state): S, headers: HeaderMap) -> Result<Response, PageError> {
    let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(sent.trim().as_bytes(), state.control_token.as_bytes())) {
        return Err(PageError(StatusCode::UNAUTHORIZED, "send the emulator's control token: Authorization: Bearer <token>".into()));
    }
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.control.metrics_text()).into_response())
}

/// Server-sent events: the emulator's event log (telemetry with body and properties,
/// twin changes, connects, C2D feedback), the last 200 first, then live.
async fn events(State(state): S, headers: HeaderMap) -> Result<Response, PageError> {
    state.caller(&headers, false)?;
    let control = state.control.clone();
    let since = control.last_event_seq().saturating_sub(200);
    let stop = state.stop.clone();
    let stream = futures_util::stream::unfold((control, since, stop, Vec::new().into_iter()), |(control, mut since, mut stop, mut pending)| async move {
        loop {
            if let Some(event) = pending.next() {
                let data = serde_json::to_string(&event).unwrap_or_default();
                return Some((Ok::<_, std::convert::Infallible>(format!("data: {data}\n\n")), (control, since, stop, pending)));
            }
            let every = EventFilter::default();
            let batch = tokio::select! {
                batch = control.wait_events(since, &every, Duration::from_secs(15)) => batch,
                _ = stop.wait_for(|s| *s) => return None,
            };
            if batch.is_empty() {
                // A comment line keeps proxies and the browser from timing the stream out.
                return Some((Ok(": idle\n\n".to_owned()), (control, since, stop, pending)));
            }
            since = batch.last().map_or(since, |e| e.seq);
            pending = batch.into_iter();
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
