//! Outgoing HTTP requests and the agent's own URL (imp: `http.*`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::bindings::tether::agent::{agent_info, http as host};
use crate::server;

pub use host::TransportError;

/// What runs when a response arrives.
type OnResponse = Box<dyn FnOnce(Response)>;
/// The agent's handler of incoming requests.
type OnRequest = Rc<dyn Fn(IncomingRequest, HttpResponse)>;

thread_local! {
    static PENDING: RefCell<BTreeMap<u64, OnResponse>> = RefCell::default();
    static ON_REQUEST: RefCell<Option<OnRequest>> = const { RefCell::new(None) };
}

/// An outgoing request, built by [`get`], [`post`], [`put`], [`delete`] or [`request`],
/// sent with [`Request::send_async`].
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: Option<u32>,
}

/// A response, or a transport failure reported as imp does: `statuscode` 0-99 is a
/// libcurl error number and `error` says which.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status, or a curl error number (3, 6, 7, 28, 35, 56, 63) on failure.
    pub statuscode: u16,
    /// Lower-case header names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// Why there is no HTTP response, when there is none.
    pub error: Option<TransportError>,
    /// What happened then, in words (beyond imp), e.g. "the certificate of
    /// localhost:24443 is not trusted (UnknownIssuer)".
    pub error_message: Option<String>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn failed(failure: host::TransportFailure) -> Response {
        Response { statuscode: curl_code(failure.kind), headers: BTreeMap::new(), body: Vec::new(), error: Some(failure.kind), error_message: Some(failure.message) }
    }
}

/// imp's status code for a transport error: libcurl's error number. Refusals by the
/// host's policy, which imp reports otherwise, take 1 (destination not allowed) and 2
/// (over the request rate, or too many requests in flight).
pub fn curl_code(error: TransportError) -> u16 {
    match error {
        TransportError::MalformedUrl => 3,
        TransportError::UnresolvedHost => 6,
        TransportError::ConnectFailed => 7,
        TransportError::Timeout => 28,
        TransportError::Tls => 35,
        TransportError::TooLarge => 63,
        TransportError::NotAllowed => 1,
        TransportError::RateLimited | TransportError::TooManyInFlight => 2,
        TransportError::Other => 56,
    }
}

/// Why an awaited request got no response (beyond imp, whose callback gets a status
/// 0-99 instead). A response with any HTTP status, 4xx and 5xx included, is not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method} {url}: {message}; {}", advice(*kind))]
pub struct HttpError {
    pub method: String,
    pub url: String,
    /// What went wrong, as the host classified it.
    pub kind: TransportError,
    /// What happened, in the host's words.
    pub message: String,
}

impl HttpError {
    /// imp's status code for it: libcurl's error number (see [`curl_code`]).
    pub fn code(&self) -> u16 {
        curl_code(self.kind)
    }
}

/// The WIT name of a transport error, e.g. `too-many-in-flight`: short, for logs and tallies.
pub fn error_name(kind: TransportError) -> &'static str {
    match kind {
        TransportError::MalformedUrl => "malformed-url",
        TransportError::UnresolvedHost => "unresolved-host",
        TransportError::ConnectFailed => "connect-failed",
        TransportError::Timeout => "timeout",
        TransportError::Tls => "tls",
        TransportError::TooLarge => "too-large",
        TransportError::NotAllowed => "not-allowed",
        TransportError::RateLimited => "rate-limited",
        TransportError::TooManyInFlight => "too-many-in-flight",
        TransportError::Other => "other",
    }
}

/// The transport error behind imp status `code`, if it is one [`curl_code`] gives.
pub(crate) fn transport_error_of(code: u16) -> Option<TransportError> {
    use TransportError::*;
    [MalformedUrl, UnresolvedHost, ConnectFailed, Timeout, Tls, TooLarge, NotAllowed, TooManyInFlight, Other].into_iter().find(|k| curl_code(*k) == code)
}

