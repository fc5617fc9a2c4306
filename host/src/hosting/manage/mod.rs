//! The management API and its console, on their own listen address: list agents with
//! their status and recent history, deploy a new module version or roll back to an earlier
//! one, stop / start / restart, stream logs, Prometheus metrics. A bearer token acts for
//! one tenant, which sees and changes only its own agents; the console's pages use a
//! session cookie instead (`web::session`), so that no token stays in a URL.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the console's overview of the tenant's agents (login first) |
//! | `GET /agents/{id}` | the console's page of one agent |
//! | `GET /login`, `POST /login` (form: `token`) | the login form; a session cookie |
//! | `GET /login/{code}` | a one-time login link (from `tether serve`'s output or `POST /api/login-links`) |
//! | `POST /logout` | ends the session |
//! | `GET /api/session` | `{tenant, csrf}`: who is logged in, and the CSRF token changing requests send |
//! | `POST /api/login-links` | `{path}`: a one-time login link, valid for 10 minutes |
//! | `GET /api/agents?q=&status=&offset=&limit=` | JSON list of the tenant's agents, filtered and paged; `total` before paging |
//! | `GET /api/agents/{id}` | one agent, with its device line, store size and URL |
//! | `GET /api/agents/{id}/history` | the last samples of its counters, as columns |
//! | `GET /api/agents/{id}/timeline` | its device messages, broker traffic and log lines, by time (recording while watched) |
//! | `GET /api/agents/{id}/deploys` | its deploy history, and which versions can be rolled back to |
//! | `POST /api/agents/{id}/deploy` (body: the component) | 200, or 400 with the reason |
//! | `POST /api/agents/{id}/rollback` (JSON `{module}`) | 200, or 400/404 with the reason |
//! | `POST /api/agents/{id}/stop`, `/start`, `/restart` | 202 |
//! | `GET /api/agents/{id}/logs`, `GET /api/logs` | server-sent events, one log line each: the recent ones, then new ones |
//! | `GET /metrics` | the tenant's agents' counters, OpenMetrics text (prometheus-client) |

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, watch};

mod elsewhere;
mod error;

use error::{ApiError, json_response};

use super::history::History;
use super::manifest::{Access, ManageConfig};
use super::web::session::{Sessions, set_cookie};
use super::web::{self as console};
use crate::hosting::cluster::Cluster;
use crate::kit::log::{Level, LogLine};
use crate::kit::metrics::LATENCY_BUCKETS;
use crate::kit::timeline::Edge;
use crate::runtime::agent::AgentStatus;
use crate::runtime::host::{AgentReport, ControlError, Host, RollbackError};

struct Api {
    host: Arc<Host>,
    access: Access,
    max_module_bytes: usize,
    /// Tenants with a deploy compiling: one at a time each, so that one tenant cannot
    /// hold every compile slot.
    compiling: Mutex<HashSet<String>>,
    streams: Streams,
    sessions: Sessions,
    history: Arc<History>,
    stop: watch::Receiver<bool>,
    /// In cluster mode, where deploys are kept so that the agent's owner runs them.
    cluster: std::sync::OnceLock<Arc<Cluster>>,
    /// What marks a call forwarded from another node as this process's own
    /// ([`elsewhere::FORWARDED`]).
    forward_secret: String,
}

