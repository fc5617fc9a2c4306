//! Outgoing requests: each runs as a task that posts an `http-response` event.

use std::collections::HashMap;
use std::time::Duration;

use crate::agent::AgentCtx;
use crate::bindings::http::{Request, Response, TransportError};
use crate::events::{HostEvent, TaskGuard};
use crate::log::Level;

/// An instance's requests in flight; dropping it abandons them.
#[derive(Default)]
pub(crate) struct Outbound {
    next_id: u64,
    in_flight: HashMap<u64, TaskGuard>,
}

impl Outbound {
    /// The response of `id` is being delivered.
    pub fn finished(&mut self, id: u64) {
        self.in_flight.remove(&id);
    }
}

pub(super) fn send(ctx: &mut AgentCtx, req: Request) -> Result<u64, TransportError> {
    let url = url::Url::parse(&req.url).map_err(|_| TransportError::MalformedUrl)?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(TransportError::MalformedUrl);
    }
    let invalid = |what: &str| {
        ctx.agent.log.write(Level::Error, &format!("http: {what} in request to {}", req.url));
        TransportError::Other
    };
    let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|_| invalid("invalid method"))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &req.headers {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("invalid header name"))?;
        let value = reqwest::header::HeaderValue::from_str(value).map_err(|_| invalid("invalid header value"))?;
        headers.append(name, value);
    }
    let limits = &ctx.agent.host.config.limits;
    let timeout = req.timeout_ms.map(|ms| Duration::from_millis(ms.into())).unwrap_or(Duration::from_secs(limits.http_timeout_secs.into()));
    let request = ctx.agent.host.http_client.request(method, url).headers(headers).body(req.body).timeout(timeout);
    let body_limit = limits.http_body_bytes;

    let out = &mut ctx.http_out;
    out.next_id += 1;
    let id = out.next_id;
    let events = ctx.events.clone();
    let task = TaskGuard::spawn(async move {
        let result = tokio::time::timeout(timeout, perform(request, body_limit)).await.unwrap_or(Err(TransportError::Timeout));
        events.post(HostEvent::HttpResponse(id, result));
    });
    out.in_flight.insert(id, task);
    Ok(id)
}

async fn perform(request: reqwest::RequestBuilder, body_limit: usize) -> Result<Response, TransportError> {
    let mut response = request.send().await.map_err(|e| classify(&e))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(&e))? {
        if body.len() + chunk.len() > body_limit {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Response { status, headers, body })
}

/// reqwest wraps the cause in io errors that hide it from `source()`; its debug text
/// still names it.
fn classify(e: &reqwest::Error) -> TransportError {
    let detail = format!("{e:?}");
    if e.is_timeout() {
        TransportError::Timeout
    } else if detail.contains("dns error") || detail.contains("failed to lookup address") {
        TransportError::UnresolvedHost
    } else if detail.contains("InvalidCertificate") || detail.contains("tls") || detail.contains("Tls") {
        TransportError::Tls
    } else if e.is_connect() {
        TransportError::ConnectFailed
    } else if e.is_builder() {
        TransportError::MalformedUrl
    } else {
        TransportError::Other
    }
}
