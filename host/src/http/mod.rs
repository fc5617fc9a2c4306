//! The `http` capability: outgoing requests (reqwest) and the agents' own URLs (axum).

pub(crate) mod inbound;
pub(crate) mod outbound;

use crate::agent::AgentCtx;
use crate::bindings::http::{Headers, Request, RespondError, TransportError};

impl crate::bindings::http::Host for AgentCtx {
    fn send(&mut self, req: Request) -> Result<u64, TransportError> {
        outbound::send(self, req)
    }

    fn respond(&mut self, id: u64, status: u16, headers: Headers, body: Vec<u8>) -> Result<(), RespondError> {
        self.http_in.respond(id, status, headers, body)
    }
}