/// The running management server.
pub struct ManageServer {
    addr: SocketAddr,
    api: Arc<Api>,
    /// The API itself, to answer calls forwarded from other nodes.
    router: axum::Router,
    stop: watch::Sender<bool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// Answering other nodes and relaying log lines, in cluster mode.
    cluster_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ManageServer {
    /// Binds `listen` and serves the API for `host`, sampling its agents' counters for the
    /// console's plots.
    pub async fn start(host: Arc<Host>, access: Access, config: &ManageConfig, listen: SocketAddr) -> std::io::Result<ManageServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let max_module_bytes = host.runtime().module_limits().max_module_bytes;
        let history = Arc::new(History::new(Duration::from_millis(config.history_interval_ms)));
        let api = Arc::new(Api {
            host,
            access,
            max_module_bytes,
            compiling: Mutex::default(),
            streams: Streams::new(config.max_log_streams),
            sessions: Sessions::default(),
            history,
            stop: stop_rx.clone(),
            cluster: std::sync::OnceLock::new(),
            forward_secret: super::web::session::secret()?,
        });
        let router = axum::Router::new()
            .route("/", get(|| async { console::page(console::OVERVIEW) }))
            .route("/agents/{id}", get(|| async { console::page(console::AGENT) }))
            .route("/login", get(|| async { console::page(console::LOGIN) }).post(login))
            .route("/login/{code}", get(login_link))
            .route("/logout", post(logout))
            .route("/console/{file}", get(console::file))
            .route("/api/session", get(session))
            .route("/api/login-links", post(new_login_link))
            .route("/api/agents", get(list))
            .route("/api/agents/{id}", get(show))
            .route("/api/agents/{id}/history", get(agent_history))
            .route("/api/agents/{id}/deploys", get(deploys))
            .route("/api/agents/{id}/timeline", get(timeline))
            .route("/api/agents/{id}/deploy", post(deploy))
            .route("/api/agents/{id}/rollback", post(rollback))
            .route("/api/agents/{id}/logs", get(agent_logs))
            .route("/api/agents/{id}/{action}", post(act))
            .route("/api/logs", get(all_logs))
            .route("/metrics", get(metrics))
            .layer(axum::middleware::from_fn_with_state(api.clone() as Arc<dyn elsewhere::Calls>, elsewhere::route))
            .layer(axum::middleware::map_response(console::security_headers))
            .with_state(api.clone());
        let mut stopped = stop_rx.clone();
        let served = router.clone();
        let serve = tokio::spawn(async move {
            let serve = axum::serve(listener, served).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("management API stopped: {e}");
            }
        });
        let sample = tokio::spawn(sample(api.clone(), stop_rx));
        Ok(ManageServer { addr, api, router, stop, tasks: [serve, sample], cluster_tasks: Mutex::default() })
    }

    /// Serves the API for the whole cluster (`tether serve --cluster`): deploys are kept
    /// in it, calls about agents on other nodes are answered by them, the agent list and
    /// log streams cover every node.
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        if self.api.cluster.set(cluster.clone()).is_err() {
            return;
        }
        let mut tasks = self.cluster_tasks.lock().unwrap_or_else(|p| p.into_inner());
        let api: Arc<dyn elsewhere::Calls> = self.api.clone();
        tasks.push(tokio::spawn(elsewhere::answer(api.clone(), self.router.clone(), cluster.clone())));
        tasks.push(tokio::spawn(elsewhere::relay_logs(api, cluster)));
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A one-time console login link for `tenant`, valid for 10 minutes: what `tether
    /// serve` prints, as Jupyter does.
    pub fn login_link(&self, tenant: &str) -> std::io::Result<String> {
        Ok(format!("http://{}/login/{}", self.addr, self.api.sessions.link(tenant)?))
    }

    /// Stops serving (ending open log streams) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.cluster_tasks.into_inner().unwrap_or_else(|p| p.into_inner()) {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Samples every agent's counters into the history until the server stops. A sample of
/// 100,000 agents takes about 0.17 s of CPU, so it runs on a blocking thread rather than
/// holding a worker the agents' I/O needs.
async fn sample(api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(api.history.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let api = api.clone();
        let _ = tokio::task::spawn_blocking(move || api.history.sample(&api.host.agents())).await;
    }
}



impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Unknown(id) => ApiError::NotFound(id),
            ControlError::Gone(_) => ApiError::Unavailable(e.to_string()),
            ControlError::Keep { .. } => ApiError::Internal(e.to_string()),
        }
    }
}


