//! Helpers for the end-to-end tests: building agents for wasm32-wasip2, a host on free
//! ports in a temporary directory, a real mosquitto broker, and waiting for log lines.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::io::{BufRead, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod azure;
pub mod browser;
pub mod cluster;
pub mod bench;
pub mod faults;
pub mod nats;
pub mod tether_run;

use anyhow::{Context, bail};
use tether_host::config::{AgentSettings, DeviceBinding, HostConfig};
use tether_host::{Host, LogLine};
use tokio::sync::broadcast;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Builds agent package `package` for wasm32-wasip2 (once per test process) and returns
/// the component's path. Cargo has released its build lock by the time tests run, so a
/// nested build into the same target directory works.
pub fn build_agent(package: &str) -> anyhow::Result<PathBuf> {
    cargo_build_once(package, &["-p", package, "--profile", "guest", "--target", "wasm32-wasip2"])
        .context("building the agent failed (is the wasm32-wasip2 target installed? run scripts/setup.sh)")?;
    Ok(workspace_root().join("target/wasm32-wasip2/guest").join(format!("{}.wasm", package.replace('-', "_"))))
}

/// Runs `cargo build <args>` once per test process for each `key`.
fn cargo_build_once(key: &str, args: &[&str]) -> anyhow::Result<()> {
    static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashSet::new);
    if built.contains(key) {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet"])
        .args(args)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build {} failed", args.join(" "));
    }
    built.insert(key.to_owned());
    Ok(())
}

/// A host in a temporary directory, listening on a free port.
pub struct TestHost {
    pub host: Host,
    pub dir: tempfile::TempDir,
    pub logs: LogWatch,
}

impl TestHost {
    /// Starts a host; `tune` adjusts the configuration first.
    pub async fn start(tune: impl FnOnce(&mut HostConfig)) -> anyhow::Result<TestHost> {
        let dir = tempfile::tempdir()?;
        Self::start_in(dir, tune).await
    }

    /// Starts a host whose store and cache live in `dir` (to restart over the same state).
    pub async fn start_in(dir: tempfile::TempDir, tune: impl FnOnce(&mut HostConfig)) -> anyhow::Result<TestHost> {
        let mut config = HostConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            store_dir: dir.path().join("store"),
            cache_dir: dir.path().join("cache"),
            max_agents: 16,
            ..HostConfig::default()
        };
        tune(&mut config);
        let host = Host::start(config).await?;
        let logs = LogWatch(host.logs(), Vec::new());
        Ok(TestHost { host, dir, logs })
    }

    /// Builds `package` and runs it as agent `id` with `config` values.
    pub fn spawn(&self, id: &str, package: &str, config: &[(&str, &str)]) -> anyhow::Result<()> {
        self.spawn_with_device(id, package, config, None)
    }

    /// Like [`TestHost::spawn`], with the agent bound to the serial port `device` (8N1, 115200).
    pub fn spawn_with_device(&self, id: &str, package: &str, config: &[(&str, &str)], device: Option<&Path>) -> anyhow::Result<()> {
        let module = self.host.runtime().load_file(&build_agent(package)?)?;
        let settings = AgentSettings {
            id: Some(id.to_owned()),
            config: config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            device: device.map(|path| DeviceBinding::serial(path.to_owned(), 115_200)),
        };
        self.host.spawn(id, settings, module)?;
        Ok(())
    }

    /// `http://127.0.0.1:port/<id><path>`.
    pub fn url(&self, id: &str, path: &str) -> String {
        format!("{}{path}", self.host.agent_url(id))
    }

    /// Stops the host and hands back its directory.
    pub async fn stop(self) -> tempfile::TempDir {
        self.host.shutdown().await;
        self.dir
    }
}

/// Log lines of all agents, kept so that a test can look back as well as wait.
pub struct LogWatch(broadcast::Receiver<LogLine>, Vec<LogLine>);

impl LogWatch {
    /// Watches the lines of `logs` from now on.
    pub fn new(logs: broadcast::Receiver<LogLine>) -> LogWatch {
        LogWatch(logs, Vec::new())
    }

    /// Waits until agent `agent` has logged a line containing `text`; returns the first.
    pub async fn wait_for(&mut self, agent: &str, text: &str, timeout: Duration) -> anyhow::Result<LogLine> {
        self.wait_for_count(agent, text, 1, timeout).await
    }

