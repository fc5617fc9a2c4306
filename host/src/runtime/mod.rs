//! The runtime: the engine and its cache ([`engine`]), one agent's life with restarts
//! ([`agent`]), an instance's store composing every capability ([`instance`]), the event
//! queue between capabilities and the agent ([`queue`]), CPU sharing ([`sched`]), the
//! pre-check of a module's shape ([`shape`]), the compile cache, and the [`host::Host`]
//! that runs many agents.

pub(crate) mod agent;
pub(crate) mod cache;
#[doc(hidden)]
pub mod bench;
pub mod engine;
pub mod host;
pub(crate) mod instance;
pub(crate) mod queue;
pub(crate) mod sched;
pub mod shape;
pub mod worker;
