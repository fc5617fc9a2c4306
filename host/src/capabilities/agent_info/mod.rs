//! The `agent-info` capability: the agent's id, URL and configuration values.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::agent_info as wit;

/// What an agent is told about itself; shared by its instances.
pub(crate) struct AgentInfo {
    pub id: String,
    pub url: String,
    pub config: BTreeMap<String, String>,
}

/// The capability's state in an instance.
pub(crate) struct Info(pub Arc<AgentInfo>);

impl wit::Host for Info {
    fn id(&mut self) -> String {
        self.0.id.clone()
    }

    fn url(&mut self) -> String {
        self.0.url.clone()
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.0.config.get(&key).cloned()
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Info) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Info>>(linker, get)
}