    /// Waits until agent `agent` has logged `n` lines containing `text`; returns the n-th.
    pub async fn wait_for_count(&mut self, agent: &str, text: &str, n: usize, timeout: Duration) -> anyhow::Result<LogLine> {
        let matches = |l: &LogLine| &*l.agent == agent && l.text.contains(text);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.1.iter().filter(|l| matches(l)).nth(n - 1) {
                return Ok(line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.0.recv()).await {
                Ok(Ok(line)) => self.1.push(line),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => bail!("log watcher lagged by {n} lines"),
                Ok(Err(broadcast::error::RecvError::Closed)) => bail!("host closed its log"),
                Err(_) => bail!("no log line {text:?} from {agent} within {timeout:?}; seen: {:#?}", self.texts(agent)),
            }
        }
    }

    /// Takes in what arrived so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.0.try_recv() {
            self.1.push(line);
        }
    }

    /// The texts `agent` logged so far, in order.
    pub fn texts(&self, agent: &str) -> Vec<String> {
        self.1.iter().filter(|l| &*l.agent == agent).map(|l| l.text.clone()).collect()
    }
}

/// The Python of the venv with Microsoft's SDKs: `$TETHER_PYTHON`, else
/// `target/pyenv/bin/python` (both made by `scripts/setup.sh --with-test-deps`).
pub fn python() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("TETHER_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target/pyenv/bin/python"));
    if !path.exists() {
        bail!("no Python venv at {}; run scripts/setup.sh --with-test-deps", path.display());
    }
    Ok(path)
}

/// The head of a manifest for a test: the host and the management API on free loopback
/// ports, stores and cache in `dir`; `host_extra` adds lines (or `[host.*]` tables) to
/// `[host]`, `manage_extra` to `[manage]`. Tenants and agents follow.
pub fn manifest_head(dir: &Path, host_extra: &str, manage_extra: &str) -> String {
    format!(
        "[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = {:?}\ncache_dir = {:?}\n{host_extra}\n\n[manage]\nlisten = \"127.0.0.1:0\"\n{manage_extra}\n",
        dir.join("store").display().to_string(),
        dir.join("cache").display().to_string(),
    )
}

/// A port nobody listens on right now. Someone else may take it before the caller binds
/// it (another test binding port 0, a client's source port): programs started on it must
/// be checked to have got it (see [`Mosquitto::start`]). For a port that must refuse
/// connections, use [`ClosedPort`].
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A port on 127.0.0.1 that refuses connections for as long as this value lives: bound,
/// so that nothing else can take it meanwhile, but not listening (a [`free_port`] could
/// be listened on by another test's server by the time it is connected to).
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> anyhow::Result<ClosedPort> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let port = socket.local_addr()?.port();
        Ok(ClosedPort { _socket: socket, port })
    }
}

/// A loopback server that takes connections and never reads or answers them, held until
/// the test's runtime ends: requests to it stay in flight, MQTT connects get no CONNACK.
pub async fn silent_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok(addr)
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// TLS files for a mosquitto listener.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by `ca`.
    pub require_client_certificate: bool,
}

/// A real mosquitto broker on a free port, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Why a broker did not start.
#[derive(Debug)]
enum BrokerStart {
    /// Someone else took the port between [`free_port`] and mosquitto binding it.
    PortTaken(anyhow::Error),
    Failed(anyhow::Error),
}

