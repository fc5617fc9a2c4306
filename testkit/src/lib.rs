//! Tests for your own agent, as `impt test` gave Squirrel agents: from an ordinary native
//! test, start the hub emulator ([`Hub`]), a scripted board on a pty ([`Board`]) and your
//! agent crate ([`Agent`]), each as the `tether` and `device-sim` binaries run them, then
//! drive them and check what each side saw. `tether test` in an agent crate runs its
//! tests (`cargo test` for this machine, while the crate itself builds for WebAssembly).
//!
//! ```no_run
//! use std::time::Duration;
//! use tether_testkit::{Agent, Board, Hub};
//!
//! #[tokio::test]
//! async fn readings_reach_the_hub() -> anyhow::Result<()> {
//!     let hub = Hub::start().await?;
//!     let cs = hub.create_device("greenhouse").await?;
//!     let board = Board::start(&["--interval", "0.2", "--on", "vent=true"])?;
//!     let agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[("connection_string", &cs)], Some(&hub), Some(&board)).await?;
//!     agent.wait_for_log("connected", Duration::from_secs(30)).await?;
//!     let event = hub.wait_for_event("greenhouse", "telemetry", Duration::from_secs(30)).await?;
//!     assert!(event["body"].as_str().unwrap_or_default().contains("temperature"));
//!     Ok(())
//! }
//! ```
//!
//! The binaries: `$TETHER_BIN` (set by `tether test`) or `tether` on the `PATH`; the board
//! is the `device-sim` beside it (or `$DEVICE_SIM`). Every process is killed when its
//! value is dropped; every file lives in a temporary directory of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// The service REST API version of the calls here.
const API: &str = "api-version=2021-04-12";

/// What to do when `tether` cannot be started.
const NO_TETHER: &str = "cannot start tether: run the tests with `tether test` (which sets TETHER_BIN), or set TETHER_BIN, or put tether on the PATH";

/// The `tether` binary.
fn tether_bin() -> PathBuf {
    std::env::var_os("TETHER_BIN").map_or_else(|| PathBuf::from("tether"), PathBuf::from)
}

/// The `device-sim` binary: `$DEVICE_SIM`, beside `tether`, or on the `PATH`.
fn device_sim_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DEVICE_SIM") {
        return PathBuf::from(path);
    }
    let beside = tether_bin().with_file_name("device-sim");
    if beside.is_file() { beside } else { PathBuf::from("device-sim") }
}

