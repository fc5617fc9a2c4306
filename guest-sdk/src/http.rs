//! Outgoing HTTP requests and the agent's own URL (imp: `http.*`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use crate::bindings::tether::agent::{agent_info, http as host};
use crate::server;

pub use host::TransportError;

/// What runs when a response arrives.
type OnResponse = Box<dyn FnOnce(Response)>;
/// The agent's handler of incoming requests.
type OnRequest = Rc<dyn Fn(IncomingRequest, HttpResponse)>;

thread_local! {
    static PENDING: RefCell<HashMap<u64, OnResponse>> = RefCell::default();
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
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn failed(error: TransportError) -> Response {
        Response { statuscode: curl_code(error), headers: BTreeMap::new(), body: Vec::new(), error: Some(error) }
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

pub(crate) fn response_arrived(id: u64, result: Result<host::Response, TransportError>) {
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
            Response { statuscode: r.status, headers, body: r.body, error: None }
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
