//! The management API in cluster mode: any node answers for any agent.
//! - A call about an agent that runs on another node is checked here (the caller, the
//!   tenant's ownership) and then asked of that node over NATS request/reply, on
//!   `tether.manage.<node>`; the node answers it as its own API would, for that tenant.
//! - The agent list gathers every node's agents of the tenant, then filters and pages;
//!   `/metrics` gathers every node's series of the tenant into one exposition.
//! - Log lines of every node's agents are relayed on `tether.logs.<tenant>`, so a log
//!   stream on any node shows the tenant's live lines wherever its agents run.
//!
//! Deploys need none of this: they are kept in the cluster, whose owner runs them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap as NatsHeaders;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;
use tower::ServiceExt;

use crate::hosting::manage::error::{ApiError, json_response};
use crate::hosting::cluster::Cluster;
use crate::kit::log::{Level, LogLine};
use crate::runtime::host::Host;

/// What the cluster's side of the API needs of the node's own API.
pub(super) trait Calls: Send + Sync + 'static {
    /// The cluster, in cluster mode.
    fn cluster(&self) -> Option<&Arc<Cluster>>;
    /// The tenant making a call with `headers` (a state change if `changes`).
    fn tenant(&self, headers: &axum::http::HeaderMap, changes: bool) -> Result<String, ApiError>;
    /// Refuses agent `id` unless it is `tenant`'s.
    fn check_owner(&self, tenant: &str, id: &str) -> Result<(), ApiError>;
    /// The tenant of agent `id`, if the cluster has it.
    fn tenant_of_agent(&self, id: &str) -> Option<&str>;
    /// This process's secret marking forwarded calls ([`FORWARDED`]).
    fn secret(&self) -> &str;
    fn host(&self) -> &Host;
}

/// The header a forwarded call carries inside its answering node: `<secret>:<tenant>`.
/// The secret is that process's own, so the header cannot come from outside.
pub(super) const FORWARDED: &str = "x-tether-forwarded";

const METHOD: &str = "Tether-Method";
const PATH: &str = "Tether-Path";
const TENANT: &str = "Tether-Tenant";
const STATUS: &str = "Tether-Status";

/// The largest call body forwarded (a rollback's JSON; deploys are not forwarded).
const MAX_BODY: usize = 64 * 1024;

/// How long a forwarded call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

fn subject(node: &str) -> String {
    format!("tether.manage.{node}")
}

/// Middleware: sends calls about agents running elsewhere to their node, and gathers the
/// agent list from every node; everything else is answered here.
pub(super) async fn route(State(api): State<Arc<dyn Calls>>, req: Request, next: Next) -> Response {
    let Some(cluster) = api.cluster().cloned() else { return next.run(req).await };
    if req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_owned();
    if (path == "/api/agents" || path == "/metrics") && req.method() == axum::http::Method::GET {
        return match api.tenant(req.headers(), false) {
            Ok(tenant) if path == "/metrics" => gather_metrics(&cluster, &tenant).await,
            Ok(tenant) => gather(&cluster, &tenant, req.uri().query().unwrap_or("")).await,
            Err(e) => e.into_response(),
        };
    }
    let Some(rest) = path.strip_prefix("/api/agents/") else { return next.run(req).await };
    let id = rest.split('/').next().unwrap_or("");
    // Deploys go through the cluster already; log streams follow the relayed lines.
    let here = rest.ends_with("/deploy") || rest.ends_with("/logs") || api.host().agent(id).is_some() || api.tenant_of_agent(id).is_none();
    if here {
        return next.run(req).await;
    }
    let tenant = match api.tenant(req.headers(), req.method() != axum::http::Method::GET).and_then(|t| api.check_owner(&t, id).map(|()| t)) {
        Ok(tenant) => tenant,
        Err(e) => return e.unread(),
    };
    let Some(node) = cluster.owner_of(id).await else {
        return ApiError::Unavailable(format!("agent {id:?} is not running on any node just now (it may be moving); try again")).unread();
    };
    let method = req.method().as_str().to_owned();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or(path);
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(body) => body,
        Err(_) => return ApiError::BadRequest(format!("body over {MAX_BODY} bytes")).unread(),
    };
    match ask(&cluster, &node, &tenant, &method, &path, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// Asks node `node` for its answer to a call of `tenant`'s.
async fn ask(cluster: &Cluster, node: &str, tenant: &str, method: &str, path: &str, body: bytes::Bytes) -> Result<Response, ApiError> {
    let mut headers = NatsHeaders::new();
    headers.insert(METHOD, method);
    headers.insert(PATH, path);
    headers.insert(TENANT, tenant);
    let request = async_nats::Request::new().headers(headers).payload(body).timeout(Some(TIMEOUT));
    let message = cluster.client().send_request(subject(node), request).await.map_err(|e| ApiError::Unavailable(format!("node {node} did not answer: {e}")))?;
    let status = message.headers.as_ref().and_then(|h| h.get(STATUS)).and_then(|s| s.as_str().parse::<u16>().ok()).and_then(|s| StatusCode::from_u16(s).ok());
    let status = status.ok_or_else(|| ApiError::Internal(format!("node {node} answered without a status")))?;
    let mut response = Response::new(Body::from(message.payload));
    *response.status_mut() = status;
    if let Some(kind) = message.headers.as_ref().and_then(|h| h.get("Content-Type")).and_then(|v| HeaderValue::from_str(v.as_str()).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, kind);
    }
    Ok(response)
}

