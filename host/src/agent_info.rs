//! The `agent-info` capability.

use crate::agent::AgentCtx;

impl crate::bindings::agent_info::Host for AgentCtx {
    fn id(&mut self) -> String {
        self.agent.id.clone()
    }

    fn url(&mut self) -> String {
        self.agent.url.clone()
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.agent.config.get(&key).cloned()
    }
}

impl crate::bindings::types::Host for AgentCtx {}
impl crate::bindings::events::Host for AgentCtx {}
