//! What the parts of one agent are handed: the narrow handles through which a capability
//! reaches the rest of the host without seeing it. A capability posts its events through
//! [`events::Events`], writes host notes to the agent's [`log::Logger`], counts in
//! [`metrics::AgentMetrics`], notes its traffic in [`timeline::Timeline`] and runs its background work as [`tasks::TaskGuard`]s on the
//! host's runtime, or, for work that should go where the agent runs, on its [`lanes::AgentLane`]. Nothing here knows any capability or the runtime that composes them.

pub(crate) mod blocking;
pub(crate) mod budget;
pub(crate) mod events;
pub(crate) mod lanes;
pub mod log;
pub mod metrics;
pub(crate) mod tasks;
pub mod timeline;

use std::sync::Arc;

/// The handles every capability of one agent shares.
#[derive(Clone)]
pub(crate) struct Handles {
    /// The agent's log, for host notes about what a capability did on its behalf.
    pub log: log::Logger,
    pub metrics: Arc<metrics::AgentMetrics>,
    /// The runtime of the host's own tasks (timers, connections, requests): guest calls
    /// may run on the slow lane, whose threads must not own them.
    pub io: tokio::runtime::Handle,
    /// Where the agent runs: tasks spawned here follow it onto the slow lane and back.
    pub lane: lanes::AgentLane,
    /// Where capabilities that block on the disk count the time, so that it is not
    /// charged to the agent as CPU.
    pub blocking: blocking::Blocking,
    /// The agent's recent traffic at the serial line and the broker, while watched.
    pub timeline: Arc<timeline::Timeline>,
}