impl Mosquitto {
    /// Starts mosquitto (Debian package, installed by scripts/setup.sh) with anonymous
    /// access, plain or with `tls`, on a free port.
    pub async fn start(tls: Option<&TlsFiles>) -> anyhow::Result<Mosquitto> {
        // A free port can be taken by another test before mosquitto binds it; then it
        // exits at once and another port does it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_start_on(free_port(), tls).await {
                Ok(broker) => return Ok(broker),
                Err(BrokerStart::PortTaken(e)) if attempts < 5 => eprintln!("{e:#}; trying another port"),
                Err(BrokerStart::PortTaken(e) | BrokerStart::Failed(e)) => return Err(e),
            }
        }
    }

    /// Like [`Mosquitto::start`] on a given port (to restart a broker where it was).
    pub async fn start_on(port: u16, tls: Option<&TlsFiles>) -> anyhow::Result<Mosquitto> {
        Self::try_start_on(port, tls).await.map_err(|(BrokerStart::PortTaken(e) | BrokerStart::Failed(e))| e)
    }

    /// Starts mosquitto on `port` and waits until it says it runs, which it does only once
    /// its listener is open. (Waiting for the port to accept connections was not enough:
    /// when another process had taken the port, that process answered and the test went
    /// on with a broker that had exited.)
    async fn try_start_on(port: u16, tls: Option<&TlsFiles>) -> Result<Mosquitto, BrokerStart> {
        let failed = |e: anyhow::Error| BrokerStart::Failed(e);
        let dir = tempfile::tempdir().map_err(|e| failed(e.into()))?;
        // No cap on the QoS 1/2 messages queued for a slow subscriber (default 1000): a
        // host that stops reading must find them all there when it reads again. The log
        // goes to stderr (unbuffered, unlike stdout into a pipe), errors and start-up only,
        // so the "running" line can be waited for.
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type information\n"
        );
        if let Some(t) = tls {
            conf += &format!("cafile {}\ncertfile {}\nkeyfile {}\n", t.ca.display(), t.cert.display(), t.key.display());
            if t.require_client_certificate {
                conf += "require_certificate true\n";
            }
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).map_err(|e| failed(e.into()))?;
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("mosquitto");
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start mosquitto; run scripts/setup.sh --with-test-deps")
            .map_err(failed)?;
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        if let Some(stderr) = child.stderr.take() {
            // Reads to the end, also after start-up, so that mosquitto never blocks on a
            // full pipe; the lines go nowhere once nobody waits for them.
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let broker = Mosquitto { child, port, _dir: dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) if line.contains(" running") => return Ok(broker),
                Ok(Some(line)) => seen.push(line),
                // End of its stderr: mosquitto exited.
                Ok(None) => {
                    let error = anyhow::anyhow!("mosquitto did not start on port {port}: {}", seen.join(" | "));
                    return Err(if seen.iter().any(|l| l.contains("Address already in use")) { BrokerStart::PortTaken(error) } else { failed(error) });
                }
                Err(_) => return Err(failed(anyhow::anyhow!("mosquitto not running on port {port} after 30 s: {}", seen.join(" | ")))),
            }
        }
    }

    /// Stops the broker now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds the workspace's binaries (once per test process); returns the path of `bin`.
/// Built as `cargo test` builds the workspace (its default members with their tests), so
/// that the dependencies are the ones that build made: `cargo build -p` of one package
/// would unify their features differently and compile wasmtime and the rest again.
pub fn build_bin(bin: &str) -> anyhow::Result<PathBuf> {
    cargo_build_once("bins", &["--tests", "--bins"])?;
    Ok(workspace_root().join("target/debug").join(bin))
}

/// The device simulator (`examples/device-sim`) on a pty, killed on drop.
pub struct DeviceSim {
    child: Child,
    /// The pty the simulator opened (`/dev/pts/N`).
    pub pty: PathBuf,
}

impl DeviceSim {
    /// Starts `device-sim` with `args` (e.g. `--link PATH`, `--interval 0.2`, `--noise 20`)
    /// and reads the pty path from its first line of output.
    pub fn start(args: &[&str]) -> anyhow::Result<DeviceSim> {
        let binary = build_bin("device-sim")?;
        // Stdin is the simulator's control line (`--control`).
        let mut child =
            Command::new(binary).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("cannot start device-sim")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let pty = PathBuf::from(line.trim());
        if !pty.exists() {
            let _ = child.kill();
            bail!("device-sim printed no pty path (got {line:?})");
        }
        Ok(DeviceSim { child, pty })
    }

    /// Sends a command (`unplug`, `replug`) to a simulator started with `--control`.
    pub fn command(&mut self, command: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("device-sim has no stdin")?;
        writeln!(stdin, "{command}").context("cannot command device-sim")?;
        Ok(stdin.flush()?)
    }

    /// Kills the simulator now: the device is "unplugged".
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DeviceSim {
    fn drop(&mut self) {
        self.stop();
    }
}
