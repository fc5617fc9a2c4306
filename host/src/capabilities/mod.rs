//! The host side of each WIT interface in `wit/`, one folder per capability.
//!
//! Each capability, as wasmtime-wasi's and Spin's factors do, owns:
//! - its per-instance state (a struct that implements the interface's generated `Host`
//!   trait, and nothing else does);
//! - what it may do for one agent (a `Policy`: limits, allowed destinations), built by the
//!   runtime from the agent's configuration;
//! - its `add_to_linker`, which takes a projection from the store's data to its state, so
//!   that it never sees the rest of the agent;
//! - the event type it posts to the agent's queue and the `prepare` that turns it into the
//!   WIT event at delivery.
//!
//! A capability reaches the host only through the handles of [`crate::kit`] and the rules
//! of [`crate::policy`]; no capability imports another. [`crate::runtime`] composes them.

pub(crate) mod agent_info;
pub(crate) mod device;
pub(crate) mod http;
pub(crate) mod log;
pub(crate) mod mqtt;
pub(crate) mod queue;
pub(crate) mod store;
pub(crate) mod timers;