impl From<RollbackError> for ApiError {
    fn from(e: RollbackError) -> Self {
        match e {
            RollbackError::NotKept(_) | RollbackError::Load(_) => ApiError::BadRequest(e.to_string()),
            RollbackError::Control(e) => e.into(),
        }
    }
}

impl Api {
    /// The tenant a bearer token acts for. Every token is compared, each in constant time,
    /// so that the time to answer says nothing about how close a guess was.
    fn tenant_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (known, tenant) in &self.access.tokens {
            if bool::from(known.as_bytes().ct_eq(token.trim().as_bytes())) {
                found = Some(tenant.as_str());
            }
        }
        found
    }

    /// The tenant a request acts for: by its bearer token, or else by its console
    /// session, whose requests that change something (`changes`) must carry the session's
    /// CSRF token too.
    fn caller(&self, headers: &HeaderMap, changes: bool) -> Result<String, ApiError> {
        if let Some(forwarded) = headers.get(elsewhere::FORWARDED) {
            // Checked by the node the call came in on; this process marked it.
            let (secret, tenant) = forwarded.to_str().ok().and_then(|v| v.split_once(':')).ok_or(ApiError::Unauthorized)?;
            return match bool::from(secret.as_bytes().ct_eq(self.forward_secret.as_bytes())) {
                true => Ok(tenant.to_owned()),
                false => Err(ApiError::Unauthorized),
            };
        }
        let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if let Some(token) = bearer {
            return self.tenant_of(token).map(str::to_owned).ok_or(ApiError::Unauthorized);
        }
        let session = self.sessions.of(headers).ok_or(ApiError::Unauthorized)?;
        if changes && !session.csrf_ok(headers) {
            return Err(ApiError::Forbidden);
        }
        Ok(session.principal)
    }

    /// Checks that agent `id` exists and is `tenant`'s. Another tenant's agent is "no
    /// agent" too, so that a token cannot learn which ids exist.
    fn owned(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        match self.access.owners.get(id) {
            Some(owner) if owner == tenant => Ok(()),
            _ => Err(ApiError::NotFound(id.to_owned())),
        }
    }

    fn agents_of(&self, tenant: &str) -> Vec<AgentReport> {
        let mut reports = self.host.agents();
        reports.retain(|r| self.access.owners.get(&r.id).is_some_and(|o| o == tenant));
        reports
    }
}

impl elsewhere::Calls for Api {
    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    fn tenant(&self, headers: &HeaderMap, changes: bool) -> Result<String, ApiError> {
        self.caller(headers, changes)
    }

    fn check_owner(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        self.owned(tenant, id)
    }

    fn tenant_of_agent(&self, id: &str) -> Option<&str> {
        self.access.owners.get(id).map(String::as_str)
    }

    fn secret(&self) -> &str {
        &self.forward_secret
    }

    fn host(&self) -> &Host {
        &self.host
    }
}

/// A status's name in the API, and its cause if it has one.
fn status_name(status: &AgentStatus) -> (&'static str, Option<&String>) {
    match status {
        AgentStatus::Starting => ("starting", None),
        AgentStatus::Running => ("running", None),
        AgentStatus::Restarting { cause } => ("restarting", Some(cause)),
        AgentStatus::Failed { cause } => ("failed", Some(cause)),
        AgentStatus::Stopped => ("stopped", None),
    }
}

fn agent_json(tenant: &str, r: &AgentReport) -> serde_json::Value {
    let (status, cause) = status_name(&r.status);
    json!({
        "id": r.id,
        "tenant": tenant,
        "status": status,
        "cause": cause,
        "restarts": r.restarts,
        "device_connected": r.device_connected,
        "module": r.module_digest,
        "slow_lane": r.slow_lane,
        "events": r.metrics.events,
        "calls": r.metrics.calls,
        "memory_bytes": r.metrics.memory_bytes,
    })
}

