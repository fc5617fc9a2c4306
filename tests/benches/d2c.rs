//! D2C telemetry benchmark (a program, not a timed test): a Tether agent using
//! `azure_iot_hub::Client` (and, in its own rows, the async `DeviceClient` over it),
//! Microsoft's Python SDK (azure-iot-device) and a native
//! rumqttc client send the same messages to the same hub emulator, side by side.
//!
//! Run: `cargo bench -p tether-tests --bench d2c [-- --messages N --window W --devices K
//! --rounds R --no-python --only TEXT --hog]` (defaults 20000, 100, 100, 3; `--only` keeps
//! the rows whose label contains TEXT, or one of `A|B`, for profiling one sender or
//! comparing two with more rounds; `--hog` runs a process spinning on one core meanwhile,
//! for the busy-machine rows).
//!
//! Two switches for the Tether sender's host, to see where its time goes (BENCHMARKS.md,
//! the d2c profile): `D2C_CURRENT_THREAD=1` runs it on a current-thread tokio runtime
//! (as the native sender is), `D2C_NO_SLOW_LANE=1` sets `slow_lane = false`.
//!
//! The emulator runs in this process on MQTT port 8883 (azure-iot-device only connects
//! there), holding `target/hub-emulator-8883.lock` like the Python conformance tests. Every
//! sender runs in its own child process (this program re-run with `D2C_BENCH_CONFIG` set,
//! or the Python script tests/python/d2c_bench.py), so its memory is measured apart from
//! the emulator's and each gets the same machine. Per run: the child connects a fresh
//! device and says `BENCH ready`; the bench notes the hub's event cursor and says go; the
//! child sends N messages (100-byte body, property `bench=d2c`) with up to W sends
//! pending and reports its latencies; messages/s is N over the time until the hub's
//! event log holds all N telemetry events of that device. Each row is the median of R
//! rounds. "sender CPU / msg" is the child's CPU time (all threads, schedstat) from go
//! until the hub had everything, over N; "hub CPU / msg" the same for this process (the
//! emulator, plus the bench polling its event log every 5 ms). Memory per connected device
//! is measured in separate child processes (K agents or rumqttc connections, or one
//! Python process), each client having sent 10 messages.
//!
//! The targets' CPU lines set Tether against native rumqttc round by round (the two ran
//! seconds apart) and give the median of those ratios: the machine's speed drifts between
//! rounds more than the gap being measured.
//!
//! Tether's progress lines also say how many events the agent took per call into it
//! (`events.next` hands a waiting burst to the call already running).
//!
//! Latency: Tether and rumqttc from the send call to its completion, which is PUBACK at
//! QoS 1 and, at QoS 0, the MQTT event loop having written the PUBLISH (rumqttc's
//! `Outgoing::Publish`, which the host turns into the `on_sent` callback). Python: the
//! awaited `send_message`, always QoS 1 (azure-iot-device has no QoS 0 telemetry).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tether_host::AgentStatus;
use tether_host::config::AgentSettings;
use tether_hub_emulator::{Control, EventFilter, Hub, HubConfig};
use tether_tests::{TestHost, workspace_root};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

/// Set in a child process: its JSON configuration ([`ChildConfig`]).
const CONFIG_ENV: &str = "D2C_BENCH_CONFIG";
/// Set in the child that only spins: the CPU hog of `--hog`.
const HOG_ENV: &str = "D2C_BENCH_HOG";
/// azure-iot-device hard-codes this port.
const MQTT_PORT: u16 = 8883;
/// The limit for one run (connect, send, hub count).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Messages each client sends before memory is measured (so send buffers exist).
const MEM_MESSAGES: usize = 10;
/// Clients in the Python memory run (one process).
const PY_MEM_CLIENTS: usize = 10;
/// The default of `ClientOptions::max_pending_send_requests`.
const DEFAULT_MAX_SEND: usize = 3;

#[path = "../agents/d2c-bench/src/body.rs"]
mod body;
use body::body;

fn percentile_us(sorted: &[Duration], p: f64) -> u64 {
    tether_tests::bench::percentile(sorted, p).as_micros() as u64
}

/// CPU time process `pid` has used so far (sum over its threads, from schedstat), ns.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Says `text` to the parent on stdout.
fn say(text: &str) {
    println!("BENCH {text}");
}