/// Lines a child prints, on both pipes, as they come.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, stream: impl AsyncRead + Send + Unpin + 'static) {
        let lines = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first line containing `text`, waiting up to `timeout`; `exited` says whether
    /// the process ended (so that waiting longer is pointless).
    async fn wait_for(&self, text: &str, timeout: Duration, mut exited: impl FnMut() -> bool) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.snapshot().into_iter().find(|l| l.contains(text)) {
                return Ok(line);
            }
            if exited() || tokio::time::Instant::now() >= deadline {
                bail!("{text:?} not seen; output so far:\n{}", self.snapshot().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(command: &mut Command) -> anyhow::Result<(Child, Lines)> {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().with_context(|| format!("cannot start {:?}", command.as_std().get_program()))?;
    let lines = Lines::default();
    if let Some(out) = child.stdout.take() {
        lines.collect(out);
    }
    if let Some(err) = child.stderr.take() {
        lines.collect(err);
    }
    Ok((child, lines))
}

/// `tether hub` on free ports in a temporary directory, with its credentials.
pub struct Hub {
    _child: Child,
    _dir: tempfile::TempDir,
    /// Device MQTT over TLS.
    pub mqtt_port: u16,
    /// Service, DPS and control REST: `https://localhost:{https_port}`.
    pub https_port: u16,
    /// The CA the hub's certificates come from.
    pub ca: PathBuf,
    /// A service SAS token (`iothubowner`), valid for a day.
    pub service_token: String,
    /// The control API's bearer token.
    pub control_token: String,
    http: reqwest::Client,
}

impl Hub {
    /// Starts it and reads what it prints.
    pub async fn start() -> anyhow::Result<Hub> {
        let dir = tempfile::tempdir()?;
        let (mut child, lines) = spawn(Command::new(tether_bin()).args(["hub", "--mqtt-port", "0", "--https-port", "0", "--page-listen", "127.0.0.1:0", "--state-dir"]).arg(dir.path()).env("NO_COLOR", "1")).context(NO_TETHER)?;
        lines.wait_for("/emulator/devices/", Duration::from_secs(60), || child.try_wait().ok().flatten().is_some()).await.context("tether hub did not start")?;
        let printed = lines.snapshot();
        let after = |prefix: &str| printed.iter().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()));
        let port_of = |prefix: &str| -> anyhow::Result<u16> {
            let address = after(prefix).with_context(|| format!("tether hub printed no {prefix:?} line"))?;
            let address = address.trim_start_matches("https://");
            let port = address.split_whitespace().next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
            port.with_context(|| format!("no port in {address:?}"))
        };
        let quoted = |prefix: &str| after(prefix).and_then(|v| v.strip_suffix('\'').map(str::to_owned)).with_context(|| format!("tether hub printed no {prefix}"));
        let ca = dir.path().join("ca.pem");
        let pem = std::fs::read(&ca).with_context(|| format!("no CA at {}", ca.display()))?;
        let http = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&pem)?]).build()?;
        Ok(Hub {
            mqtt_port: port_of("device MQTT (TLS):")?,
            https_port: port_of("service/DPS (HTTPS):")?,
            service_token: quoted("export TOKEN='")?,
            control_token: quoted("export CONTROL_TOKEN='")?,
            ca,
            _child: child,
            _dir: dir,
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("https://localhost:{}{path}{sep}{API}", self.https_port)
    }

    /// A service REST call: status and JSON body (`null` when there is none).
    pub async fn service(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method.parse()?, self.url(path)).header("authorization", &self.service_token);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await.with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Registers a device and returns its connection string, with the hub's MQTT port in
    /// `HostName`.
    pub async fn create_device(&self, id: &str) -> anyhow::Result<String> {
        let (status, body) = self.service("PUT", &format!("/devices/{id}"), Some(json!({ "deviceId": id }))).await?;
        if status != 200 {
            bail!("creating device {id}: {status} {body}");
        }
        let key = body["authentication"]["symmetricKey"]["primaryKey"].as_str().context("the registry gave no key")?;
        Ok(format!("HostName=localhost:{};DeviceId={id};SharedAccessKey={key}", self.mqtt_port))
    }

    /// The device's twin.
    pub async fn twin(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self.service("GET", &format!("/twins/{id}"), None).await?.1)
    }

    /// Patches the desired properties, e.g. `json!({"threshold": 25})`.
    pub async fn set_desired(&self, id: &str, desired: Value) -> anyhow::Result<()> {
        let (status, body) = self.service("PATCH", &format!("/twins/{id}"), Some(json!({ "properties": { "desired": desired } }))).await?;
        if status != 200 {
            bail!("patching the twin of {id}: {status} {body}");
        }
        Ok(())
    }

    /// Invokes a direct method; its status and payload.
    pub async fn invoke_method(&self, id: &str, name: &str, payload: Value) -> anyhow::Result<(i64, Value)> {
        let request = json!({ "methodName": name, "payload": payload, "responseTimeoutInSeconds": 10 });
        let (status, body) = self.service("POST", &format!("/twins/{id}/methods"), Some(request)).await?;
        if status != 200 {
            bail!("method {name} on {id}: {status} {body}");
        }
        Ok((body["status"].as_i64().unwrap_or_default(), body["payload"].clone()))
    }

    /// Sends a cloud-to-device message.
    pub async fn send_c2d(&self, id: &str, body: &str) -> anyhow::Result<()> {
        let url = format!("https://localhost:{}/emulator/devices/{id}/c2d", self.https_port);
        let response = self.http.post(url).bearer_auth(&self.control_token).body(body.to_owned()).send().await?;
        if !response.status().is_success() {
            bail!("C2D to {id}: {}", response.status());
        }
        Ok(())
    }

    /// The first event of `kind` (`telemetry`, `connected`, `twinReported`, ...) from
    /// device `id`, waiting up to `timeout`; its JSON (`body`, `properties`, ...).
    pub async fn wait_for_event(&self, id: &str, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_for_event_where(id, kind, timeout, |_| true).await
    }

    /// Like [`Hub::wait_for_event`], for the first event `accept` takes.
    pub async fn wait_for_event_where(&self, id: &str, kind: &str, timeout: Duration, accept: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut since = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs().min(5);
            let url = format!("https://localhost:{}/emulator/events?since={since}&wait={left}&deviceId={id}&type={kind}", self.https_port);
            let text = self.http.get(url).bearer_auth(&self.control_token).send().await?.text().await?;
            let page: Value = serde_json::from_str(&text).with_context(|| format!("the event log answered {text:?}"))?;
            for event in page["events"].as_array().into_iter().flatten() {
                if accept(event) {
                    return Ok(event.clone());
                }
            }
            since = page["next"].as_u64().unwrap_or(since);
            if tokio::time::Instant::now() >= deadline {
                bail!("no {kind} event from {id} in {timeout:?}");
            }
        }
    }
}

