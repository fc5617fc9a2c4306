//! Host bindings generated from `wit/`. Kept alone in this module because editing the
//! file that holds `bindgen!` costs a slow rebuild.

wasmtime::component::bindgen!({
    path: "../guest-sdk/wit",
    world: "agent",
    // Host functions never block: they start work on tokio and report through events.
    // Exports are async so that a busy agent yields its thread at every epoch tick.
    exports: { default: async },
});

pub use tether::agent::*;