/// `GET /api/agents`' filter and page.
#[derive(Deserialize)]
struct ListQuery {
    /// Part of the id, any case.
    #[serde(default)]
    q: String,
    /// One status (`running`, `failed`, ...).
    #[serde(default)]
    status: String,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap, Query(query): Query<ListQuery>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    let q = query.q.to_lowercase();
    let mut reports = api.agents_of(&tenant);
    reports.retain(|r| r.id.to_lowercase().contains(&q) && (query.status.is_empty() || status_name(&r.status).0 == query.status));
    let total = reports.len();
    let page = reports.iter().skip(query.offset).take(query.limit.unwrap_or(usize::MAX));
    let agents: Vec<_> = page
        .map(|r| {
            let mut agent = agent_json(&tenant, r);
            agent["messages_per_s"] = json!(api.history.messages(&r.id));
            agent["last_error"] = json!(api.host.last_error(&r.id));
            agent
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "agents": agents, "total": total })))
}

async fn show(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    api.owned(&tenant, &id)?;
    let report = api.host.agent(&id).ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let mut agent = agent_json(&tenant, &report);
    agent["url"] = json!(api.host.agent_url(&id));
    agent["store_bytes"] = json!(api.host.store_bytes(&id));
    agent["cpu_seconds"] = json!(report.metrics.busy_seconds);
    agent["mqtt_messages"] = json!(report.metrics.mqtt_messages);
    agent["device_messages"] = json!(report.metrics.device_messages);
    agent["http_requests"] = json!(report.metrics.http_requests);
    agent["device"] = match api.host.device_stats(&id) {
        Some(line) => json!({
            "connected": report.device_connected,
            "frames_rx": line.frames_rx,
            "frames_tx": line.frames_tx,
            "crc_errors": line.crc_errors,
            "malformed": line.malformed + line.cobs_errors + line.oversize + line.unknown_type,
            "unexpected": line.unexpected,
            "rtt_ms": line.rtt_ms,
            "replugs": api.host.device_reopens(&id).unwrap_or(0),
        }),
        None => serde_json::Value::Null,
    };
    Ok(json_response(StatusCode::OK, &agent))
}

async fn agent_history(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    api.owned(&tenant, &id)?;
    Ok(json_response(StatusCode::OK, &api.history.columns(&id)))
}

/// The agent's device messages and broker traffic (recorded while someone watches, for a
/// minute after each look) and its recent log lines, one list by time.
async fn timeline(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    api.owned(&tenant, &id)?;
    let traffic = api.host.timeline(&id).ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let mut entries: Vec<(u64, serde_json::Value)> = traffic
        .into_iter()
        .map(|e| {
            let edge = match e.edge {
                Edge::Device => "device",
                Edge::Broker => "broker",
            };
            (e.at_ms, json!({ "at_ms": e.at_ms, "edge": edge, "direction": if e.inbound { "in" } else { "out" }, "what": e.what, "detail": e.preview }))
        })
        .collect();
    for line in api.host.recent_logs(&id) {
        let at_ms = line.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let level = if line.level == Level::Error { "error" } else { "info" };
        entries.push((at_ms, json!({ "at_ms": at_ms, "edge": "agent", "direction": level, "what": "log", "detail": line.text })));
    }
    // Stable: entries of one millisecond keep the order they were recorded in.
    entries.sort_by_key(|(at, _)| *at);
    let watch_s = crate::kit::timeline::WATCH.as_secs();
    Ok(json_response(StatusCode::OK, &json!({ "entries": entries.into_iter().map(|(_, e)| e).collect::<Vec<_>>(), "recording_for_s": watch_s })))
}

async fn deploys(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    api.owned(&tenant, &id)?;
    let report = api.host.agent(&id).ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let (history, base) = api.host.deploys(&id).map_err(|e| ApiError::Internal(format!("cannot read the deploy history: {e}")))?;
    let history: Vec<_> = history
        .iter()
        .rev()
        .map(|d| json!({ "module": d.module, "at": d.at, "by": d.by, "via": d.via, "can_roll_back": d.module != report.module_digest && api.host.can_roll_back(&id, &d.module) }))
        .collect();
    let manifest = base.map(|digest| json!({ "module": digest, "can_roll_back": digest != report.module_digest && api.host.can_roll_back(&id, &digest) }));
    Ok(json_response(StatusCode::OK, &json!({ "running": report.module_digest, "history": history, "manifest": manifest })))
}

