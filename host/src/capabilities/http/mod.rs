//! The `http` capability: outgoing requests ([`outbound`], reqwest) and the agent's own URL
//! ([`inbound`], axum), with the limits and allowed destinations of each agent.

pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod server;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::http::{self as wit, Headers, Request, RespondError, TransportFailure};

/// The capability's state in an instance.
pub(crate) struct Http {
    pub outbound: outbound::Outbound,
    pub inbound: inbound::Inbound,
}

impl wit::Host for Http {
    fn send(&mut self, req: Request) -> Result<u64, TransportFailure> {
        self.outbound.send(req)
    }

    fn respond(&mut self, id: u64, status: u16, headers: Headers, body: Vec<u8>) -> Result<(), RespondError> {
        self.inbound.respond(id, status, headers, body)
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Http) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Http>>(linker, get)
}
