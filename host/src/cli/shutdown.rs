//! Stopping a command cleanly on a signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::sync::watch;

/// Ctrl-C, or SIGTERM from a service manager, watched from the moment it is made: a
/// signal sent as soon as a command says it is ready still stops it cleanly, rather than
/// killing it before the command waits for it.
///
/// Until the command calls [`Shutdown::started`], a signal ends the process at once:
/// startup may spend a compile deadline in a child compiler (which dies with the host),
/// and nothing is running yet that needs a clean stop.
pub struct Shutdown {
    started: Arc<AtomicBool>,
    stopped: watch::Receiver<bool>,
}

impl Shutdown {
    /// Starts watching for Ctrl-C and SIGTERM.
    pub fn watch() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let started = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        let during_startup = started.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            if !during_startup.load(Ordering::Acquire) {
                eprintln!("stopped while starting");
                std::process::exit(1);
            }
            let _ = stop.send(true);
        });
        Ok(Shutdown { started, stopped })
    }

    /// Startup is over: from now on a signal stops the command cleanly, through `wait`.
    pub fn started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Returns at the first signal after [`Shutdown::started`].
    pub async fn wait(mut self) {
        let _ = self.stopped.wait_for(|s| *s).await;
    }
}