/// `POST /api/agents/{id}/rollback`'s body.
#[derive(Deserialize)]
struct RollbackBody {
    /// The digest of the version to run again.
    module: String,
}

async fn rollback(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, true)?;
    api.owned(&tenant, &id)?;
    let body: RollbackBody = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("send JSON {{\"module\": \"<digest>\"}}: {e}")))?;
    let _turn = CompileTurn::take(&api.compiling, &tenant)?;
    api.host.roll_back(&id, &body.module, &tenant).await?;
    Ok(json_response(StatusCode::OK, &json!({ "id": id, "module": body.module })))
}

/// Validates the new version first (size, a component, the agent world); only then is it
/// swapped in, so a bad upload leaves the old version running.
async fn deploy(State(api): State<Arc<Api>>, Path(id): Path<String>, request: Request) -> Result<Response, ApiError> {
    let tenant = match api.caller(request.headers(), true).and_then(|tenant| api.owned(&tenant, &id).map(|()| tenant)) {
        Ok(tenant) => tenant,
        Err(e) => return Ok(e.unread()),
    };
    let limit = api.max_module_bytes;
    let bytes: Bytes = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(bytes) => bytes,
        Err(_) => return Ok(ApiError::BadRequest(format!("module too large: over the limit of {limit} bytes")).unread()),
    };
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("empty body: send the component's bytes".into()));
    }
    let _turn = CompileTurn::take(&api.compiling, &tenant)?;
    let started = Instant::now();
    let module = api.host.compile(bytes.to_vec()).await.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    let digest = module.digest.clone();
    if let Some(cluster) = api.cluster.get() {
        cluster.publish_deploy(&id, &digest, &bytes, &tenant).await.map_err(|e| ApiError::Unavailable(format!("cannot keep the deploy in the cluster: {e:#}")))?;
        // Running here: swap it in now. Elsewhere: its owner does, on seeing the deploy.
        if api.host.agent(&id).is_some() {
            api.host.deploy_kept(&id, module, &bytes, &tenant)?;
        }
        return Ok(json_response(StatusCode::OK, &json!({ "id": id, "module": digest, "compile_ms": compile_ms, "node": cluster.node() })));
    }
    api.host.deploy_kept(&id, module, &bytes, &tenant)?;
    Ok(json_response(StatusCode::OK, &json!({ "id": id, "module": digest, "compile_ms": compile_ms })))
}

/// The login form's fields.
#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Logged in: the session cookie, and on to the overview.
fn logged_in(api: &Api, tenant: &str) -> Result<Response, ApiError> {
    let id = api.sessions.start(tenant).map_err(|e| ApiError::Internal(format!("cannot start a session: {e}")))?;
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&id));
    Ok(response)
}

/// `POST /login`: the token from the form (never from a URL).
async fn login(State(api): State<Arc<Api>>, Form(form): Form<LoginForm>) -> Result<Response, ApiError> {
    match api.tenant_of(&form.token) {
        Some(tenant) => logged_in(&api, tenant),
        None => Ok(Redirect::to("/login?failed").into_response()),
    }
}

/// `GET /login/{code}`: a one-time link, used up by this request.
async fn login_link(State(api): State<Arc<Api>>, Path(code): Path<String>) -> Result<Response, ApiError> {
    match api.sessions.redeem(&code) {
        Some(tenant) => logged_in(&api, &tenant),
        None => Ok(Redirect::to("/login?expired").into_response()),
    }
}

async fn logout(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.caller(&headers, true)?;
    api.sessions.end(&headers);
    let mut response = json_response(StatusCode::OK, &json!({ "logged_out": true }));
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(""));
    Ok(response)
}

