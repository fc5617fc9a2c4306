//! What every REST handler module shares: the error response in IoT Hub's (or DPS's)
//! exact shape, and the request checks that answer with it. Kept apart from `http/mod.rs`,
//! which mounts the handler modules, so that they need nothing from their parent.

use std::collections::HashMap;
use std::time::SystemTime;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::util::{iso8601, new_uuid};

/// Which error body format to use: IoT Hub's JSON-in-`Message` or DPS's flat one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Hub,
    Dps,
}

/// An error response in IoT Hub's (or DPS's) exact shape (protocol notes §2.5, §3.1).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: u32,
    name: &'static str,
    message: String,
    info: Option<Value>,
    flavor: Flavor,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: u32,
        name: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code,
            name,
            message: message.into(),
            info: None,
            flavor: Flavor::Hub,
        }
    }

    pub(super) fn with_info(mut self, info: Value) -> Self {
        self.info = Some(info);
        self
    }

    pub(super) fn dps(mut self) -> Self {
        self.flavor = Flavor::Dps;
        self
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            401002,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, 400004, "ArgumentInvalid", message)
    }

    pub fn format(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            400006,
            "IotHubFormatError",
            message,
        )
    }

    pub fn device_not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            404001,
            "DeviceNotFound",
            format!("Device {id} not registered"),
        )
    }

    pub fn precondition_failed() -> Self {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            412001,
            "PreconditionFailed",
            "Precondition failed: Invalid ETag",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let now = iso8601(SystemTime::now());
        let mut inner = json!({ "errorCode": self.code, "trackingId": new_uuid().replace('-', ""), "message": self.message });
        if let Some(info) = self.info {
            inner["info"] = info;
        }
        inner["timestampUtc"] = now.into();
        let (body, header, value) = match self.flavor {
            Flavor::Hub => (
                json!({ "Message": inner.to_string(), "ExceptionMessage": "" }),
                "iothub-errorcode",
                self.name.to_string(),
            ),
            Flavor::Dps => (inner, "x-ms-error-code", self.code.to_string()),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header, v);
        }
        resp
    }
}

/// IoT Hub rejects requests without `api-version` (400001 InvalidProtocolVersion).
pub(crate) fn require_api_version(q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("api-version") {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            400001,
            "InvalidProtocolVersion",
            "Invalid or missing api-version query parameter",
        )),
    }
}

pub(crate) fn authorization(headers: &HeaderMap) -> &str {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Parses a JSON request body, mapping failures to IoT Hub's 400 format error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::format(format!("Failed to parse the request body: {e}")))
}