/// Waits for the parent's next word (a line on stdin: go, then bye).
async fn wait_for_line() -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os(HOG_ENV).is_some() {
        // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's death signal, so
        // the hog dies with the bench even if the bench is killed.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
    if let Ok(config) = std::env::var(CONFIG_ENV) {
        let config: ChildConfig = ChildConfig::from_json(&config)?;
        // The native client gets its best set-up: one thread, no cross-thread wake-ups
        // (on a multi-threaded runtime it used 3-4x the CPU per QoS 1 message).
        let runtime = match config.kind {
            Sender::Rumqttc => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            _ if std::env::var_os("D2C_CURRENT_THREAD").is_some() => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            _ => tokio::runtime::Runtime::new()?,
        };
        return runtime.block_on(child(config));
    }
    let args = Args::parse();
    let _lock = lock_port()?;
    tokio::runtime::Runtime::new()?.block_on(parent(args))
}

// ---------------------------------------------------------------------------------------
// Parent: emulator, runs, table.

struct Args {
    messages: usize,
    window: usize,
    devices: usize,
    rounds: usize,
    python: bool,
    only: Option<String>,
    hog: bool,
}

impl Args {
    /// `--messages N --window W --devices K --rounds R --no-python --only TEXT --hog`; other arguments (cargo adds
    /// `--bench`) are ignored.
    fn parse() -> Args {
        let args: Vec<String> = std::env::args().collect();
        let num = |name: &str, default: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default);
        Args {
            messages: num("--messages", 20_000).max(1),
            window: num("--window", 100).max(1),
            devices: num("--devices", 100).max(2),
            rounds: num("--rounds", 3).max(1),
            python: !args.iter().any(|a| a == "--no-python"),
            only: args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned(),
            hog: args.iter().any(|a| a == "--hog"),
        }
    }
}

/// Takes the cross-process lock for port 8883 that the Python conformance tests take.
fn lock_port() -> anyhow::Result<File> {
    let path = workspace_root().join("target/hub-emulator-8883.lock");
    let file = File::create(&path).with_context(|| path.display().to_string())?;
    if file.try_lock().is_err() {
        eprintln!("waiting for {} (a test run is using port 8883)", path.display());
        file.lock().with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(file)
}

#[derive(Clone, Copy, PartialEq)]
enum Sender {
    Tether,
    Rumqttc,
    Python,
}

impl Sender {
    fn name(self) -> &'static str {
        match self {
            Sender::Tether => "tether",
            Sender::Rumqttc => "rumqttc",
            Sender::Python => "python",
        }
    }
}

/// One row: a sender at a QoS with a number of pending sends.
#[derive(Clone)]
struct Spec {
    sender: Sender,
    qos: u8,
    window: usize,
    /// Through the durable outbox (Tether only).
    outbox: bool,
    /// Through the SDK's async layer, `DeviceClient` (Tether only).
    async_layer: bool,
    label: String,
}

impl Spec {
    /// A plain row: no outbox, no async layer; for Tether, with `default` pending sends or
    /// with more.
    fn is_plain(&self, sender: Sender, qos: u8, default: bool) -> bool {
        self.sender == sender && self.qos == qos && !self.outbox && !self.async_layer && (sender != Sender::Tether || (self.window == DEFAULT_MAX_SEND) == default)
    }
}

/// Tether's sender CPU per message over native rumqttc's, round by round (the two ran a
/// few seconds apart in each round, so a change in the machine's speed between rounds
/// moves both): the median, lowest and highest.
struct CpuRatio {
    qos: u8,
    median: f64,
    low: f64,
    high: f64,
}

fn cpu_ratios(specs: &[Spec], runs: &[Vec<Outcome>]) -> Vec<CpuRatio> {
    let runs_of = |sender, qos| specs.iter().position(|s| s.is_plain(sender, qos, false)).map(|i| &runs[i]);
    [0u8, 1]
        .into_iter()
        .filter_map(|qos| {
            let (tether, native) = (runs_of(Sender::Tether, qos)?, runs_of(Sender::Rumqttc, qos)?);
            let mut ratios: Vec<f64> = tether.iter().zip(native).map(|(t, n)| t.cpu_us_per_msg / n.cpu_us_per_msg).collect();
            ratios.sort_by(f64::total_cmp);
            Some(CpuRatio { qos, median: *ratios.get(ratios.len() / 2)?, low: *ratios.first()?, high: *ratios.last()? })
        })
        .collect()
}

struct Outcome {
    spec: Spec,
    /// Messages the hub recorded and when it had all of them (from go).
    received: usize,
    hub_time: Duration,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
    /// The sender process's CPU time from go until the hub had everything, per message.
    cpu_us_per_msg: f64,
    /// The same for this process: the emulator (and the bench counting its events).
    hub_cpu_us_per_msg: f64,
    /// Tether: events the agent took per call into it during the run (`events.next`).
    events_per_call: Option<f64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.received as f64 / self.hub_time.as_secs_f64().max(1e-9)
    }
}

