//! Requests for agents that run on another node: sent over NATS request/reply to
//! `tether.http.<agent>`, which only the agent's owner subscribes to, and answered from
//! there as if the request had come in on the owner's own listener (same limits, same
//! errors).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::capabilities::http::inbound::Forward;
use crate::hosting::manifest::Manifest;
use crate::runtime::host::Host;

/// Headers of a forwarded request and its answer that carry the HTTP request line and
/// status; the HTTP headers travel as NATS headers beside them.
const METHOD: &str = "Tether-Method";
const PATH: &str = "Tether-Path";
const STATUS: &str = "Tether-Status";

/// The subject agent `id`'s owner answers requests on.
pub(super) fn subject(id: &str) -> String {
    format!("tether.http.{id}")
}

/// What a node knows of every agent, to forward its requests within its limits.
struct Limits {
    body_bytes: usize,
    timeout: Duration,
}

/// Forwards requests for agents not on this node to their owners.
pub(super) struct Forwarder {
    client: async_nats::Client,
    agents: HashMap<String, Limits>,
}

impl Forwarder {
    /// Forwards over `client`, within the limits `manifest` gives each agent.
    pub fn new(client: async_nats::Client, manifest: &Manifest) -> Forwarder {
        let agents = manifest
            .agents
            .iter()
            .map(|a| {
                let limits = &a.policy.limits;
                (a.id.clone(), Limits { body_bytes: limits.http_body_bytes, timeout: Duration::from_secs(limits.inbound_timeout_secs.into()) })
            })
            .collect();
        Forwarder { client, agents }
    }
}

#[async_trait::async_trait]
impl Forward for Forwarder {
    async fn forward(&self, id: &str, rest: &str, req: Request) -> Response {
        let Some(limits) = self.agents.get(id) else {
            return (StatusCode::NOT_FOUND, format!("no agent {id:?}\n")).into_response();
        };
        let mut headers = HeaderMap::new();
        headers.insert(METHOD, req.method().as_str());
        let path = match req.uri().query() {
            Some(query) => format!("/{rest}?{query}"),
            None => format!("/{rest}"),
        };
        headers.insert(PATH, path.as_str());
        for (name, value) in req.headers() {
            if let Ok(value) = value.to_str() {
                headers.append(name.as_str(), value);
            }
        }
        let body = match axum::body::to_bytes(req.into_body(), limits.body_bytes).await {
            Ok(body) => body,
            Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response(),
        };
        // The owner answers 504 itself when the agent is late; a little longer here covers
        // the trip.
        let request = async_nats::Request::new().headers(headers).payload(body).timeout(Some(limits.timeout + Duration::from_secs(2)));
        match self.client.send_request(subject(id), request).await {
            Ok(message) => answer(message),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                let mut response = (StatusCode::SERVICE_UNAVAILABLE, format!("agent {id:?} is not running on any node just now (it may be moving); try again\n")).into_response();
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "the node running the agent did not answer in time\n").into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, format!("cannot reach the node running the agent: {e}\n")).into_response(),
        }
    }
}

/// The owner's answer, back into HTTP.
fn answer(message: async_nats::Message) -> Response {
    let Some(headers) = message.headers else {
        return (StatusCode::BAD_GATEWAY, "the node running the agent answered without a status\n").into_response();
    };
    let status = headers.get(STATUS).and_then(|s| s.as_str().parse::<u16>().ok()).and_then(|s| StatusCode::from_u16(s).ok());
    let Some(status) = status else {
        return (StatusCode::BAD_GATEWAY, "the node running the agent answered without a valid status\n").into_response();
    };
    let mut response = Response::new(Body::from(message.payload));
    *response.status_mut() = status;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(STATUS) {
            continue;
        }
        for value in values {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value.as_str())) {
                response.headers_mut().append(name, value);
            }
        }
    }
    response
}

/// Answers agent `id`'s forwarded requests on this node until the subscription ends;
/// started when the node takes the agent, aborted when the agent leaves.
pub(super) async fn serve(host: Arc<Host>, client: async_nats::Client, id: String, mut subscription: async_nats::Subscriber) {
    while let Some(message) = subscription.next().await {
        let (host, client, id) = (host.clone(), client.clone(), id.clone());
        tokio::spawn(async move {
            let Some(reply) = message.reply.clone() else { return };
            let response = match request(message) {
                Ok((rest, req)) => match host.answer_here(&id, &rest, req).await {
                    Some(response) => response,
                    None => (StatusCode::SERVICE_UNAVAILABLE, format!("agent {id:?} has just left this node; try again\n")).into_response(),
                },
                Err(why) => (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
            };
            let (parts, body) = response.into_parts();
            // What the agent answered is bounded by its own limits already.
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
            let mut headers = HeaderMap::new();
            headers.insert(STATUS, parts.status.as_u16().to_string().as_str());
            for (name, value) in &parts.headers {
                if let Ok(value) = value.to_str() {
                    headers.append(name.as_str(), value);
                }
            }
            if let Err(e) = client.publish_with_headers(reply, headers, body).await {
                tracing::warn!(agent = id, "cannot send a forwarded request's answer back: {e}");
            }
        });
    }
}

/// A forwarded message back into an HTTP request, and its path below the agent's.
fn request(message: async_nats::Message) -> Result<(String, Request), String> {
    let headers = message.headers.ok_or("a forwarded request without headers")?;
    let method = headers.get(METHOD).ok_or("a forwarded request without a method")?.as_str().to_owned();
    let path = headers.get(PATH).ok_or("a forwarded request without a path")?.as_str().to_owned();
    let mut builder = Request::builder().method(method.as_str()).uri(path.as_str());
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(METHOD) || name.eq_ignore_ascii_case(PATH) {
            continue;
        }
        for value in values {
            builder = builder.header(name, value.as_str());
        }
    }
    let req = builder.body(Body::from(message.payload)).map_err(|e| format!("a forwarded request that is not HTTP: {e}"))?;
    let rest = path.split('?').next().unwrap_or("").trim_start_matches('/').to_owned();
    Ok((rest, req))
}
