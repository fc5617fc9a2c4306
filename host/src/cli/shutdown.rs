//! Stopping a command cleanly on a signal.

use anyhow::Context;

/// Ctrl-C, or SIGTERM from a service manager, watched from the moment it is made: a
/// signal sent as soon as a command says it is ready still stops it cleanly, rather than
/// killing it before the command waits for it.
pub struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Starts watching for Ctrl-C and SIGTERM.
    pub fn watch() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        })
    }

    /// Returns at the first of them.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

