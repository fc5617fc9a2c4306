//! A real nats-server with JetStream (Debian's package, installed by scripts/setup.sh) on
//! a free loopback port, for the cluster tests and bench; killed on drop.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::free_port;

/// A nats-server; its JetStream data stays in its directory across [`Nats::restart`].
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts nats-server with JetStream on a free port.
    pub async fn start() -> anyhow::Result<Nats> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("jetstream");
        let mut last = None;
        // A free port can be taken by another test before the server binds it.
        for _ in 0..5 {
            let port = free_port();
            match run(port, &store).await {
                Ok(child) => return Ok(Nats { child: Some(child), port, store, _dir: dir }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9` of the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on its port, over the JetStream data it had.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = Some(run(self.port, &self.store).await?);
        Ok(())
    }

}

/// Runs the server on `port` and waits until it says it is ready.
async fn run(port: u16, store: &std::path::Path) -> anyhow::Result<Child> {
    let mut child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start nats-server; run scripts/setup.sh --with-test-deps")?;
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    if let Some(stderr) = child.stderr.take() {
        // Read to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let failed = loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) if line.contains("Server is ready") => return Ok(child),
            Ok(Some(line)) => seen.push(line),
            Ok(None) => break format!("nats-server exited on port {port}"),
            Err(_) => break format!("nats-server not ready on port {port} after 30 s"),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!("{failed}: {}", seen.join(" | "))
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