/// A board: `device-sim` on a pty behind a stable path, scripted with its options
/// (`--interval S`, `--on NAME=JSON`, `--send NAME=JSON`, `--script FILE`, ...).
pub struct Board {
    child: Child,
    _dir: tempfile::TempDir,
    lines: Lines,
    /// The serial port the agent is bound to.
    pub path: PathBuf,
}

impl Board {
    /// Starts it with `args`; it takes `send NAME JSON`, `unplug` and `replug` through
    /// [`Board::command`].
    pub fn start(args: &[&str]) -> anyhow::Result<Board> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tty");
        let mut command = Command::new(device_sim_bin());
        command.args(args).arg("--link").arg(&path).arg("--control").stdin(Stdio::piped());
        let (child, lines) = spawn(&mut command).context("cannot start device-sim (build it: cargo build --release -p device-sim)")?;
        Ok(Board { child, _dir: dir, lines, path })
    }

    /// Sends a control line: `send NAME JSON`, `unplug` or `replug`.
    pub async fn command(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("device-sim has no stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(stdin.flush().await?)
    }

    /// What the simulator printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.snapshot()
    }
}

/// Your agent crate, built and run by `tether run`, trusting the hub's CA and bound to
/// the board if given.
pub struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    lines: Lines,
    /// `http://127.0.0.1:{port}/{id}`.
    pub url: String,
    http: reqwest::Client,
}

impl Agent {
    /// Builds `crate_dir` (usually `env!("CARGO_MANIFEST_DIR")`) and runs it with the
    /// `config` values it reads with `config(...)`. A cold build may take a minute.
    pub async fn start(crate_dir: impl AsRef<Path>, config: &[(&str, &str)], hub: Option<&Hub>, board: Option<&Board>) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let mut toml = format!("[host]\nstore_dir = {:?}\ncache_dir = {:?}\n", dir.path().join("store"), dir.path().join("cache"));
        if let Some(hub) = hub {
            toml += &format!("trusted_ca_files = [{:?}]\n", hub.ca);
        }
        toml += "\n[agent.config]\n";
        for (key, value) in config {
            toml += &format!("{key:?} = {value:?}\n");
        }
        if let Some(board) = board {
            toml += &format!("\n[agent.device]\npath = {:?}\n", board.path);
        }
        let file = dir.path().join("tether.toml");
        std::fs::write(&file, toml)?;
        let mut command = Command::new(tether_bin());
        command.arg("run").arg(crate_dir.as_ref()).arg("--config").arg(&file).args(["--listen", "127.0.0.1:0"]).env("NO_COLOR", "1");
        let (mut child, lines) = spawn(&mut command).context(NO_TETHER)?;
        let line = lines.wait_for("agent URL: ", Duration::from_secs(600), || child.try_wait().ok().flatten().is_some()).await.context("the agent did not start")?;
        let url = line.split("agent URL: ").nth(1).and_then(|u| u.split_whitespace().next()).context("no URL in tether run's output")?.to_owned();
        Ok(Agent { child, _dir: dir, lines, url, http: reqwest::Client::new() })
    }

    /// `GET {url}{path}`: status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self.http.get(format!("{}{path}", self.url)).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// `POST {url}{path}` with `body`: status and body.
    pub async fn post(&self, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let response = self.http.post(format!("{}{path}", self.url)).body(body.to_owned()).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// The first log line containing `text`, waiting up to `timeout`.
    pub async fn wait_for_log(&mut self, text: &str, timeout: Duration) -> anyhow::Result<String> {
        let child = &mut self.child;
        self.lines.wait_for(text, timeout, || child.try_wait().ok().flatten().is_some()).await
    }

    /// Every line `tether run` printed so far (its log and the agent's).
    pub fn log(&self) -> Vec<String> {
        self.lines.snapshot()
    }
}
