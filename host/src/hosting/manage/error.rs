//! The management API's refusals, as JSON `{"error": ...}` with their status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A refusal, as JSON `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("missing or unknown bearer token, and no console session")]
    Unauthorized,
    /// A console session's changing request without its CSRF token.
    #[error("missing or wrong X-CSRF-Token: reload the console page")]
    Forbidden,
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

impl ApiError {
    /// The refusal of a request whose body was not read (all of it): the connection closes
    /// after the answer, and the answer says so, so that a client does not send its next
    /// request on a connection the server is closing.
    pub(super) fn unread(self) -> Response {
        let mut response = self.into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
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

/// `value` as a JSON answer with `status`.
pub(super) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}
