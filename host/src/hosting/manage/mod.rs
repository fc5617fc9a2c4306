//! The management API and its dashboard, on their own listen address: list agents with
//! their status, deploy a new module version, stop / start / restart, stream logs,
//! Prometheus metrics. A bearer token acts for one tenant, which sees and changes only
//! its own agents.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the dashboard (asks for the token) |
//! | `GET /api/agents` | JSON list of the tenant's agents |
//! | `GET /api/agents/{id}` | one agent |
//! | `POST /api/agents/{id}/deploy` (body: the component) | 200, or 400 with the reason |
//! | `POST /api/agents/{id}/stop`, `/start`, `/restart` | 202 |
//! | `GET /api/agents/{id}/logs`, `GET /api/logs` | server-sent events, one log line each: the recent ones, then new ones |
//! | `GET /metrics` | Prometheus text format |

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, watch};

use super::manifest::{Access, ManageConfig};
use crate::kit::log::{Level, LogLine};
use crate::kit::metrics::LATENCY_BUCKETS;
use crate::runtime::agent::AgentStatus;
use crate::runtime::host::{AgentReport, ControlError, Host};

const DASHBOARD: &str = include_str!("dashboard.html");

struct Api {
    host: Arc<Host>,
    access: Access,
    max_module_bytes: usize,
    /// Tenants with a deploy compiling: one at a time each, so that one tenant cannot
    /// hold every compile slot.
    compiling: Mutex<HashSet<String>>,
    streams: Streams,
    stop: watch::Receiver<bool>,
}