/// What the parent tells a child, as JSON in [`CONFIG_ENV`].
struct ChildConfig {
    kind: Sender,
    /// `run` or `mem`.
    mode: String,
    ca_path: PathBuf,
    cs: Vec<String>,
    n: usize,
    window: usize,
    qos: u8,
    max_send: usize,
    /// The Tether agent sends through the client's durable outbox.
    outbox: bool,
    /// The Tether agent sends with awaited `DeviceClient::send_message` calls.
    async_layer: bool,
    wasm: PathBuf,
}

impl ChildConfig {
    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(), "mode": self.mode, "ca_path": self.ca_path, "cs": self.cs, "n": self.n,
            "window": self.window, "qos": self.qos, "max_send": self.max_send, "outbox": self.outbox, "async_layer": self.async_layer, "wasm": self.wasm,
        })
    }

    fn from_json(text: &str) -> anyhow::Result<ChildConfig> {
        let v: Value = serde_json::from_str(text).context("bad D2C_BENCH_CONFIG")?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("D2C_BENCH_CONFIG lacks {k}"));
        let n = |k: &str| v.get(k).and_then(Value::as_u64).with_context(|| format!("D2C_BENCH_CONFIG lacks {k}"));
        let kind = match s("kind")?.as_str() {
            "tether" => Sender::Tether,
            "rumqttc" => Sender::Rumqttc,
            other => bail!("unknown sender {other}"),
        };
        let cs = v.get("cs").and_then(Value::as_array).map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect()).unwrap_or_default();
        Ok(ChildConfig {
            kind,
            mode: s("mode")?,
            ca_path: s("ca_path")?.into(),
            cs,
            n: n("n")? as usize,
            window: n("window")? as usize,
            qos: n("qos")? as u8,
            max_send: n("max_send")? as usize,
            outbox: v.get("outbox").and_then(Value::as_bool).unwrap_or(false),
            async_layer: v.get("async_layer").and_then(Value::as_bool).unwrap_or(false),
            wasm: s("wasm")?.into(),
        })
    }
}

/// A running child process and its `BENCH` lines.
struct ChildProc {
    child: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChildProc {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn start(sender: Sender, config: &ChildConfig, python: Option<&Path>) -> anyhow::Result<ChildProc> {
        let mut cmd = match (sender, python) {
            (Sender::Python, Some(py)) => {
                let mut c = Command::new(py);
                c.arg(workspace_root().join("tests/python/d2c_bench.py"));
                c
            }
            (Sender::Python, None) => bail!("no Python"),
            _ => Command::new(std::env::current_exe()?),
        };
        let mut child = cmd
            .env(CONFIG_ENV, config.to_json().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {} sender", sender.name()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(ChildProc { child, lines: BufReader::new(stdout).lines() })
    }

    /// The next `BENCH` line, without the prefix.
    async fn next(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line()).await.context("the sender took too long")??;
            match line {
                Some(l) => {
                    if let Some(rest) = l.strip_prefix("BENCH ") {
                        return Ok(rest.to_owned());
                    }
                }
                None => bail!("the sender exited early ({:?})", self.child.wait().await?),
            }
        }
    }

