//! Direct method calls: sending the request to the device's session and matching its
//! answer to the waiting caller. An `impl Shared` block above the state core.

use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::state::Shared;
use crate::state::session::{PendingMethod, SessionCmd};

/// "The payload for method requests and responses is a JSON document up to 128 KB"
/// (IoT Hub direct methods doc; quotas: "Direct method payload size: 128 KB").
pub(crate) const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

// Defined beside the pending method that carries it, so that the session does not
// import this module back.
pub(crate) use crate::state::session::MethodError;

impl Shared {
    /// Invokes a direct method and waits for the device's answer.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        name: &str,
        payload: &Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(i64, Value), MethodError> {
        let connect_deadline = tokio::time::Instant::now() + connect_timeout;
        let (rid, rx) = loop {
            {
                let mut st = self.lock();
                if !st.p.devices.contains_key(device_id) {
                    return Err(MethodError::DeviceNotFound);
                }
                if let Some(tx) = st
                    .sessions
                    .get(device_id)
                    .filter(|s| s.subs.methods)
                    .map(|s| s.tx.clone())
                {
                    st.next_rid += 1;
                    let rid = st.next_rid.to_string();
                    let (reply, rx) = oneshot::channel();
                    st.pending_methods.insert(
                        rid.clone(),
                        PendingMethod {
                            device_id: device_id.into(),
                            reply,
                        },
                    );
                    let topic = format!("$iothub/methods/POST/{name}/?$rid={rid}");
                    let _ = tx.send(SessionCmd::Publish(Publish::new(
                        topic,
                        QoS::AtMostOnce,
                        payload.to_string(),
                    )));
                    break (rid, rx);
                }
            }
            if tokio::time::Instant::now() >= connect_deadline {
                return Err(MethodError::NotOnline(connect_timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                self.lock().pending_methods.remove(&rid);
                Err(MethodError::Timeout(response_timeout))
            }
        }
    }

    /// A device's `$iothub/methods/res/{status}/?$rid=` answer with its raw payload:
    /// JSON, else kept as a string; empty (or blank) means `null`.
    pub fn method_response(&self, device_id: &str, rid: &str, status: i64, payload: &[u8]) {
        let answer = if payload.len() > MAX_PAYLOAD_BYTES {
            Err(MethodError::ResponseTooLarge(payload.len()))
        } else if payload.iter().all(u8::is_ascii_whitespace) {
            Ok((status, Value::Null))
        } else {
            let value = serde_json::from_slice(payload).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(payload).into_owned())
            });
            Ok((status, value))
        };
        let mut st = self.lock();
        // Only the device the request went to may answer it.
        if st
            .pending_methods
            .get(rid)
            .is_some_and(|p| p.device_id == device_id)
            && let Some(p) = st.pending_methods.remove(rid)
        {
            let _ = p.reply.send(answer);
        }
    }
}