/// Who the caller is, and for a console session the CSRF token its pages send.
async fn session(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    let csrf = api.sessions.of(&headers).map(|s| s.csrf);
    Ok(json_response(StatusCode::OK, &json!({ "tenant": tenant, "csrf": csrf })))
}

async fn new_login_link(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, true)?;
    let code = api.sessions.link(&tenant).map_err(|e| ApiError::Internal(format!("cannot make a login link: {e}")))?;
    Ok(json_response(StatusCode::OK, &json!({ "path": format!("/login/{code}"), "expires_in_s": 600 })))
}

/// A tenant's one compile at a time; released when dropped.
struct CompileTurn<'a> {
    compiling: &'a Mutex<HashSet<String>>,
    tenant: String,
}

impl<'a> CompileTurn<'a> {
    fn take(compiling: &'a Mutex<HashSet<String>>, tenant: &str) -> Result<CompileTurn<'a>, ApiError> {
        if !compiling.lock().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_owned()) {
            return Err(ApiError::Busy("another deploy of this tenant is compiling; send this one when it has finished".into()));
        }
        Ok(CompileTurn { compiling, tenant: tenant.to_owned() })
    }
}

impl Drop for CompileTurn<'_> {
    fn drop(&mut self) {
        self.compiling.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.tenant);
    }
}

async fn act(State(api): State<Arc<Api>>, headers: HeaderMap, Path((id, action)): Path<(String, String)>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, true)?;
    api.owned(&tenant, &id)?;
    match action.as_str() {
        "stop" => api.host.stop_agent(&id)?,
        "start" => api.host.start_agent(&id)?,
        "restart" => api.host.restart_agent(&id)?,
        other => return Err(ApiError::BadRequest(format!("unknown action {other:?}: stop, start or restart"))),
    }
    Ok(json_response(StatusCode::ACCEPTED, &json!({ "id": id, "action": action })))
}

async fn agent_logs(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    api.owned(&tenant, &id)?;
    log_stream(&api, &tenant, HashSet::from([id]))
}

async fn all_logs(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    let ids = api.access.owners.iter().filter(|(_, o)| **o == tenant).map(|(id, _)| id.clone()).collect();
    log_stream(&api, &tenant, ids)
}

/// The log streams open per tenant, each counted while its response body lives.
struct Streams {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One open stream of a tenant; dropped with the response body.
struct StreamSlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
}

impl Streams {
    fn new(max: usize) -> Streams {
        Streams { open: Arc::default(), max }
    }