    /// Says `word` (go, bye) to the child.
    async fn say(&mut self, word: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("no stdin")?;
        stdin.write_all(format!("{word}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn finish(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Counts telemetry events matching `filter` after `cursor` until `n` arrived or
/// `deadline`; returns the count and when it was reached.
async fn count_telemetry(control: Control, filter: EventFilter, mut cursor: u64, n: usize, deadline: Instant) -> (usize, Instant) {
    let mut count = 0;
    loop {
        let events = control.events(cursor, &filter);
        let now = Instant::now();
        if let Some(last) = events.last() {
            cursor = last.seq;
            count += events.len();
        }
        if count >= n || now > deadline {
            return (count, now);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_one(hub: &Hub, spec: &Spec, n: usize, wasm: &Path, python: Option<&Path>, seq: usize) -> anyhow::Result<Outcome> {
    let device = format!("{}-q{}-w{}-{seq}", spec.sender.name(), spec.qos, spec.window);
    let info = hub.create_device(&device)?;
    let config = ChildConfig {
        kind: spec.sender,
        mode: "run".into(),
        ca_path: hub.ca_cert_path().to_owned(),
        cs: vec![info.connection_string],
        n,
        window: spec.window,
        qos: spec.qos,
        max_send: spec.window,
        outbox: spec.outbox,
        async_layer: spec.async_layer,
        wasm: wasm.to_owned(),
    };
    let mut child = ChildProc::start(spec.sender, &config, python)?;
    let ready = child.next(RUN_TIMEOUT).await.with_context(|| format!("{}: connecting", spec.label))?;
    ensure!(ready == "ready", "{}: {ready}", spec.label);
    let control = hub.control();
    let filter = EventFilter { device_id: Some(device), kind: Some("telemetry".into()) };
    let cursor = control.last_event_seq();
    let cpu_before = cpu_ns(child.pid());
    let hub_cpu_before = cpu_ns(std::process::id());
    let go = Instant::now();
    child.say("go").await?;
    let counter = tokio::spawn(count_telemetry(control, filter, cursor, n, go + RUN_TIMEOUT));
    let summary = child.next(RUN_TIMEOUT).await.with_context(|| format!("{}: sending", spec.label))?;
    let summary: Value = serde_json::from_str(&summary).with_context(|| format!("{}: {summary}", spec.label))?;
    let (received, done) = counter.await?;
    let cpu = cpu_ns(child.pid()).saturating_sub(cpu_before);
    let hub_cpu = cpu_ns(std::process::id()).saturating_sub(hub_cpu_before);
    child.say("bye").await?;
    child.finish().await;
    let get = |k: &str| summary.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(Outcome { received, hub_time: done - go, errors: get("errors"), p50_us: get("p50_us"), p99_us: get("p99_us"), cpu_us_per_msg: cpu as f64 / 1000.0 / n as f64, hub_cpu_us_per_msg: hub_cpu as f64 / 1000.0 / n as f64, events_per_call: summary.get("events_per_call").and_then(Value::as_f64), spec: spec.clone() })
}

/// Memory per connected device of one sender: (value KiB, how it was measured).
async fn memory(hub: &Hub, sender: Sender, devices: usize, wasm: &Path, python: Option<&Path>) -> anyhow::Result<(f64, String)> {
    let count = if sender == Sender::Python { PY_MEM_CLIENTS } else { devices };
    let mut cs = Vec::new();
    for i in 0..count {
        cs.push(hub.create_device(&format!("mem-{}-{i}", sender.name()))?.connection_string);
    }
    let config = ChildConfig {
        kind: sender,
        mode: "mem".into(),
        ca_path: hub.ca_cert_path().to_owned(),
        cs,
        n: MEM_MESSAGES,
        window: 1,
        qos: 1,
        max_send: DEFAULT_MAX_SEND,
        outbox: false,
        async_layer: false,
        wasm: wasm.to_owned(),
    };
    let mut child = ChildProc::start(sender, &config, python)?;
    let line = child.next(RUN_TIMEOUT).await.with_context(|| format!("{} memory run", sender.name()))?;
    child.finish().await;
    let v: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
    let get = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let k = count as f64;
    Ok(match sender {
        Sender::Tether => {
            let (base, spawned, connected) = (get("rss_base_kib"), get("rss_spawned_kib"), get("rss_connected_kib"));
            let per_device = (connected - base) / k;
            let per_connection = (connected - spawned) / k;
            (
                per_device,
                format!(
                    "RSS delta (freed heap returned first) over {count} agents, each with one connected Client, / {count} (of which the agent instance {:.0} KiB, the Client's connection {per_connection:.0} KiB, {:.0} KiB of it the host's heap; the agent's linear memory grows {:.0} → {:.0} KiB on connecting); host process {base:.0} KiB before the agents",
                    (spawned - base) / k,
                    (get("heap_connected_kib") - get("heap_spawned_kib")) / k,
                    get("linear_spawned_kib"),
                    get("linear_connected_kib"),
                ),
            )
        }
        Sender::Rumqttc => {
            let (base, connected) = (get("rss_base_kib"), get("rss_connected_kib"));
            let heap = (get("heap_connected_kib") - get("heap_base_kib")) / k;
            ((connected - base) / k, format!("RSS delta (freed heap returned first) over {count} connections (AsyncClient + EventLoop task each) / {count}, {heap:.0} KiB of it heap; process {base:.0} KiB before"))
        }
        Sender::Python => {
            let (start, one, all) = (get("rss_start_kib"), get("rss_one_kib"), get("rss_all_kib"));
            (
                one,
                format!(
                    "RSS of one python process with one connected client (interpreter alone {start:.0} KiB); each further client in the same process +{:.0} KiB ({count} clients)",
                    (all - one) / (k - 1.0)
                ),
            )
        }
    })
}

async fn parent(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let state = tempfile::tempdir()?;
    let hub = Hub::start(HubConfig { mqtt_port: MQTT_PORT, https_port: 0, state_dir: state.path().to_owned(), ..HubConfig::default() })
        .await
        .context("starting the emulator on port 8883 (is something else using it?)")?;
    let wasm = tether_tests::build_agent("d2c-bench")?;
    let python = if args.python { Some(tether_tests::python()?) } else { None };
    let py = python.as_deref();
    let (n, w) = (args.messages, args.window);

    let mut specs = Vec::new();
    for qos in [0u8, 1] {
        let spec = |sender, window, label: String| Spec { sender, qos, window, outbox: false, async_layer: false, label };
        specs.push(spec(Sender::Tether, w, format!("Tether agent, max_pending_send_requests = {w}")));
        specs.push(Spec { async_layer: true, ..spec(Sender::Tether, w, format!("Tether agent, async DeviceClient, {w} tasks")) });
        if qos == 1 {
            // The outbox publishes at QoS 1 and removes a message on its PUBACK.
            specs.push(Spec { outbox: true, ..spec(Sender::Tether, w, format!("Tether agent, durable outbox, max_pending_send_requests = {w}")) });
        }
        specs.push(spec(Sender::Tether, DEFAULT_MAX_SEND, format!("Tether agent, default max_pending_send_requests = {DEFAULT_MAX_SEND}")));
        specs.push(spec(Sender::Rumqttc, w, format!("native rumqttc, {w} pending")));
    }
    if python.is_some() {
        let label = format!("Python azure-iot-device 2.14.0 (asyncio), {w} concurrent sends");
        specs.push(Spec { sender: Sender::Python, qos: 1, window: w, outbox: false, async_layer: false, label });
    }
    if let Some(only) = &args.only {
        specs.retain(|s| only.split('|').any(|text| s.label.contains(text)));
    }
    let hog = if args.hog {
        Some(Command::new(std::env::current_exe()?).env(HOG_ENV, "1").kill_on_drop(true).spawn().context("starting the CPU hog")?)
    } else {
        None
    };
    // Rounds outside, senders inside, so drift in machine load spreads over all of them.
    let mut runs: Vec<Vec<Outcome>> = specs.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for (i, spec) in specs.iter().enumerate() {
            eprintln!("d2c: round {}/{}: {} at QoS {} ...", round + 1, args.rounds, spec.label, spec.qos);
            let o = run_one(&hub, spec, n, &wasm, py, round * specs.len() + i).await?;
            let batching = o.events_per_call.map_or(String::new(), |e| format!(", {e:.1} events per agent call"));
            eprintln!("d2c:   {:.0} msg/s, {} of {n} at the hub, {} errors{batching}", o.rate(), o.received, o.errors);
            runs[i].push(o);
        }
    }
    let ratios = cpu_ratios(&specs, &runs);
    // Per row, the run with the median rate (its latencies too).
    let outcomes: Vec<Outcome> = runs
        .into_iter()
        .filter_map(|mut r| {
            r.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let mid = r.len() / 2;
            (mid < r.len()).then(|| r.swap_remove(mid))
        })
        .collect();
    drop(hog);
    let mut mem = Vec::new();
    let mut senders = vec![(Sender::Tether, "Tether agent"), (Sender::Rumqttc, "native rumqttc")];
    if python.is_some() {
        senders.push((Sender::Python, "Python azure-iot-device"));
    }
    for (sender, name) in senders {
        eprintln!("d2c: memory, {name} ...");
        mem.push((name, memory(&hub, sender, args.devices, &wasm, py).await?));
    }
    hub.shutdown().await;
    print_report(&outcomes, &ratios, &mem, &args, started.elapsed());
    Ok(())
}

fn print_report(outcomes: &[Outcome], ratios: &[CpuRatio], mem: &[(&str, (f64, String))], args: &Args, took: Duration) {
    let n = args.messages;
    let find = |s: Sender, qos: u8, default: bool| outcomes.iter().find(|o| o.spec.is_plain(s, qos, default)).map(Outcome::rate);
    let python = find(Sender::Python, 1, false);
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    println!(
        "{n} messages per run (100-byte JSON body, one application property), MQTT over TLS on loopback; median of {} rounds{}\n",
        args.rounds,
        if args.hog { "; a CPU hog spinning on one core meanwhile" } else { "" }
    );
    println!("| sender | QoS | messages/s | latency p50 | latency p99 | sender CPU / msg | hub CPU / msg | at hub | errors | × Python | % of rumqttc |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let vs_py = python.map_or("—".into(), |p| format!("{:.1}×", o.rate() / p));
        let vs_native = find(Sender::Rumqttc, o.spec.qos, false).map_or("—".into(), |r| format!("{:.0} %", 100.0 * o.rate() / r));
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.1} µs | {:.1} µs | {}/{n} | {} | {vs_py} | {vs_native} |",
            o.spec.label,
            o.spec.qos,
            o.rate(),
            ms(o.p50_us),
            ms(o.p99_us),
            o.cpu_us_per_msg,
            o.hub_cpu_us_per_msg,
            o.received,
            o.errors
        );
    }
    println!("\nTargets (Tether agent with max_pending_send_requests raised; the default in brackets):");
    for qos in [0u8, 1] {
        let (Some(t), Some(d), Some(r)) = (find(Sender::Tether, qos, false), find(Sender::Tether, qos, true), find(Sender::Rumqttc, qos, false)) else { continue };
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        if let Some(p) = python {
            let py_note = if qos == 0 { " (Python's only mode is QoS 1)" } else { "" };
            println!("- QoS {qos}: {:.1}× Python{py_note} [{:.1}×], target ≥ 10×: {}", t / p, d / p, verdict(t / p >= 10.0));
        }
        println!("- QoS {qos}: {:.0} % of native rumqttc [{:.0} %], target ≥ 50 %: {}", 100.0 * t / r, 100.0 * d / r, verdict(t / r >= 0.5));
    }
    for r in ratios {
        let target = if r.qos == 0 { 1.5 } else { 1.25 };
        println!(
            "- QoS {}: sender CPU per message {:.2}× native rumqttc's (median of the rounds' ratios; {:.2}–{:.2}), target ≤ {target}×: {}",
            r.qos,
            r.median,
            r.low,
            r.high,
            if r.median <= target { "met" } else { "NOT met" }
        );
    }
    let plain_at = |qos: u8| outcomes.iter().find(|o| o.spec.is_plain(Sender::Tether, qos, false));
    for qos in [0u8, 1] {
        let (Some(plain), Some(awaited)) = (plain_at(qos), outcomes.iter().find(|o| o.spec.async_layer && o.spec.qos == qos)) else { continue };
        let cost = awaited.cpu_us_per_msg / plain.cpu_us_per_msg - 1.0;
        println!(
            "- async layer, QoS {qos}: {:.0} % of the callbacks' throughput, {:.1} vs {:.1} µs sender CPU per message ({:+.0} %), target ≤ +10 %: {}",
            100.0 * awaited.rate() / plain.rate(),
            awaited.cpu_us_per_msg,
            plain.cpu_us_per_msg,
            100.0 * cost,
            if cost <= 0.10 { "met" } else { "NOT met" }
        );
    }
    let plain = plain_at(1);
    if let (Some(plain), Some(outbox)) = (plain, outcomes.iter().find(|o| o.spec.outbox)) {
        let share = outbox.rate() / plain.rate();
        println!(
            "- durable outbox, QoS 1, {} pending: {:.0} % of the throughput without it ({:.1} vs {:.1} µs sender CPU per message), target ≥ 75 %: {}",
            plain.spec.window,
            100.0 * share,
            outbox.cpu_us_per_msg,
            plain.cpu_us_per_msg,
            if share >= 0.75 { "met" } else { "NOT met" }
        );
    }
    if let Some((_, (kib, _))) = mem.iter().find(|(name, _)| name.starts_with("Tether")) {
        println!("- memory per connected device: Tether {kib:.0} KiB, target ≤ 110 KiB: {}", if *kib <= 110.0 { "met" } else { "NOT met" });
    }
    println!("\n| sender | memory per connected device | measured as |\n|---|---:|---|");
    for (name, (kib, how)) in mem {
        println!("| {name} | {:.0} KiB | {how} |", kib);
    }
    println!("\n(bench took {:.0} s)", took.as_secs_f64());
}

// ---------------------------------------------------------------------------------------
// Children: the senders.

async fn child(config: ChildConfig) -> anyhow::Result<()> {
    match config.kind {
        Sender::Tether => tether_child(&config).await,
        Sender::Rumqttc => rumqttc_child(&config).await,
        Sender::Python => bail!("the Python sender is a script"),
    }
}

/// A host with one `d2c-bench` agent per connection string; runs or measures memory.
async fn tether_child(config: &ChildConfig) -> anyhow::Result<()> {
    let rss_start = tether_tests::bench::rss_kib();
    let k = config.cs.len();
    let ca = config.ca_path.clone();
    let t = TestHost::start(|c| {
        c.trusted_ca_files = vec![ca];
        c.max_agents = k as u32 + 8;
        c.slow_lane = std::env::var_os("D2C_NO_SLOW_LANE").is_none();
    })
    .await?;
    let module = t.host.runtime().load_file(&config.wasm)?;
    tether_tests::bench::release_free_memory();
    let rss_base = tether_tests::bench::rss_kib();
    let ids: Vec<String> = (0..k).map(|i| format!("d2c-{i}")).collect();
    for id in &ids {
        t.host.spawn(id, AgentSettings { id: Some(id.clone()), ..AgentSettings::default() }, module.clone())?;
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    while ids.iter().any(|id| !matches!(t.host.status(id), Some((AgentStatus::Running, _)))) {
        ensure!(Instant::now() < deadline, "agents did not all start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tether_tests::bench::release_free_memory();
    let (rss_spawned, heap_spawned) = (tether_tests::bench::rss_kib(), tether_tests::bench::heap_kib());
    // No kept-alive connections: the agents' HTTP connections to this client would count
    // as the MQTT connections' memory.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let call = |id: &str, path: &str, query: Vec<(&str, String)>| {
        let url = reqwest::Url::parse_with_params(&t.url(id, path), &query);
        let http = http.clone();
        async move {
            let response = http.get(url?).timeout(RUN_TIMEOUT).send().await?;
            anyhow::Ok(response.text().await?)
        }
    };
    let linear_kib = async |ids: &[String]| -> anyhow::Result<f64> {
        let answers = join_all(ids.iter().map(|id| call(id, "/mem", Vec::new())).collect()).await?;
        let mut total = 0.0;
        for a in answers {
            total += a?.parse::<f64>()?;
        }
        Ok(total / ids.len().max(1) as f64)
    };
    let linear_spawned = if config.mode == "mem" { linear_kib(&ids).await? } else { 0.0 };
    let mut connects = Vec::new();
    for (id, cs) in ids.iter().zip(&config.cs) {
        let mut query = vec![("cs", cs.clone()), ("port", MQTT_PORT.to_string()), ("qos", config.qos.to_string()), ("max_send", config.max_send.to_string())];
        if config.outbox {
            query.push(("outbox", "d2c".to_owned()));
        }
        if config.async_layer {
            query.push(("async", "1".to_owned()));
        }
        connects.push(call(id, "/new", query));
    }
    for answer in join_all(connects).await? {
        let answer = answer?;
        ensure!(answer == "connected 0", "agent: {answer}");
    }
    if config.mode == "run" {
        say("ready");
        wait_for_line().await?;
        let metrics = || t.host.agent(&ids[0]).map(|a| a.metrics).context("the agent is gone");
        let before = metrics()?;
        let summary = call(&ids[0], "/run", vec![("n", config.n.to_string()), ("window", config.window.to_string())]).await?;
        let after = metrics()?;
        let mut summary: Value = serde_json::from_str(&summary).with_context(|| format!("agent: {summary}"))?;
        summary["events_per_call"] = json!((after.events - before.events) as f64 / (after.calls - before.calls).max(1) as f64);
        say(&summary.to_string());
        wait_for_line().await?;
    } else {
        let runs: Vec<_> = ids.iter().map(|id| call(id, "/run", vec![("n", config.n.to_string()), ("window", "1".into())])).collect();
        for summary in join_all(runs).await? {
            let summary = summary?;
            ensure!(summary.contains("\"errors\":0"), "agent: {summary}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        tether_tests::bench::release_free_memory();
        let (rss_connected, heap_connected) = (tether_tests::bench::rss_kib(), tether_tests::bench::heap_kib());
        let linear_connected = linear_kib(&ids).await?;
        say(&json!({
            "rss_start_kib": rss_start, "rss_base_kib": rss_base, "rss_spawned_kib": rss_spawned, "rss_connected_kib": rss_connected,
            "linear_spawned_kib": linear_spawned, "linear_connected_kib": linear_connected,
            "heap_spawned_kib": heap_spawned, "heap_connected_kib": heap_connected,
        })
        .to_string());
    }
    t.stop().await;
    Ok(())
}

/// Runs the futures as tasks at once; their outputs in order.
async fn join_all<F>(futures: Vec<F>) -> anyhow::Result<Vec<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await?);
    }
    Ok(out)
}

/// `HostName`, `DeviceId`, `SharedAccessKey` of a device connection string.
fn parse_cs(cs: &str) -> anyhow::Result<(String, String, String)> {
    let get = |k: &str| cs.split(';').find_map(|p| p.strip_prefix(k)?.strip_prefix('=')).map(str::to_owned).with_context(|| format!("connection string lacks {k}"));
    Ok((get("HostName")?, get("DeviceId")?, get("SharedAccessKey")?))
}

fn tls_config(ca_path: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_path)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(Arc::new(rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth()))
}

/// A connected rumqttc client (CONNACK seen) and its event loop.
async fn rumqttc_connect(cs: &str, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop, String)> {
    use rumqttc::{ConnectReturnCode, Event, MqttOptions, Packet, TlsConfiguration, Transport};
    let (host, id, key) = parse_cs(cs)?;
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let token = tether_hub_emulator::generate_sas_token(&format!("{host}/devices/{id}"), &key, None, expiry).context("bad device key")?;
    let mut options = MqttOptions::new(id.clone(), host.clone(), MQTT_PORT);
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), token)
        .set_request_channel_capacity(1000)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let connack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
                return anyhow::Ok(ack.code);
            }
        }
    })
    .await
    .context("no CONNACK")??;
    ensure!(connack == ConnectReturnCode::Success, "CONNACK {connack:?}");
    Ok((client, eventloop, format!("devices/{id}/messages/events/bench=d2c")))
}

