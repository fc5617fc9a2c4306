//! Outgoing requests: each runs as a task that posts an `http-response` event. Who may be
//! reached, how often and with how large a body is the agent's [`Policy`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bindings::events::Event;
use crate::bindings::http::{Request, Response, TransportError, TransportFailure};
use crate::kit::Handles;
use crate::kit::budget::{Budget, Share};
use crate::kit::events::Events;
use crate::hosting::config::Limits;
use crate::kit::log::{Level, Quiet};
use crate::kit::metrics::Count;
use crate::kit::tasks::TaskGuard;
use crate::policy::allowed_hosts::{AllowedHosts, DENIED_ADDRESS, PublicResolver, Reach};
use crate::policy::rate::TokenBucket;
use crate::policy::tls::TlsTrust;

/// The event a finished request posts.
pub(crate) struct Finished(pub u64, pub Result<Response, TransportFailure>);

/// A failure of `kind`, with what happened in words.
fn failure(kind: TransportError, message: impl Into<String>) -> TransportFailure {
    TransportFailure { kind, message: message.into() }
}

/// The host's HTTP clients, shared by every agent.
#[derive(Clone)]
pub(crate) struct Clients {
    any: reqwest::Client,
    /// For agents limited to allowed hosts: reaches public addresses only.
    public: reqwest::Client,
}

impl Clients {
    /// Clients trusting `tls`'s roots. Neither follows redirects: a 3xx goes back to the
    /// agent with its `location`, and a request for that is checked as any other is. A
    /// client that followed them would reach whatever the first server names, past the
    /// agent's allowed hosts and the public-address rule (hyper does not resolve an IP
    /// literal, so the resolver would not see it either).
    pub fn new(tls: &TlsTrust) -> reqwest::Result<Clients> {
        let client = || {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.base())
                .user_agent(concat!("tether/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
        };
        Ok(Clients {
            any: client().build()?,
            public: client()
                .dns_resolver(Arc::new(PublicResolver))
                // A proxy would resolve the name itself, out of the resolver's reach.
                .no_proxy()
                .build()?,
        })
    }
}

/// What one agent may do with outgoing HTTP; shared by its instances, so a restart does
/// not refill its credits or forget the requests still in flight.
pub(crate) struct Policy {
    allowed_hosts: AllowedHosts,
    clients: Clients,
    /// Outgoing request credits, when the agent has a rate.
    credits: Option<Mutex<TokenBucket>>,
    /// Largest request or response body, bytes.
    body_bytes: usize,
    /// Timeout of a request that names none.
    timeout: Duration,
    /// Longest timeout a request may name; a longer one is cut to it.
    max_timeout: Duration,
    /// Requests in flight and the bytes of their bodies, held by the host outside the
    /// agent's memory until each request ends.
    requests: Budget,
    bytes: Budget,
    max_requests: usize,
    max_bytes: usize,
    full: Quiet,
}

/// One request's shares of the in-flight budgets, given back when it ends or is abandoned.
type Reservation = (Share, Share);

impl Policy {
    pub fn new(allowed_hosts: AllowedHosts, clients: Clients, limits: &Limits) -> Policy {
        Policy {
            allowed_hosts,
            clients,
            credits: limits.http_rate.map(|r| Mutex::new(TokenBucket::new(r))),
            body_bytes: limits.http_body_bytes,
            timeout: Duration::from_secs(limits.http_timeout_secs.into()),
            max_timeout: Duration::from_secs(limits.http_max_timeout_secs.into()),
            requests: Budget::default(),
            bytes: Budget::default(),
            max_requests: limits.http_in_flight,
            max_bytes: limits.http_in_flight_bytes,
            full: Quiet::default(),
        }
    }

    /// Takes a request of `bytes` of body into the in-flight budget, or says which limit
    /// it is past.
    fn reserve(&self, bytes: usize) -> Result<Reservation, String> {
        let Some(request) = self.requests.take(1, self.max_requests) else {
            return Err(format!("{} requests in flight, the most limits.http_in_flight allows", self.requests.used()));
        };
        let Some(body) = self.bytes.take(bytes, self.max_bytes) else {
            return Err(format!("{} body bytes in flight and {bytes} more, over limits.http_in_flight_bytes = {}", self.bytes.used(), self.max_bytes));
        };
        Ok((request, body))
    }
}

/// An instance's requests in flight; dropping it abandons them.
pub(crate) struct Outbound {
    policy: Arc<Policy>,
    handles: Handles,
    events: Events<Finished>,
    next_id: u64,
    in_flight: HashMap<u64, TaskGuard>,
}

impl Outbound {
    pub fn new(policy: Arc<Policy>, handles: Handles, events: Events<Finished>) -> Outbound {
        Outbound { policy, handles, events, next_id: 0, in_flight: HashMap::new() }
    }

    /// The response of `id` is being delivered.
    pub fn prepare(&mut self, Finished(id, result): Finished) -> Option<Event> {
        self.in_flight.remove(&id);
        Some(Event::HttpResponse((id, result)))
    }