/// `GET /api/agents` over the cluster: every node's list of the tenant's agents (filtered
/// there), merged by id and paged here.
async fn gather(cluster: &Cluster, tenant: &str, query: &str) -> Response {
    let mut params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let number = |params: &[(String, String)], key: &str| params.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse::<usize>().ok());
    let (offset, limit) = (number(&params, "offset").unwrap_or(0), number(&params, "limit"));
    params.retain(|(k, _)| k != "offset" && k != "limit");
    let path = format!("/api/agents?{}", url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish());
    let nodes = cluster.nodes().await;
    let asks = nodes.iter().map(|node| ask(cluster, node, tenant, "GET", &path, bytes::Bytes::new()));
    let mut agents: Vec<serde_json::Value> = Vec::new();
    for answer in futures_util::future::join_all(asks).await {
        // A node that died lately has no answer; its agents are moving.
        let Ok(answer) = answer else { continue };
        let Ok(body) = axum::body::to_bytes(answer.into_body(), usize::MAX).await else { continue };
        if let Ok(serde_json::Value::Object(mut list)) = serde_json::from_slice(&body)
            && let Some(serde_json::Value::Array(some)) = list.remove("agents")
        {
            agents.extend(some);
        }
    }
    agents.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    agents.dedup_by(|a, b| a["id"] == b["id"]);
    let total = agents.len();
    let page: Vec<_> = agents.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX)).collect();
    json_response(StatusCode::OK, &json!({ "agents": page, "total": total }))
}

/// `GET /metrics` over the cluster: every node's exposition of the tenant's agents, merged
/// family by family (each agent's series come from the one node that runs it).
async fn gather_metrics(cluster: &Cluster, tenant: &str) -> Response {
    let nodes = cluster.nodes().await;
    let asks = nodes.iter().map(|node| ask(cluster, node, tenant, "GET", "/metrics", bytes::Bytes::new()));
    let mut texts = Vec::new();
    let mut kind = None;
    for answer in futures_util::future::join_all(asks).await {
        let Ok(answer) = answer else { continue };
        if answer.status() != StatusCode::OK {
            continue;
        }
        kind = kind.or_else(|| answer.headers().get(header::CONTENT_TYPE).cloned());
        if let Ok(body) = axum::body::to_bytes(answer.into_body(), usize::MAX).await {
            texts.push(String::from_utf8_lossy(&body).into_owned());
        }
    }
    let mut response = merge_openmetrics(&texts).into_response();
    if let Some(kind) = kind {
        response.headers_mut().insert(header::CONTENT_TYPE, kind);
    }
    response
}

/// One OpenMetrics exposition made of several whose families hold different series: each
/// family's `# HELP`/`# TYPE`/`# UNIT` lines once (from the first text that has it), then
/// every text's samples of it, and one `# EOF`.
fn merge_openmetrics(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> = std::collections::HashMap::new();
    for text in texts {
        let mut current = String::new();
        let mut described = std::collections::HashSet::new();
        for line in text.lines().filter(|l| *l != "# EOF" && !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# ") {
                current = rest.split(' ').nth(1).unwrap_or_default().to_owned();
                let family = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    (Vec::new(), Vec::new())
                });
                // Described by an earlier text: that description stands.
                if family.1.is_empty() || described.contains(&current) {
                    described.insert(current.clone());
                    if !family.0.iter().any(|l| l == line) {
                        family.0.push(line.to_owned());
                    }
                }
            } else if let Some(family) = families.get_mut(&current) {
                family.1.push(line.to_owned());
            }
        }
    }
    let mut merged = String::new();
    for name in order {
        if let Some((meta, samples)) = families.remove(&name) {
            for line in meta.iter().chain(&samples) {
                merged.push_str(line);
                merged.push('\n');
            }
        }
    }
    merged.push_str("# EOF\n");
    merged
}

