//! The `tether` commands, one file each, and the Ctrl-C/SIGTERM watch they share.

pub mod agents;
pub mod demo;
pub mod hub;
pub mod run;
pub mod serve;
mod shutdown;

pub use shutdown::Shutdown;