/// What a person can do about each kind of failure.
pub(crate) fn advice(kind: TransportError) -> &'static str {
    match kind {
        TransportError::MalformedUrl => "use an absolute http:// or https:// URL",
        TransportError::UnresolvedHost => "check the host name, and the host's DNS",
        TransportError::ConnectFailed => "is the server up, and the port right?",
        TransportError::Timeout => "check the server, or allow longer with .timeout(seconds)",
        TransportError::Tls => "for a server whose certificate comes from a private CA, add that CA to the host's trusted_ca_files",
        TransportError::TooLarge => "the host's limit is limits.http_body_bytes",
        TransportError::NotAllowed => "the host's allowed_hosts decide where this agent may go",
        TransportError::RateLimited => "wait, then retry (limits.http_rate)",
        TransportError::TooManyInFlight => "wait for one to finish (limits.http_in_flight, limits.http_in_flight_bytes)",
        TransportError::Other => "retry; if it persists, check the server",
    }
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
}

/// A request with any method (imp: `http.request`).
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Request {
    Request { method: method.to_owned(), url: url.to_owned(), headers: owned(headers), body: body.into(), timeout_ms: None }
}

/// A GET request.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Request {
    request("GET", url, headers, Vec::new())
}

/// A POST request.
pub fn post(url: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Request {
    request("POST", url, headers, body)
}

/// A PUT request.
pub fn put(url: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Request {
    request("PUT", url, headers, body)
}

/// A DELETE request (imp: `http.httpdelete`).
pub fn delete(url: &str, headers: &[(&str, &str)]) -> Request {
    request("DELETE", url, headers, Vec::new())
}

impl Request {
    /// Gives up after `seconds` (the host's default otherwise).
    pub fn timeout(mut self, seconds: f64) -> Request {
        self.timeout_ms = Some((seconds.max(0.0) * 1000.0).min(u32::MAX as f64) as u32);
        self
    }

    /// Sends the request; `done` gets the response or the transport error, always
    /// during a later event, never inside this call.
    ///
    /// ```no_run
    /// use tether_guest::{http, server};
    /// http::get("https://example.com/", &[]).send_async(|r| server::log(format!("{}", r.statuscode)));
    /// ```
    pub fn send_async(self, done: impl FnOnce(Response) + 'static) {
        self.start(done)
    }

    /// Sends the request and waits for its response (beyond imp: the async form of
    /// [`Request::send_async`]).
    ///
    /// ```no_run
    /// use tether_guest::{http, server};
    /// # async fn f() -> Result<(), http::HttpError> {
    /// let r = http::get("https://example.com/", &[]).timeout(5.0).send().await?;
    /// server::log(format!("{}: {}", r.statuscode, r.body_text()));
    /// # Ok(()) }
    /// ```
    pub async fn send(self) -> Result<Response, HttpError> {
        let (method, url) = (self.method.clone(), self.url.clone());
        let (tx, rx) = crate::task::oneshot();
        self.start(move |r| {
            tx.send(r);
        });
        // The callback is only dropped unsent when the agent is ending.
        let ending = host::TransportFailure { kind: TransportError::Other, message: "the agent is ending".into() };
        let response = rx.await.unwrap_or_else(|| Response::failed(ending));
        match response.error {
            Some(kind) => Err(HttpError { method, url, kind, message: response.error_message.unwrap_or_default() }),
            None => Ok(response),
        }
    }

    fn start(self, done: impl FnOnce(Response) + 'static) {
        let req = host::Request { method: self.method, url: self.url, headers: self.headers, body: self.body, timeout_ms: self.timeout_ms };
        match host::send(&req) {
            Ok(id) => {
                PENDING.with_borrow_mut(|p| p.insert(id, Box::new(done)));
            }
            // Refused before sending: still reported through the callback, as imp does.
            Err(e) => {
                crate::imp::wakeup(0.0, move || done(Response::failed(e)));
            }
        }
    }
}

pub(crate) fn response_arrived(id: u64, result: Result<host::Response, host::TransportFailure>) {
    let Some(done) = PENDING.with_borrow_mut(|p| p.remove(&id)) else { return };
    done(match result {
        Ok(r) => {
            let mut headers = BTreeMap::<String, String>::new();
            for (name, value) in r.headers {
                headers.entry(name.to_ascii_lowercase()).and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                }).or_insert(value);
            }
            Response { statuscode: r.status, headers, body: r.body, error: None, error_message: None }
        }
        Err(e) => Response::failed(e),
    })
}

