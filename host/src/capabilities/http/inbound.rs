//! The agents' URLs: `http://<listen>/<agent-id>/<path>` becomes an `http-request` event;
//! the agent answers with `http.respond`, during that event or any later one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use crate::bindings::events::Event;
use crate::bindings::http::{Headers, IncomingRequest, RespondError};
use crate::kit::budget::{Budget, Share};
use crate::kit::events::Events;
use crate::kit::log::{Logger, Quiet};

/// Where the agent's answer goes.
type Reply<T> = oneshot::Sender<T>;

/// The agent's answer.
pub(crate) struct Answer {
    status: u16,
    headers: Headers,
    body: Vec<u8>,
}

/// A request waiting in an agent's queue.
pub(crate) struct Pending {
    request: IncomingRequest,
    reply: Reply<Answer>,
    /// Its share of the agent's backlog, given back when it is delivered or dropped.
    _held: Share,
}

/// What an agent's requests hold before the agent takes them: bodies read and queued,
/// against `limits.inbound_queue_bytes`. Nothing else bounds them while the agent is busy
/// or waiting to restart, and their clients need no credentials.
#[derive(Default)]
pub(crate) struct Backlog {
    bytes: Budget,
    /// Requests in progress, each holding a connection.
    requests: Budget,
    /// When the log last said that requests were refused.
    full: Quiet,
}

/// What one request counts besides its body: its head, the queue entry, the reply.
const REQUEST_OVERHEAD: usize = 1024;

impl Pending {
    /// Answers on the agent's behalf when it cannot (failed, shutting down).
    pub fn reject(self, status: u16, message: &str) {
        let _ = self.reply.send(Answer { status, headers: Vec::new(), body: message.as_bytes().to_vec() });
    }
}

/// An instance's open requests; dropping it answers them with 503 (see `serve`).
#[derive(Default)]
pub(crate) struct Inbound {
    next_id: u64,
    open: HashMap<u64, Reply<Answer>>,
}

impl Inbound {
    /// The event to deliver for a request: it gets an id the agent answers by.
    pub fn prepare(&mut self, pending: Pending) -> Option<Event> {
        // Requests whose clients gave up can never be answered: not delivered at all.
        if pending.reply.is_closed() {
            return None;
        }
        self.open.retain(|_, reply| !reply.is_closed());
        self.next_id += 1;
        let mut request = pending.request;
        request.id = self.next_id;
        self.open.insert(request.id, pending.reply);
        Some(Event::HttpRequest(request))
    }

    pub fn respond(&mut self, id: u64, status: u16, headers: Headers, body: Vec<u8>) -> Result<(), RespondError> {
        let reply = self.open.remove(&id).ok_or(RespondError::UnknownRequest)?;
        reply.send(Answer { status, headers, body }).map_err(|_| RespondError::UnknownRequest)
    }
}

/// Finds the agent a URL names.
pub(crate) trait Doors: Send + Sync + 'static {
    /// Agent `id`'s door, `None` when there is no such agent here.
    fn door(&self, id: &str) -> Option<Door>;
    /// Where requests for agents not here go, if anywhere (cluster mode).
    fn forward(&self) -> Option<Arc<dyn Forward>>;
}

/// Takes requests for agents that run on other nodes to them.
#[async_trait::async_trait]
pub(crate) trait Forward: Send + Sync {
    /// Agent `id`'s answer to `req` (whose path below the agent's is `rest`), from the node
    /// that runs it; or why there is none.
    async fn forward(&self, id: &str, rest: &str, req: Request) -> Response;
}

/// How a request reaches one agent, and the agent's limits on it.
pub(crate) struct Door {
    pub requests: Events<Pending>,
    /// Largest request body, bytes.
    pub body_bytes: usize,
    /// How long a request waits for the agent's answer.
    pub timeout: Duration,
    /// The agent's requests waiting for it, and how many bytes they may hold.
    pub backlog: Arc<Backlog>,
    pub backlog_bytes: usize,
    /// Requests (so connections) in progress at once.
    pub max_connections: usize,
    pub log: Logger,
}