/// Answers the calls other nodes forward to this one, through `router` (the API itself),
/// until the subscription ends.
pub(super) async fn answer(api: Arc<dyn Calls>, router: axum::Router, cluster: Arc<Cluster>) {
    let Ok(mut calls) = cluster.client().subscribe(subject(cluster.node())).await else {
        tracing::error!("cannot answer forwarded management calls: NATS refused the subscription");
        return;
    };
    while let Some(call) = calls.next().await {
        let (api, router, client) = (api.clone(), router.clone(), cluster.client().clone());
        tokio::spawn(async move {
            let Some(reply) = call.reply.clone() else { return };
            let response = match forwarded(api.secret(), call) {
                Ok(req) => router.oneshot(req).await.unwrap_or_else(|e| match e {}),
                Err(why) => ApiError::BadRequest(why).into_response(),
            };
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
            let mut headers = NatsHeaders::new();
            headers.insert(STATUS, parts.status.as_u16().to_string().as_str());
            if let Some(kind) = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
                headers.insert("Content-Type", kind);
            }
            let _ = client.publish_with_headers(reply, headers, body).await;
        });
    }
}

/// A forwarded call as a request to this node's API, marked with this process's secret.
fn forwarded(secret: &str, call: async_nats::Message) -> Result<Request, String> {
    let headers = call.headers.ok_or("a forwarded call without headers")?;
    let field = |name: &str| headers.get(name).map(|v| v.as_str().to_owned()).ok_or(format!("a forwarded call without {name}"));
    let (method, path, tenant) = (field(METHOD)?, field(PATH)?, field(TENANT)?);
    Request::builder()
        .method(method.as_str())
        .uri(path.as_str())
        .header(FORWARDED, format!("{secret}:{tenant}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(call.payload))
        .map_err(|e| format!("a forwarded call that is not HTTP: {e}"))
}

/// Publishes this node's agents' log lines for the other nodes, and hands theirs to this
/// host's tenant streams, until the host stops.
pub(super) async fn relay_logs(api: Arc<dyn Calls>, cluster: Arc<Cluster>) {
    let client = cluster.client().clone();
    let Ok(mut theirs) = client.subscribe("tether.logs.>").await else {
        tracing::error!("cannot relay log lines between nodes: NATS refused the subscription");
        return;
    };
    let mut ours = api.host().logs();
    let node = cluster.node().to_owned();
    loop {
        tokio::select! {
            line = ours.recv() => match line {
                Ok(line) => {
                    let Some(tenant) = api.tenant_of_agent(&line.agent) else { continue };
                    let at = line.at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
                    let body = json!({ "node": node, "agent": &*line.agent, "error": line.level == Level::Error, "text": line.text, "at_ms": at });
                    let _ = client.publish(format!("tether.logs.{tenant}"), body.to_string().into()).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            message = theirs.next() => {
                let Some(message) = message else { return };
                let Ok(line) = serde_json::from_slice::<serde_json::Value>(&message.payload) else { continue };
                if line["node"].as_str() == Some(node.as_str()) {
                    continue;
                }
                let (Some(agent), Some(text)) = (line["agent"].as_str(), line["text"].as_str()) else { continue };
                let Some(tenant) = api.tenant_of_agent(agent) else { continue };
                let at = std::time::UNIX_EPOCH + Duration::from_millis(line["at_ms"].as_u64().unwrap_or(0));
                let level = if line["error"].as_bool() == Some(true) { Level::Error } else { Level::Info };
                api.host().relay_log(tenant, LogLine { seq: u64::MAX, agent: agent.into(), level, text: text.to_owned(), at });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::hosting::manage::elsewhere::merge_openmetrics;

    #[test]
    fn expositions_merge_family_by_family_with_one_eof() {
        let a = "# HELP up Whether it runs.\n# TYPE up gauge\nup{agent=\"a\"} 1\n# HELP events Events.\n# TYPE events counter\nevents_total{agent=\"a\"} 3\n# EOF\n";
        let b = "# HELP up Whether it runs.\n# TYPE up gauge\nup{agent=\"b\"} 0\n# HELP events Events.\n# TYPE events counter\nevents_total{agent=\"b\"} 5\n# EOF\n";
        let merged = merge_openmetrics(&[a.to_owned(), b.to_owned()]);
        assert_eq!(
            merged,
            "# HELP up Whether it runs.\n# TYPE up gauge\nup{agent=\"a\"} 1\nup{agent=\"b\"} 0\n# HELP events Events.\n# TYPE events counter\nevents_total{agent=\"a\"} 3\nevents_total{agent=\"b\"} 5\n# EOF\n"
        );
        // A node with no agents of the tenant adds its descriptions only.
        assert_eq!(merge_openmetrics(&["# EOF\n".to_owned()]), "# EOF\n");
    }
}