/// A request to the agent's URL (imp's request table).
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    pub method: String,
    /// The path after the agent id, e.g. `/led`.
    pub path: String,
    /// Query parameters; the last of repeated keys wins.
    pub query: BTreeMap<String, String>,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl IncomingRequest {
    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The answer to an incoming request. Keep it to answer later; dropping it unanswered
/// answers 500, so that no client waits for a response that cannot come.
#[derive(Debug)]
pub struct HttpResponse {
    id: u64,
    headers: Vec<(String, String)>,
    sent: bool,
}

/// Why a response was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request is no longer open (the client gave up)")]
pub struct RespondError;

impl HttpResponse {
    /// Adds a response header.
    pub fn header(&mut self, name: &str, value: &str) -> &mut Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends the response (Content-Length is added by the host).
    pub fn send(mut self, status: u16, body: impl Into<Vec<u8>>) -> Result<(), RespondError> {
        self.sent = true;
        host::respond(self.id, status, &std::mem::take(&mut self.headers), &body.into()).map_err(|_| RespondError)
    }
}

impl Drop for HttpResponse {
    fn drop(&mut self) {
        if !self.sent {
            server::error(format!("http: response to request {} dropped unanswered; sent 500", self.id));
            let _ = host::respond(self.id, 500, &[], b"agent dropped the response\n");
        }
    }
}

/// Handles requests to the agent's URL (imp: `http.onrequest`).
///
/// ```no_run
/// tether_guest::http::on_request(|req, res| {
///     let _ = res.send(200, format!("you asked for {}", req.path));
/// });
/// ```
pub fn on_request(handler: impl Fn(IncomingRequest, HttpResponse) + 'static) {
    ON_REQUEST.with_borrow_mut(|h| *h = Some(Rc::new(handler)));
}

/// The answer of an async request handler (see [`serve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// `status` with `body`.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Answer {
        Answer { status, headers: Vec::new(), body: body.into() }
    }

    /// `status` with `value` as JSON and its content type.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Answer {
        match serde_json::to_vec(value) {
            Ok(body) => Answer::new(status, body).header("content-type", "application/json"),
            Err(e) => Answer::new(500, format!("cannot encode the answer as JSON: {e}\n")),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// Handles requests to the agent's URL with an async handler that returns its answer
/// (beyond imp: the async form of [`on_request`], which it replaces). Each request runs
/// as a task of its own, so a slow one does not hold the others up.
///
/// ```no_run
/// use tether_guest::http::{self, Answer};
/// http::serve(|req| async move {
///     let _ = tether_guest::imp::sleep(0.1).await;
///     Answer::new(200, format!("you asked for {}", req.path))
/// });
/// ```
pub fn serve<F, Fut>(handler: F)
where
    F: Fn(IncomingRequest) -> Fut + 'static,
    Fut: std::future::Future<Output = Answer> + 'static,
{
    on_request(move |req, mut res| {
        let answer = handler(req);
        crate::task::spawn(async move {
            let answer = answer.await;
            for (name, value) in &answer.headers {
                res.header(name, value);
            }
            // The client may have gone meanwhile: nobody is left to tell.
            let _ = res.send(answer.status, answer.body);
        });
    });
}

pub(crate) fn request_arrived(r: host::IncomingRequest) {
    let response = HttpResponse { id: r.id, headers: Vec::new(), sent: false };
    let Some(handler) = ON_REQUEST.with_borrow(|h| h.clone()) else {
        let _ = response.send(404, "this agent does not handle requests\n");
        return;
    };
    let request = IncomingRequest {
        method: r.method,
        path: r.path,
        query: r.query.into_iter().collect(),
        headers: r.headers.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect(),
        body: r.body,
    };
    handler(request, response)
}

/// The agent's public URL (imp: `http.agenturl()`).
pub fn agent_url() -> String {
    agent_info::url()
}