impl Door {
    /// 503 for a request that does not fit the agent's backlog.
    fn busy(&self) -> Response {
        let max = self.backlog_bytes;
        self.log.limit_refused(&self.backlog.full, || format!("http: requests refused with 503: those waiting hold {max} bytes, the most limits.inbound_queue_bytes allows"));
        (StatusCode::SERVICE_UNAVAILABLE, "too many requests waiting for this agent\n").into_response()
    }

    /// 503 for a request over the agent's connections; the connection is closed with it.
    fn crowded(&self) -> Response {
        let max = self.max_connections;
        self.log.limit_refused(&self.backlog.full, || format!("http: requests refused with 503: {max} connections have one in progress, the most limits.http_connections allows"));
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, "too many connections to this agent\n").into_response();
        response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// Serves every agent's URL until the host shuts down.
pub(crate) fn router(doors: Arc<dyn Doors>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(doors)
}

async fn handle(State(doors): State<Arc<dyn Doors>>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let (agent_id, rest) = path.split_once('/').unwrap_or((&path, ""));
    let Some(door) = doors.door(agent_id) else {
        return match doors.forward() {
            Some(forward) => forward.forward(agent_id, rest, req).await,
            None => (StatusCode::NOT_FOUND, format!("no agent {agent_id:?}\n")).into_response(),
        };
    };
    serve(door, rest, req).await
}

/// Delivers `req` through `door` to its agent, within the agent's limits, and waits for
/// its answer; `rest` is the path below the agent's.
pub(crate) async fn serve(door: Door, rest: &str, req: Request) -> Response {
    let Some(_in_progress) = door.backlog.requests.take(1, door.max_connections) else {
        return door.crowded();
    };
    let query = req
        .uri()
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let method = req.method().as_str().to_owned();
    let headers: Headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    // Held before the body is read: its declared length, or the most a body may be when
    // it comes in chunks; what it turns out to be once read.
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let chunked = req.headers().contains_key(axum::http::header::TRANSFER_ENCODING);
    let body_max = match declared {
        Some(n) if n > door.body_bytes => return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response(),
        Some(n) => n,
        None if chunked => door.body_bytes,
        None => 0,
    };
    let head = REQUEST_OVERHEAD + headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>() + rest.len();
    let Some(mut held) = door.backlog.bytes.take(head + body_max, door.backlog_bytes) else {
        return door.busy();
    };
    // The body has the agent's answer time to arrive: a client trickling it in holds a
    // connection and a buffer no longer than that.
    let body = match tokio::time::timeout(door.timeout, read_body(req.into_body(), body_max)).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response(),
        Ok(Err(BodyError::Broken)) => return (StatusCode::BAD_REQUEST, "request body broken off\n").into_response(),
        Err(_) => return (StatusCode::REQUEST_TIMEOUT, "request body not received in time\n").into_response(),
    };
    held.shrink_to(head + body.len());
    let request = IncomingRequest { id: 0, method, path: format!("/{rest}"), query, headers, body };
    let (reply, answer) = oneshot::channel();
    if !door.requests.try_post(Pending { request, reply, _held: held }) {
        return (StatusCode::SERVICE_UNAVAILABLE, "agent stopped\n").into_response();
    }
    match tokio::time::timeout(door.timeout, answer).await {
        Ok(Ok(answer)) => build(answer),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "agent restarted before answering\n").into_response(),
        Err(_) => (StatusCode::GATEWAY_TIMEOUT, "agent did not answer in time\n").into_response(),
    }
}

enum BodyError {
    TooLarge,
    Broken,
}

/// Reads a body of at most `max` bytes straight into one buffer: no chunk list, no copy,
/// no doubling, so it holds what the backlog charged for it and not twice that.
async fn read_body(body: Body, max: usize) -> Result<Vec<u8>, BodyError> {
    use futures_util::StreamExt;
    let mut chunks = body.into_data_stream();
    let mut data = Vec::new();
    data.try_reserve_exact(max).map_err(|_| BodyError::TooLarge)?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| BodyError::Broken)?;
        if data.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

fn build(answer: Answer) -> Response {
    let Ok(status) = StatusCode::from_u16(answer.status) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("agent answered with invalid status {}\n", answer.status)).into_response();
    };
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = status;
    for (name, value) in answer.headers {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => return (StatusCode::INTERNAL_SERVER_ERROR, format!("agent answered with invalid header {name:?}\n")).into_response(),
        }
    }
    response
}