/// Sends `n` messages keeping `window` pending; returns sorted latencies and the event
/// loop. Latency: publish call → `Outgoing::Publish` (QoS 0) or PUBACK (QoS 1).
async fn rumqttc_send(client: &rumqttc::AsyncClient, mut eventloop: rumqttc::EventLoop, topic: &str, n: usize, window: usize, qos: u8) -> anyhow::Result<(Vec<Duration>, rumqttc::EventLoop)> {
    use rumqttc::{Event, Outgoing, Packet, QoS};
    let semaphore = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    let queued: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let driver = {
        let (semaphore, queued) = (semaphore.clone(), queued.clone());
        tokio::spawn(async move {
            let mut acks: HashMap<u16, Instant> = HashMap::new();
            let mut latencies = Vec::with_capacity(n);
            while latencies.len() < n {
                match eventloop.poll().await? {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        let Some(sent) = queued.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { continue };
                        if qos == 0 {
                            latencies.push(sent.elapsed());
                            semaphore.add_permits(1);
                        } else {
                            acks.insert(pkid, sent);
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(sent) = acks.remove(&ack.pkid) {
                            latencies.push(sent.elapsed());
                            semaphore.add_permits(1);
                        }
                    }
                    _ => {}
                }
            }
            anyhow::Ok((latencies, eventloop))
        })
    };
    let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    for i in 0..n {
        semaphore.acquire().await?.forget();
        queued.lock().unwrap_or_else(|p| p.into_inner()).push_back(Instant::now());
        // Like the host: a non-blocking request (the queue holds 1000, the window less).
        client.try_publish(topic, qos, false, body(i))?;
    }
    let (mut latencies, eventloop) = driver.await??;
    latencies.sort();
    Ok((latencies, eventloop))
}