    fn take(&self, tenant: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(tenant.to_owned()).or_default();
        if *count >= self.max {
            return Err(ApiError::Busy(format!("{} log streams are open for this tenant, the most allowed (manage.max_log_streams); close one first", self.max)));
        }
        *count += 1;
        Ok(StreamSlot { open: self.open.clone(), tenant: tenant.to_owned() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
        }
    }
}

/// Server-sent events, one per log line of `agents` (all of `tenant`): their recent
/// lines, then the new ones as they come, until the client goes away or the server stops.
fn log_stream(api: &Api, tenant: &str, agents: HashSet<String>) -> Result<Response, ApiError> {
    struct Feed {
        backlog: std::vec::IntoIter<LogLine>,
        logs: broadcast::Receiver<LogLine>,
        stop: watch::Receiver<bool>,
        /// Per agent, the newest line shown from the backlog: live lines up to it are
        /// duplicates.
        shown: HashMap<String, u64>,
        _slot: StreamSlot,
    }
    let slot = api.streams.take(tenant)?;
    // Subscribed before the backlog is read, so no line falls between the two.
    let logs = api.host.tenant_logs(tenant);
    let mut backlog: Vec<LogLine> = agents.iter().flat_map(|id| api.host.recent_logs(id)).collect();
    backlog.sort_by_key(|line| line.seq);
    let mut shown: HashMap<String, u64> = agents.into_iter().map(|id| (id, 0)).collect();
    for line in &backlog {
        shown.insert(line.agent.to_string(), line.seq);
    }
    let feed = Feed { backlog: backlog.into_iter(), logs, stop: api.stop.clone(), shown, _slot: slot };
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = match feed.backlog.next() {
            Some(line) => line_json(&line),
            None => loop {
                let line = tokio::select! {
                    line = feed.logs.recv() => line,
                    _ = feed.stop.wait_for(|s| *s) => return None,
                };
                match line {
                    Ok(line) if feed.shown.get(&*line.agent).is_some_and(|&seq| line.seq > seq) => break line_json(&line),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        break json!({ "agent": null, "level": "error", "text": format!("{n} lines skipped: the reader is too slow") });
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
        };
        Some((Ok::<_, std::convert::Infallible>(format!("data: {event}\n\n")), feed))
    });
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn line_json(line: &LogLine) -> serde_json::Value {
    let level = if line.level == Level::Error { "error" } else { "info" };
    let at = line.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    json!({ "agent": &*line.agent, "level": level, "text": line.text, "at_ms": at })
}

async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.caller(&headers, false)?;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(AgentsCollector { tenant: tenant.clone(), agents: api.agents_of(&tenant) }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| ApiError::Internal(format!("cannot encode the metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

/// One tenant's agents' counters, read at the scrape: the agents keep plain atomics
/// (`kit::metrics`), and this turns them into OpenMetrics families, one series per agent.
#[derive(Debug)]
struct AgentsCollector {
    tenant: String,
    agents: Vec<AgentReport>,
}

/// How a per-agent value is exposed: name (without unit or `_total`), help, unit, kind,
/// and the value.
type Field = (&'static str, &'static str, Option<Unit>, MetricType, fn(&AgentReport) -> f64);

impl AgentsCollector {
    const FIELDS: [Field; 14] = [
        ("tether_agent_up", "1 while the agent runs", None, MetricType::Gauge, |r| f64::from(u8::from(r.status == AgentStatus::Running))),
        ("tether_agent_slow_lane", "1 while the agent runs behind lighter ones (long event, heavy CPU use)", None, MetricType::Gauge, |r| f64::from(u8::from(r.slow_lane))),
        ("tether_agent_restarts", "Crashes that restarted the agent", None, MetricType::Counter, |r| r.restarts.into()),
        ("tether_agent_events", "Events delivered, start included", None, MetricType::Counter, |r| r.metrics.events as f64),
        ("tether_agent_calls", "Calls into the agent: start, and one per burst of events taken together", None, MetricType::Counter, |r| r.metrics.calls as f64),
        ("tether_agent_cpu", "CPU time spent running the agent's code", Some(Unit::Seconds), MetricType::Counter, |r| r.metrics.busy_seconds),
        ("tether_agent_memory", "Linear memory last granted to the agent", Some(Unit::Bytes), MetricType::Gauge, |r| r.metrics.memory_bytes as f64),
        ("tether_agent_log_lines", "Log lines the agent wrote", None, MetricType::Counter, |r| r.metrics.log_lines as f64),
        ("tether_agent_log_dropped", "Log lines dropped over the log rate", None, MetricType::Counter, |r| r.metrics.log_dropped as f64),
        ("tether_agent_http_requests", "Outgoing HTTP requests sent", None, MetricType::Counter, |r| r.metrics.http_requests as f64),
        ("tether_agent_http_refused", "Outgoing HTTP requests refused (not allowed, rate)", None, MetricType::Counter, |r| r.metrics.http_refused as f64),
        ("tether_agent_limit_refusals", "Calls refused at a per-agent limit (MQTT connections, timers)", None, MetricType::Counter, |r| r.metrics.limit_refused as f64),
        ("tether_agent_messages", "MQTT and device messages received", None, MetricType::Counter, |r| (r.metrics.mqtt_messages + r.metrics.device_messages) as f64),
        ("tether_agent_mqtt_pauses", "MQTT connections paused while the agent had too many messages waiting", None, MetricType::Counter, |r| r.metrics.mqtt_pauses as f64),
    ];
}

impl Collector for AgentsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |r: &AgentReport| [("agent", r.id.clone()), ("tenant", self.tenant.clone())];
        for (name, help, unit, kind, value) in Self::FIELDS {
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), kind)?;
            for r in &self.agents {
                let labels = labels(r);
                let series = family.encode_family(&labels)?;
                let v = value(r);
                // Counts are written as integers ("2", not "2.0"); only times have fractions.
                let whole = v.fract() == 0.0 && v.abs() < 9e15;
                match (kind, whole) {
                    (MetricType::Counter, true) => ConstCounter::new(v as u64).encode(series)?,
                    (MetricType::Counter, false) => ConstCounter::new(v).encode(series)?,
                    (_, true) => ConstGauge::new(v as i64).encode(series)?,
                    (_, false) => ConstGauge::new(v).encode(series)?,
                }
            }
        }
        let mut family = encoder.encode_descriptor("tether_agent_event", "Time an event took inside the agent", Some(&Unit::Seconds), MetricType::Histogram)?;
        for r in &self.agents {
            let labels = labels(r);
            let mut series = family.encode_family(&labels)?;
            // The agent counts cumulatively; the encoder wants each bucket's own count, and
            // f64::MAX for the last bound, which it writes as +Inf.
            let mut below = 0;
            let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
            for (bound, cumulative) in LATENCY_BUCKETS.iter().zip(&r.metrics.latency_buckets).map(|(b, c)| (*b, *c)).chain([(f64::MAX, r.metrics.events)]) {
                buckets.push((bound, cumulative.saturating_sub(below)));
                below = below.max(cumulative);
            }
            series.encode_histogram::<NoLabelSet>(r.metrics.busy_seconds, r.metrics.events, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::metrics::MetricsSnapshot;

    #[test]
    fn metrics_are_openmetrics_with_one_series_per_agent() {
        let metrics = MetricsSnapshot { events: 5, busy_seconds: 0.25, latency_buckets: vec![1, 3, 3, 3, 3, 4, 4, 4], memory_bytes: 65536, ..Default::default() };
        let agent = AgentReport { id: "a1".into(), status: AgentStatus::Running, restarts: 2, device_connected: None, module_digest: String::new(), slow_lane: false, metrics };
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(AgentsCollector { tenant: "t".into(), agents: vec![agent] }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for line in [
            "# TYPE tether_agent_restarts counter",
            r#"tether_agent_restarts_total{agent="a1",tenant="t"} 2"#,
            r#"tether_agent_up{agent="a1",tenant="t"} 1"#,
            "# UNIT tether_agent_memory_bytes bytes",
            r#"tether_agent_memory_bytes{agent="a1",tenant="t"} 65536"#,
            r#"tether_agent_cpu_seconds_total{agent="a1",tenant="t"} 0.25"#,
            r#"tether_agent_event_seconds_bucket{le="0.0001",agent="a1",tenant="t"} 1"#,
            r#"tether_agent_event_seconds_bucket{le="0.0005",agent="a1",tenant="t"} 3"#,
            r#"tether_agent_event_seconds_bucket{le="1.0",agent="a1",tenant="t"} 4"#,
            r#"tether_agent_event_seconds_bucket{le="+Inf",agent="a1",tenant="t"} 5"#,
            r#"tether_agent_event_seconds_count{agent="a1",tenant="t"} 5"#,
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_tenant_compiles_one_deploy_at_a_time() {
        let compiling = Mutex::default();
        let first = CompileTurn::take(&compiling, "a").expect("free");
        let again = CompileTurn::take(&compiling, "a").err().expect("a is compiling");
        assert_eq!(again.into_response().status(), StatusCode::TOO_MANY_REQUESTS);
        let other = CompileTurn::take(&compiling, "b");
        assert!(other.is_ok(), "another tenant is not held up");
        drop(first);
        assert!(CompileTurn::take(&compiling, "a").is_ok(), "free again once the first is done");
    }
}