    /// Starts a request; its outcome arrives as an `http-response` event.
    pub fn send(&mut self, req: Request) -> Result<u64, TransportFailure> {
        let malformed = || failure(TransportError::MalformedUrl, format!("{:?} is not a URL the host can request", req.url));
        let url = url::Url::parse(&req.url).map_err(|_| malformed())?;
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(malformed());
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(malformed());
        }
        let (policy, log, metrics) = (&self.policy, &self.handles.log, &self.handles.metrics);
        let Some(reach) = policy.allowed_hosts.check(url.scheme(), host, port) else {
            metrics.add(Count::HttpRefused);
            let why = format!("{}://{host}:{port} is not an allowed destination", url.scheme());
            log.write(Level::Error, &format!("http: {why}"));
            return Err(failure(TransportError::NotAllowed, why));
        };
        if let Some(credits) = &policy.credits {
            // No log line: a flooding agent would flood its log too.
            if !credits.lock().map(|mut c| c.take()).unwrap_or(true) {
                metrics.add(Count::HttpRefused);
                return Err(failure(TransportError::RateLimited, "over the agent's outgoing request rate (limits.http_rate)"));
            }
        }
        if req.body.len() > policy.body_bytes {
            let why = format!("its body of {} bytes is over limits.http_body_bytes = {}", req.body.len(), policy.body_bytes);
            log.limit_refused(&policy.full, || format!("http: request to {} refused: {why}", req.url));
            return Err(failure(TransportError::TooLarge, why));
        }
        let reservation = policy.reserve(req.body.len()).map_err(|why| {
            log.limit_refused(&policy.full, || format!("http: request to {} refused: {why}", req.url));
            failure(TransportError::TooManyInFlight, why.to_string())
        })?;
        metrics.add(Count::HttpRequest);
        let invalid = |what: &str| {
            log.write(Level::Error, &format!("http: {what} in request to {}", req.url));
            failure(TransportError::Other, what)
        };
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|_| invalid("invalid method"))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("invalid header name"))?;
            let value = reqwest::header::HeaderValue::from_str(value).map_err(|_| invalid("invalid header value"))?;
            headers.append(name, value);
        }
        let timeout = req.timeout_ms.map_or(policy.timeout, |ms| Duration::from_millis(ms.into())).min(policy.max_timeout);
        let client = match reach {
            Reach::Any => &policy.clients.any,
            Reach::PublicOnly => &policy.clients.public,
        };
        let request = client.request(method, url.clone()).headers(headers).body(req.body).timeout(timeout);
        let (log, target) = (log.clone(), req.url.clone());
        let body_limit = policy.body_bytes;
        let address = format!("{host}:{port}");

        self.next_id += 1;
        let id = self.next_id;
        let events = self.events.clone();
        let task = TaskGuard::spawn(&self.handles.io, async move {
            let _reservation = reservation;
            let timed_out = || failure(TransportError::Timeout, format!("no response within {:.1} s", timeout.as_secs_f64()));
            let result = match tokio::time::timeout(timeout, perform(request, body_limit, &address)).await {
                Ok(Err(f)) if f.kind == TransportError::Timeout => Err(timed_out()),
                Ok(result) => result,
                Err(_) => Err(timed_out()),
            };
            match &result {
                Err(TransportFailure { kind: TransportError::NotAllowed, .. }) => log.write(Level::Error, &format!("http: {target} {DENIED_ADDRESS}; not allowed")),
                // The host's operator can fix this one (and the agent may only log a code):
                // said once per failed handshake, which costs the agent a request.
                Err(TransportFailure { kind: TransportError::Tls, message }) => {
                    log.write(Level::Error, &format!("http: {target}: {message}; add its CA to the host's trusted_ca_files"))
                }
                _ => {}
            }
            events.post(Finished(id, result));
        });
        self.in_flight.insert(id, task);
        Ok(id)
    }
}

async fn perform(request: reqwest::RequestBuilder, body_limit: usize, address: &str) -> Result<Response, TransportFailure> {
    let mut response = request.send().await.map_err(|e| classify(&e, address))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(&e, address))? {
        if body.len() + chunk.len() > body_limit {
            return Err(failure(TransportError::TooLarge, format!("the response body is over limits.http_body_bytes = {body_limit}")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Response { status, headers, body })
}

/// The kind of a reqwest failure, and what happened in words. reqwest wraps the cause in
/// io errors that hide it from `source()`; its debug text still names it.
fn classify(e: &reqwest::Error, address: &str) -> TransportFailure {
    let detail = format!("{e:?}");
    // The innermost cause reqwest shows, e.g. "Connection refused (os error 111)".
    let mut cause = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if detail.contains(DENIED_ADDRESS) {
        failure(TransportError::NotAllowed, format!("{address} resolves to an address this agent may not reach"))
    } else if e.is_timeout() {
        failure(TransportError::Timeout, "no response in time")
    } else if detail.contains("dns error") || detail.contains("failed to lookup address") {
        failure(TransportError::UnresolvedHost, format!("{address}: the host name did not resolve ({cause})"))
    } else if let Some(what) = certificate_problem(&detail) {
        let why = match what {
            "UnknownIssuer" => "issued by a CA the host does not trust",
            "BadSignature" => "its signature does not verify with the trusted CA of that name",
            "Expired" => "expired",
            "NotValidYet" => "not valid yet",
            "NotValidForName" | "NotValidForNameContext" => "issued for another name",
            "Revoked" => "revoked",
            other => other,
        };
        failure(TransportError::Tls, format!("the certificate of {address} is not trusted: {why} ({what})"))
    } else if detail.contains("tls") || detail.contains("Tls") {
        failure(TransportError::Tls, format!("TLS with {address} failed ({cause})"))
    } else if e.is_connect() {
        failure(TransportError::ConnectFailed, format!("cannot connect to {address} ({cause})"))
    } else if e.is_builder() {
        failure(TransportError::MalformedUrl, cause)
    } else {
        failure(TransportError::Other, format!("{address}: {cause}"))
    }
}

/// rustls' reason for refusing a server certificate, from reqwest's debug text
/// (`InvalidCertificate(UnknownIssuer)`), if that is what failed.
fn certificate_problem(detail: &str) -> Option<&str> {
    let start = detail.find("InvalidCertificate(")? + "InvalidCertificate(".len();
    let rest = &detail[start..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|what| !what.is_empty())
}
