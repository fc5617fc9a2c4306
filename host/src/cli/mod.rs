//! The `tether` commands, one file each, and the Ctrl-C/SIGTERM watch they share.

pub mod agents;
pub mod build;
pub mod compile_worker;
pub mod demo;
pub mod gateway;
pub mod hub;
pub mod new;
pub mod run;
pub mod serve;
pub mod test;
mod shutdown;

pub use shutdown::Shutdown;

/// This binary, to compile modules in child processes (`tether compile-worker`).
fn compile_worker() -> Option<std::path::PathBuf> {
    std::env::current_exe().ok()
}