/// The running management server.
pub struct ManageServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ManageServer {
    /// Binds `listen` and serves the API for `host`.
    pub async fn start(host: Arc<Host>, access: Access, config: &ManageConfig, listen: SocketAddr) -> std::io::Result<ManageServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let max_module_bytes = host.runtime().module_limits().max_module_bytes;
        let api = Arc::new(Api { host, access, max_module_bytes, compiling: Mutex::default(), streams: Streams::new(config.max_log_streams), stop: stop_rx.clone() });
        let router = axum::Router::new()
            .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD) }))
            .route("/api/agents", get(list))
            .route("/api/agents/{id}", get(show))
            .route("/api/agents/{id}/deploy", post(deploy))
            .route("/api/agents/{id}/logs", get(agent_logs))
            .route("/api/agents/{id}/{action}", post(act))
            .route("/api/logs", get(all_logs))
            .route("/metrics", get(metrics))
            .with_state(api);
        let mut stopped = stop_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("management API stopped: {e}");
            }
        });
        Ok(ManageServer { addr, stop, task })
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (ending open log streams) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A refusal, as JSON `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("no agent {0:?}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    /// The tenant is at one of its limits; try again later.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = json_response(status, &json!({ "error": self.to_string() }));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
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

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

impl Api {
    /// The tenant the request's bearer token acts for. Every token is compared, each in
    /// constant time, so that the time to answer says nothing about how close a guess was.
    fn tenant(&self, headers: &HeaderMap) -> Result<&str, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?
            .trim()
            .as_bytes();
        let mut found = None;
        for (known, tenant) in &self.access.tokens {
            if bool::from(known.as_bytes().ct_eq(token)) {
                found = Some(tenant.as_str());
            }
        }
        found.ok_or(ApiError::Unauthorized)
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

fn agent_json(tenant: &str, r: &AgentReport) -> serde_json::Value {
    let (status, cause) = match &r.status {
        AgentStatus::Starting => ("starting", None),
        AgentStatus::Running => ("running", None),
        AgentStatus::Restarting { cause } => ("restarting", Some(cause)),
        AgentStatus::Failed { cause } => ("failed", Some(cause)),
        AgentStatus::Stopped => ("stopped", None),
    };
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
        "memory_bytes": r.metrics.memory_bytes,
    })
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.tenant(&headers)?;
    let agents: Vec<_> = api.agents_of(tenant).iter().map(|r| agent_json(tenant, r)).collect();
    Ok(json_response(StatusCode::OK, &json!({ "agents": agents })))
}

async fn show(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.tenant(&headers)?;
    api.owned(tenant, &id)?;
    let report = api.host.agent(&id).ok_or_else(|| ApiError::NotFound(id.clone()))?;
    Ok(json_response(StatusCode::OK, &agent_json(tenant, &report)))
}

/// Validates the new version first (size, a component, the agent world); only then is it
/// swapped in, so a bad upload leaves the old version running.
async fn deploy(State(api): State<Arc<Api>>, Path(id): Path<String>, request: Request) -> Result<Response, ApiError> {
    let tenant = api.tenant(request.headers())?;
    api.owned(tenant, &id)?;
    let limit = api.max_module_bytes;
    let bytes: Bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::BadRequest(format!("module too large: over the limit of {limit} bytes")))?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("empty body: send the component's bytes".into()));
    }
    let _turn = CompileTurn::take(&api.compiling, tenant)?;
    let started = Instant::now();
    let module = api.host.compile(bytes.to_vec()).await.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    let digest = module.digest.clone();
    api.host.deploy_kept(&id, module, &bytes)?;
    Ok(json_response(StatusCode::OK, &json!({ "id": id, "module": digest, "compile_ms": compile_ms })))
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
    let tenant = api.tenant(&headers)?;
    api.owned(tenant, &id)?;
    match action.as_str() {
        "stop" => api.host.stop_agent(&id)?,
        "start" => api.host.start_agent(&id)?,
        "restart" => api.host.restart_agent(&id)?,
        other => return Err(ApiError::BadRequest(format!("unknown action {other:?}: stop, start or restart"))),
    }
    Ok(json_response(StatusCode::ACCEPTED, &json!({ "id": id, "action": action })))
}

async fn agent_logs(State(api): State<Arc<Api>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let tenant = api.tenant(&headers)?;
    api.owned(tenant, &id)?;
    log_stream(&api, tenant, HashSet::from([id]))
}

async fn all_logs(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.tenant(&headers)?;
    let ids = api.access.owners.iter().filter(|(_, o)| o.as_str() == tenant).map(|(id, _)| id.clone()).collect();
    log_stream(&api, tenant, ids)
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
    json!({ "agent": &*line.agent, "level": level, "text": line.text })
}

async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = api.tenant(&headers)?;
    let text = prometheus(tenant, &api.agents_of(tenant));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The Prometheus text exposition of `agents`' counters.
fn prometheus(tenant: &str, agents: &[AgentReport]) -> String {
    type Field = fn(&AgentReport) -> f64;
    let simple: [(&str, &str, &str, Field); 13] = [
        ("tether_agent_up", "gauge", "1 while the agent runs", |r| f64::from(u8::from(r.status == AgentStatus::Running))),
        ("tether_agent_slow_lane", "gauge", "1 while the agent runs behind lighter ones (long event, heavy CPU use)", |r| f64::from(u8::from(r.slow_lane))),
        ("tether_agent_restarts_total", "counter", "Crashes that restarted the agent", |r| r.restarts.into()),
        ("tether_agent_events_total", "counter", "Events delivered, start included", |r| r.metrics.events as f64),
        ("tether_agent_cpu_seconds_total", "counter", "CPU time spent running the agent's code", |r| r.metrics.busy_seconds),
        ("tether_agent_memory_bytes", "gauge", "Linear memory last granted to the agent", |r| r.metrics.memory_bytes as f64),
        ("tether_agent_log_lines_total", "counter", "Log lines the agent wrote", |r| r.metrics.log_lines as f64),
        ("tether_agent_log_dropped_total", "counter", "Log lines dropped over the log rate", |r| r.metrics.log_dropped as f64),
        ("tether_agent_http_requests_total", "counter", "Outgoing HTTP requests sent", |r| r.metrics.http_requests as f64),
        ("tether_agent_http_refused_total", "counter", "Outgoing HTTP requests refused (not allowed, rate)", |r| r.metrics.http_refused as f64),
        ("tether_agent_limit_refusals_total", "counter", "Calls refused at a per-agent limit (MQTT connections, timers)", |r| r.metrics.limit_refused as f64),
        ("tether_agent_messages_total", "counter", "MQTT and device messages received", |r| (r.metrics.mqtt_messages + r.metrics.device_messages) as f64),
        ("tether_agent_mqtt_pauses_total", "counter", "MQTT connections paused while the agent had too many messages waiting", |r| r.metrics.mqtt_pauses as f64),
    ];
    // Agent ids are plain (see `check_agent_id`); a tenant name may need escaping.
    let tenant = tenant.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    for (name, kind, help, field) in simple {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for r in agents {
            let _ = writeln!(out, "{name}{{agent=\"{}\",tenant=\"{tenant}\"}} {}", r.id, field(r));
        }
    }
    let name = "tether_agent_event_seconds";
    let _ = writeln!(out, "# HELP {name} Time an event took inside the agent.\n# TYPE {name} histogram");
    for r in agents {
        let labels = format!("agent=\"{}\",tenant=\"{tenant}\"", r.id);
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&r.metrics.latency_buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", r.metrics.events);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", r.metrics.busy_seconds);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", r.metrics.events);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
