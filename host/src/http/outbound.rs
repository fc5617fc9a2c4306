//! Outgoing requests: each runs as a task that posts an `http-response` event.

use std::collections::HashMap;
use std::time::Duration;

use crate::agent::AgentCtx;
use crate::allowed_hosts::{DENIED_ADDRESS, Reach};
use crate::bindings::http::{Request, Response, TransportError};
use crate::events::{HostEvent, TaskGuard};
use crate::log::Level;
use crate::metrics::Count;

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
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(TransportError::MalformedUrl);
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TransportError::MalformedUrl);
    }
    let agent = &ctx.agent;
    let Some(reach) = agent.allowed_hosts.check(url.scheme(), host, port) else {
        agent.metrics.add(Count::HttpRefused);
        agent.log.write(Level::Error, &format!("http: {}://{host}:{port} is not an allowed destination", url.scheme()));
        return Err(TransportError::NotAllowed);
    };
    if let Some(credits) = &agent.http_credits {
        // No log line: a flooding agent would flood its log too.
        if !credits.lock().map(|mut c| c.take()).unwrap_or(true) {
            agent.metrics.add(Count::HttpRefused);
            return Err(TransportError::RateLimited);
        }
    }
    agent.metrics.add(Count::HttpRequest);
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
    let limits = &ctx.agent.limits;
    let timeout = req.timeout_ms.map(|ms| Duration::from_millis(ms.into())).unwrap_or(Duration::from_secs(limits.http_timeout_secs.into()));
    let client = match reach {
        Reach::Any => &ctx.agent.host.http_client,
        Reach::PublicOnly => &ctx.agent.host.http_client_public,
    };
    let request = client.request(method, url).headers(headers).body(req.body).timeout(timeout);
    let (log, target) = (ctx.agent.log.clone(), req.url.clone());
    let body_limit = limits.http_body_bytes;

    let out = &mut ctx.http_out;
    out.next_id += 1;
    let id = out.next_id;
    let events = ctx.events.clone();
    let task = TaskGuard::spawn(&ctx.agent.host.io, async move {
        let result = tokio::time::timeout(timeout, perform(request, body_limit)).await.unwrap_or(Err(TransportError::Timeout));
        if let Err(TransportError::NotAllowed) = result {
            log.write(Level::Error, &format!("http: {target} {DENIED_ADDRESS}; not allowed"));
        }
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
    if detail.contains(DENIED_ADDRESS) {
        TransportError::NotAllowed
    } else if e.is_timeout() {
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