async fn rumqttc_child(config: &ChildConfig) -> anyhow::Result<()> {
    let tls = tls_config(&config.ca_path)?;
    if config.mode == "run" {
        let cs = config.cs.first().context("no connection string")?;
        let (client, eventloop, topic) = rumqttc_connect(cs, &tls).await?;
        say("ready");
        wait_for_line().await?;
        let started = Instant::now();
        let (latencies, mut eventloop) = rumqttc_send(&client, eventloop, &topic, config.n, config.window, config.qos).await?;
        let elapsed = started.elapsed();
        say(&json!({"n": config.n, "errors": 0, "elapsed_us": elapsed.as_micros() as u64, "p50_us": percentile_us(&latencies, 0.5), "p99_us": percentile_us(&latencies, 0.99)}).to_string());
        wait_for_line().await?;
        // Keep the connection up until the hub has everything (the parent ends us).
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async { while eventloop.poll().await.is_ok() {} }).await;
        return Ok(());
    }
    tether_tests::bench::release_free_memory();
    let (rss_base, heap_base) = (tether_tests::bench::rss_kib(), tether_tests::bench::heap_kib());
    let mut clients = Vec::new();
    for cs in &config.cs {
        let (client, eventloop, topic) = rumqttc_connect(cs, &tls).await?;
        let (_, mut eventloop) = rumqttc_send(&client, eventloop, &topic, config.n, 1, 1).await?;
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        clients.push((client, driver));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tether_tests::bench::release_free_memory();
    say(&json!({"rss_base_kib": rss_base, "rss_connected_kib": tether_tests::bench::rss_kib(), "heap_base_kib": heap_base, "heap_connected_kib": tether_tests::bench::heap_kib()}).to_string());
    for (_, driver) in &clients {
        driver.abort();
    }
    Ok(())
}
