//! The `device` capability. The serial device channel is not built yet: an agent has no
//! device bound, so it is never connected and sending fails at once with `not-connected`,
//! exactly what imp does for an offline device.

use crate::agent::AgentCtx;
use crate::bindings::device::SendError;

impl crate::bindings::device::Host for AgentCtx {
    fn send(&mut self, _name: String, _payload: Vec<u8>, _ack: bool) -> Result<u64, SendError> {
        Err(SendError::NotConnected)
    }

    fn is_connected(&mut self) -> bool {
        false
    }
}
