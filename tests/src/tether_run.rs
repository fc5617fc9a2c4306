//! A real `tether` process (`tether run`, `tether hub`), for the tests that must kill it
//! (`kill -9`) or see what it prints: every line, kept for the test to read, and for
//! `tether run` its agent's URL.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;

use crate::build_bin;

/// A running `tether` process; killed when dropped.
pub struct TetherRun {
    child: tokio::process::Child,
    /// The agent's URL (`tether run` only).
    pub url: String,
    lines: Arc<Mutex<Vec<String>>>,
    /// Readers of stdout (the log) and stderr (a failed start's one-line error).
    readers: Vec<JoinHandle<()>>,
}

impl TetherRun {
    /// Starts `tether run agent --config config` (whose host listens on port 0) and waits
    /// until it names the agent's URL.
    pub async fn start(agent: &Path, config: &Path, timeout: Duration) -> anyhow::Result<TetherRun> {
        Self::start_with(&[], agent, config, timeout).await
    }

    /// Like [`TetherRun::start`], with `tether`'s own options (e.g. `--io-threads 1`) first.
    pub async fn start_with(options: &[&str], agent: &Path, config: &Path, timeout: Duration) -> anyhow::Result<TetherRun> {
        let mut args: Vec<&OsStr> = options.iter().map(OsStr::new).collect();
        args.extend([OsStr::new("run"), agent.as_os_str(), OsStr::new("--config"), config.as_os_str()]);
        let mut run = TetherRun::spawn(&args, "agent URL: ", timeout).await?;
        let named = run.lines().iter().find_map(|l| Some(l.split("agent URL: ").nth(1)?.split_whitespace().next()?.to_owned()));
        run.url = named.ok_or_else(|| anyhow::anyhow!("tether run did not start: {:?}", run.lines()))?;
        Ok(run)
    }

    /// Starts `tether` with `args` and waits until it prints `ready` (or fails to start).
    pub async fn spawn(args: &[&OsStr], ready: &str, timeout: Duration) -> anyhow::Result<TetherRun> {
        Self::spawn_with_env(args, &[], ready, timeout).await
    }

    /// Like [`TetherRun::spawn`], with extra environment variables.
    pub async fn spawn_with_env(args: &[&OsStr], env: &[(&str, &OsStr)], ready: &str, timeout: Duration) -> anyhow::Result<TetherRun> {
        Self::spawn_program(&build_bin("tether")?, args, env, ready, timeout).await
    }

    /// Like [`TetherRun::spawn_with_env`] with another `tether` binary (a release build, for
    /// a benchmark).
    pub async fn spawn_program(program: &Path, args: &[&OsStr], env: &[(&str, &OsStr)], ready: &str, timeout: Duration) -> anyhow::Result<TetherRun> {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        // Both pipes are read to the end, so that the host never blocks on a full pipe.
        let keep = |stream: Option<Box<dyn AsyncRead + Send + Unpin>>| {
            let lines = lines.clone();
            tokio::spawn(async move {
                let Some(stream) = stream else { return };
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lock(&lines).push(line);
                }
            })
        };
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>);
        let readers = vec![keep(stdout), keep(stderr)];
        let run = TetherRun { child, url: String::new(), lines, readers };
        run.wait_until(ready, timeout, |lines| lines.iter().any(|l| l.contains(ready) || l.starts_with("error:"))).await?;
        if let Some(error) = run.lines().iter().find(|l| l.starts_with("error:")) {
            anyhow::bail!("tether {:?} did not start: {error}", args);
        }
        Ok(run)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// The word after `marker` on the first line printed that has it, without a trailing
    /// `/`: an address or a link that `tether` printed.
    pub fn word_after(&self, marker: &str) -> anyhow::Result<String> {
        let lines = self.lines();
        lines
            .iter()
            .find_map(|l| Some(l.split(marker).nth(1)?.split_whitespace().next()?.trim_end_matches('/').to_owned()))
            .ok_or_else(|| anyhow::anyhow!("no {marker:?} in {lines:?}"))
    }

    /// Waits until `done` holds for the lines printed so far.
    pub async fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&[String]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(&lock(&self.lines)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tether: no {what} within {timeout:?}; last lines: {:?}",
                lock(&self.lines).iter().rev().take(10).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `kill -9`: no shutdown, no destructor, no flush. Returns every line printed.
    pub async fn kill_9(mut self) -> anyhow::Result<Vec<String>> {
        self.child.start_kill()?;
        let status = self.child.wait().await?;
        use std::os::unix::process::ExitStatusExt;
        anyhow::ensure!(status.signal() == Some(9), "tether ended otherwise: {status}");
        // The pipes end with the process: the readers have every line once they return.
        for reader in &mut self.readers {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        Ok(self.lines())
    }
}

fn lock(lines: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    lines.lock().unwrap_or_else(|p| p.into_inner())
}
