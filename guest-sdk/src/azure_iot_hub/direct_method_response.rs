//! `AzureIoTHub.DirectMethodResponse`.

use serde_json::Value;

/// The answer to a direct method call: an application status and an optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectMethodResponse {
    /// Application-specific status, sent as the response topic's status.
    pub status: i32,
    /// The returned data; `None` sends JSON `null`.
    pub body: Option<Value>,
}

impl DirectMethodResponse {
    /// A response with `status` and `body`.
    pub fn new(status: i32, body: Option<Value>) -> DirectMethodResponse {
        DirectMethodResponse { status, body }
    }
}
