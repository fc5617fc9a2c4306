//! Direct access to one agent instance, for the benchmarks: events are delivered
//! straight to the guest, bypassing the queue, so that their cost can be measured alone.

use wasmtime::Store;

use super::engine::AgentModule;
use super::host::Host;
use super::instance::{AgentState, arm, new_store};
use crate::bindings::Agent;
use crate::bindings::events::Event;
use crate::bindings::http::IncomingRequest;
use crate::hosting::config::AgentSettings;

/// An instantiated agent outside any event loop.
pub struct BenchInstance {
    store: Store<AgentState>,
    agent: Agent,
}

impl Host {
    /// Instantiates `module` (from its `InstancePre`, with the pooling allocator) without
    /// running `start`.
    pub async fn bench_instantiate(&self, id: &str, module: &AgentModule) -> anyhow::Result<BenchInstance> {
        let (shared, _rx) = self.new_agent(id, AgentSettings::default());
        let mut store = new_store(&shared.engine, &shared.parts, 1, None);
        let agent = module.pre.instantiate_async(&mut store).await?;
        Ok(BenchInstance { store, agent })
    }
}

impl BenchInstance {
    /// Runs the agent's `start`.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        arm(&mut self.store);
        Ok(self.agent.call_start(&mut self.store).await?)
    }

    /// Delivers a `timer` event for `id`.
    pub async fn timer(&mut self, id: u64) -> anyhow::Result<()> {
        self.deliver(Event::Timer(id)).await
    }

    /// Delivers an `http-request` event for `path` (its answer goes nowhere).
    pub async fn request(&mut self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<()> {
        let query = query.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let request = IncomingRequest { id: 0, method: "GET".into(), path: path.into(), query, headers: Vec::new(), body: Vec::new() };
        self.deliver(Event::HttpRequest(request)).await
    }

    async fn deliver(&mut self, event: Event) -> anyhow::Result<()> {
        arm(&mut self.store);
        Ok(self.agent.call_on_event(&mut self.store, &event).await?)
    }
}
