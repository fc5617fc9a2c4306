//! What the web pages share: the console's and the hub page's files, embedded in the
//! binary so that they work offline and load nothing from another origin; the headers
//! every answer carries, among them a Content-Security-Policy that allows no inline
//! script; and browser logins ([`session`]).
//!
//! The plots are drawn by uPlot (MIT), vendored as released on npm: see
//! `files/vendor/uPlot-1.6.32/`.

pub(crate) mod session;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The console's files: name under `/console/`, content type, bytes.
const FILES: [(&str, &str, &str); 10] = [
    ("console.css", "text/css; charset=utf-8", include_str!("files/console.css")),
    ("common.js", "text/javascript; charset=utf-8", include_str!("files/common.js")),
    ("login.js", "text/javascript; charset=utf-8", include_str!("files/login.js")),
    ("overview.js", "text/javascript; charset=utf-8", include_str!("files/overview.js")),
    ("agent.js", "text/javascript; charset=utf-8", include_str!("files/agent.js")),
    ("hub.js", "text/javascript; charset=utf-8", include_str!("files/hub.js")),
    ("uPlot.min.js", "text/javascript; charset=utf-8", include_str!("files/vendor/uPlot-1.6.32/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_str!("files/vendor/uPlot-1.6.32/uPlot.min.css")),
    ("uPlot.LICENSE", "text/plain; charset=utf-8", include_str!("files/vendor/uPlot-1.6.32/LICENSE")),
    ("favicon.svg", "image/svg+xml", include_str!("files/favicon.svg")),
];

/// The pages: the console's login form, overview of the tenant's agents and page of one
/// agent; the hub page and its login form.
pub(crate) const LOGIN: &str = include_str!("files/login.html");
pub(crate) const OVERVIEW: &str = include_str!("files/index.html");
pub(crate) const AGENT: &str = include_str!("files/agent.html");
pub(crate) const HUB_LOGIN: &str = include_str!("files/hub-login.html");
pub(crate) const HUB: &str = include_str!("files/hub.html");

/// A page as an HTML answer.
pub(crate) fn page(html: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// `GET /console/{file}`.
pub(crate) async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => ([(header::CONTENT_TYPE, *kind), (header::CACHE_CONTROL, "no-cache")], *body).into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

/// Headers on every answer: scripts and styles only from this origin and never inline,
/// no framing (clickjacking), no sniffing of content types, and no `Referer`, which would
/// carry a login link's code to wherever a page links.
pub(crate) async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
