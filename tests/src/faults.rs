//! The fault rig of "nothing lost": a hub emulator with one device, and the configuration
//! of a real `tether run` of the `az-sender` agent sending numbered telemetry to it through
//! the AzureIoTHub client's durable outbox. Shared by `tests/faults.rs` (correctness) and
//! `benches/faults.rs` (the table of the same faults).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_hub_emulator::{EventFilter, Hub, HubConfig};

use crate::tether_run::TetherRun;
use crate::{DeviceSim, build_agent};

/// How long any step may take.
pub const WAIT: Duration = Duration::from_secs(90);
/// The agent's `max_pending_send_requests`: at most this many can be published twice.
pub const WINDOW: usize = 10;

/// What a fault did to the messages, as the hub counts them.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Accepted by `send_message`.
    pub sent: usize,
    /// Distinct messages at the hub.
    pub arrived: usize,
    pub lost: Vec<u64>,
    /// Copies beyond the first, by message id.
    pub duplicated: usize,
    /// Numbers that arrived as two different messages (must not happen).
    pub reused: usize,
}

impl Tally {
    /// Nothing accepted was lost, and no message arrived more often than a lost
    /// acknowledgement explains.
    pub fn check(&self, fault: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.lost.is_empty(), "{fault}: lost {:?}", self.lost);
        anyhow::ensure!(self.reused == 0, "{fault}: a number was sent as two different messages");
        anyhow::ensure!(self.duplicated <= WINDOW, "{fault}: {} duplicates, more than the {WINDOW} that can be in flight", self.duplicated);
        Ok(())
    }
}

/// The hub, a device and the configuration of a `tether run` of `az-sender` sending to it.
pub struct Rig {
    pub hub: Hub,
    pub device: String,
    config: PathBuf,
    agent: PathBuf,
    dir: tempfile::TempDir,
}

impl Rig {
    /// `count` messages, one every `interval` seconds.
    pub async fn start(count: u64, interval: f64) -> anyhow::Result<Rig> {
        Rig::start_with(count, interval, Source::Timer).await
    }

    /// `count` messages from `source`, one every `interval` seconds.
    pub async fn start_with(count: u64, interval: f64, source: Source) -> anyhow::Result<Rig> {
        let agent = build_agent("az-sender")?;
        let dir = tempfile::tempdir()?;
        let hub = Hub::start(HubConfig { mqtt_port: 0, https_port: 0, state_dir: dir.path().join("hub"), ..HubConfig::default() }).await?;
        let device = "sender".to_owned();
        let cs = hub.create_device(&device)?.connection_string;
        let serial = matches!(source, Source::Serial).then(|| dir.path().join("ttyBOARD"));
        let config = write_config(dir.path(), &cs, hub.ca_cert_path(), hub.mqtt_addr().port(), count, interval, serial.as_deref())?;
        Ok(Rig { hub, device, config, agent, dir })
    }

    /// The stable path of the board's serial line (with [`Source::Serial`]).
    pub fn serial_path(&self) -> PathBuf {
        self.dir.path().join("ttyBOARD")
    }

    /// Starts a `tether run` of the agent (again: it goes on where the last one stopped).
    pub async fn run(&self) -> anyhow::Result<TetherRun> {
        TetherRun::start(&self.agent, &self.config, WAIT).await
    }

    /// The telemetry at the hub so far: seq → message ids of each copy.
    pub fn arrived(&self) -> BTreeMap<u64, Vec<String>> {
        let filter = EventFilter { device_id: Some(self.device.clone()), kind: Some("telemetry".into()) };
        let events: Vec<Value> = self.hub.control().events(0, &filter).iter().filter_map(|e| serde_json::to_value(e).ok()).collect();
        by_number(&events)
    }

    /// Waits until every message in `accepted` is at the hub.
    pub async fn wait_arrived(&self, accepted: &BTreeSet<u64>) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let arrived = self.arrived();
            let missing: Vec<u64> = accepted.iter().filter(|s| !arrived.contains_key(s)).copied().collect();
            if missing.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{} accepted messages never arrived: {missing:?}", missing.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the first telemetry recorded after event `since`; returns when it came.
    pub async fn first_message_after(&self, since: u64) -> anyhow::Result<Instant> {
        let filter = EventFilter { device_id: Some(self.device.clone()), kind: Some("telemetry".into()) };
        let events = self.hub.control().wait_events(since, &filter, WAIT).await;
        anyhow::ensure!(!events.is_empty(), "no message at the hub after the fault");
        Ok(Instant::now())
    }

    /// Counts what arrived of `accepted`.
    pub fn tally(&self, accepted: &BTreeSet<u64>) -> Tally {
        tally(accepted, &self.arrived(), &BTreeSet::new())
    }
}

/// Counts what arrived of `accepted`; `acked` were acknowledged by a hub whose record is
/// gone (killed), so they count as arrived.
fn tally(accepted: &BTreeSet<u64>, arrived: &BTreeMap<u64, Vec<String>>, acked: &BTreeSet<u64>) -> Tally {
    {
        let distinct = |mids: &Vec<String>| mids.iter().collect::<BTreeSet<_>>().len();
        Tally {
            sent: accepted.len(),
            arrived: arrived.len(),
            lost: accepted.iter().filter(|s| !arrived.contains_key(s) && !acked.contains(s)).copied().collect(),
            duplicated: arrived.values().map(|mids| mids.len() - distinct(mids)).sum(),
            reused: arrived.values().filter(|mids| distinct(mids) > 1).count(),
        }
    }
}

/// Where the agent's numbers come from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// Its own timer.
    Timer,
    /// Readings from a board on a serial line (`device-sim --readings`), at
    /// [`Rig::serial_path`].
    Serial,
}

/// Writes the `tether run` configuration of `az-sender` in `dir`: `count` messages, one
/// every `interval` seconds, to the device of `cs` on a hub trusting `ca`; numbered by the
/// board on `serial` if given.
fn write_config(dir: &Path, cs: &str, ca: &Path, port: u16, count: u64, interval: f64, serial: Option<&Path>) -> anyhow::Result<PathBuf> {
    let config = dir.join("tether.toml");
    let path = |p: &str| dir.join(p).display().to_string();
    let (source, device) = match serial {
        Some(line) => ("source = \"device\"\n", format!("\n[agent.device]\npath = {:?}\n", line.display().to_string())),
        None => ("", String::new()),
    };
    std::fs::write(
        &config,
        format!(
            "[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = {:?}\ncache_dir = {:?}\ntrusted_ca_files = [{:?}]\n\n\
             [agent]\nid = \"az\"\n\n[agent.config]\ncs = {cs:?}\nport = \"{port}\"\ncount = \"{count}\"\ninterval = \"{interval}\"\n{source}{device}",
            path("store"),
            path("cache"),
            ca.display().to_string(),
        ),
    )?;
    Ok(config)
}

/// Telemetry events (as JSON) by their `seq` property: the message ids of each copy.
fn by_number<'a>(events: impl IntoIterator<Item = &'a Value>) -> BTreeMap<u64, Vec<String>> {
    let mut arrived: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for event in events {
        let seq = event["properties"]["seq"].as_str().and_then(|s| s.parse().ok());
        let mid = event["systemProperties"]["messageId"].as_str().unwrap_or_default().to_owned();
        if let Some(seq) = seq {
            arrived.entry(seq).or_default().push(mid);
        }
    }
    arrived
}

/// The numbers the agent logged as accepted.
pub fn accepted(lines: &[String]) -> BTreeSet<u64> {
    lines.iter().filter_map(|l| l.split("accepted ").nth(1)?.split_whitespace().next()?.parse().ok()).collect()
}

/// Whether the agent logged at least `n` accepted.
pub fn count_accepted(n: usize) -> impl Fn(&[String]) -> bool {
    move |lines| accepted(lines).len() >= n
}

/// Whether the agent has accepted every message it was to send.
pub fn all_accepted(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains("all accepted"))
}

/// What one fault did: the tally, the time from the fault's end to the first new message
/// at the hub, and the outbox's depth when the fault ended (or, after a kill, what the new
/// instance found left).
#[derive(Debug, Clone)]
pub struct Report {
    pub fault: String,
    pub tally: Tally,
    pub recovery: Option<Duration>,
    pub depth: Option<usize>,
}

impl Report {
    /// One line for the test's output.
    pub fn line(&self) -> String {
        let t = &self.tally;
        format!(
            "{}: sent {} arrived {} lost {} duplicated {} recovery {} depth {}",
            self.fault,
            t.sent,
            t.arrived,
            t.lost.len(),
            t.duplicated,
            self.recovery.map_or("-".to_owned(), |r| format!("{:.2} s", r.as_secs_f64())),
            self.depth.map_or("-".to_owned(), |d| d.to_string()),
        )
    }
}

/// The outbox's depth, from the agent.
async fn depth(run: &TetherRun) -> anyhow::Result<usize> {
    Ok(reqwest::get(format!("{}/depth", run.url)).await?.text().await?.trim().parse()?)
}

/// What a restarted instance found in the outbox, from its log line.
fn left_over(lines: &[String]) -> Option<usize> {
    lines.iter().find_map(|l| l.split("outbox azure-iot-hub: ").nth(1)?.split_whitespace().next()?.parse().ok())
}

/// Waits until the agent accepted all its messages and all are at the hub; returns them.
async fn finish(rig: &Rig, run: &TetherRun) -> anyhow::Result<BTreeSet<u64>> {
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let sent = accepted(&run.lines());
    rig.wait_arrived(&sent).await?;
    Ok(sent)
}

/// A hub fault (KillTcp, ShutDownMqtt, InvokeThrottling) of `duration` after 20 of 300
/// messages, one every 50 ms.
pub async fn hub_fault(fault: tether_hub_emulator::Fault, duration: Duration) -> anyhow::Result<Report> {
    let rig = Rig::start(300, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    rig.hub.control().inject_fault(Some(&rig.device), fault, duration);
    let ends = Instant::now() + duration;
    tokio::time::sleep_until(ends.into()).await;
    let since = rig.hub.control().last_event_seq();
    let depth = depth(&run).await?;
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(ends);
    let sent = finish(&rig, &run).await?;
    Ok(Report { fault: format!("{fault:?} {} s", duration.as_secs()), tally: rig.tally(&sent), recovery: Some(recovery), depth: Some(depth) })
}

/// The hub drops the connection as at token expiry, after 20 of 100 messages.
pub async fn token_expiry() -> anyhow::Result<Report> {
    let rig = Rig::start(100, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    let at = Instant::now();
    rig.hub.control().expire_token(&rig.device)?;
    let since = rig.hub.control().last_event_seq();
    let depth = depth(&run).await?;
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(at);
    let sent = finish(&rig, &run).await?;
    Ok(Report { fault: "token expiry forced by the hub".into(), tally: rig.tally(&sent), recovery: Some(recovery), depth: Some(depth) })
}

/// The agent traps with messages piled up in its outbox during an 8 s outage.
pub async fn agent_crash() -> anyhow::Result<Report> {
    let rig = Rig::start(150, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    let outage = Duration::from_secs(8);
    rig.hub.control().inject_fault(Some(&rig.device), tether_hub_emulator::Fault::ShutDownMqtt, outage);
    let ends = Instant::now() + outage;
    run.wait_until("60 accepted", WAIT, count_accepted(60)).await?;
    let depth = depth(&run).await?;
    anyhow::ensure!(depth >= 30, "the outbox holds what the hub did not get: {depth}");
    // The agent answers nothing: it traps.
    let _ = reqwest::get(format!("{}/panic", run.url)).await;
    run.wait_until("the crash", WAIT, |lines| lines.iter().any(|l| l.contains("agent crashed"))).await?;
    tokio::time::sleep_until(ends.into()).await;
    let since = rig.hub.control().last_event_seq();
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(ends);
    let sent = finish(&rig, &run).await?;
    Ok(Report { fault: "agent panic, outbox full".into(), tally: rig.tally(&sent), recovery: Some(recovery), depth: Some(depth) })
}

/// The board's serial line unplugged for `outage` after 20 of 150 readings (one every
/// 50 ms), then plugged back in on a new pty at the same path. The board keeps the readings
/// it takes meanwhile and sends each until the agent says it has it; every one of the 150
/// must reach the hub.
pub async fn serial_replug(outage: Duration) -> anyhow::Result<Report> {
    const READINGS: u64 = 150;
    let rig = Rig::start_with(READINGS, 0.05, Source::Serial).await?;
    let line = rig.serial_path();
    let line_arg = line.display().to_string();
    let mut board = DeviceSim::start(&["--link", &line_arg, "--readings", &READINGS.to_string(), "--interval", "0.05", "--control"])?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    board.command("unplug")?;
    tokio::time::sleep(outage).await;
    board.command("replug")?;
    let ends = Instant::now();
    let since = rig.hub.control().last_event_seq();
    let depth = depth(&run).await?;
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(ends);
    let sent = finish(&rig, &run).await?;
    let taken: BTreeSet<u64> = (1..=READINGS).collect();
    anyhow::ensure!(sent == taken, "the agent accepted {} readings of the board's {READINGS}", sent.len());
    rig.wait_arrived(&taken).await?;
    Ok(Report { fault: format!("serial line unplugged {} s", outage.as_secs()), tally: rig.tally(&taken), recovery: Some(recovery), depth: Some(depth) })
}

/// `kill -9` of tether after `before` of 150 messages, during a 6 s hub outage if
/// `outage`; a new `tether run` over the same store sends what the first one accepted.
pub async fn kill_9(outage: bool, before: usize) -> anyhow::Result<Report> {
    let rig = Rig::start(150, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    if outage {
        rig.hub.control().inject_fault(Some(&rig.device), tether_hub_emulator::Fault::ShutDownMqtt, Duration::from_secs(6));
    }
    run.wait_until("enough accepted", WAIT, count_accepted(before)).await?;
    let mut sent = accepted(&run.kill_9().await?);
    let since = rig.hub.control().last_event_seq();
    let restarted = Instant::now();
    let run = rig.run().await?;
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(restarted);
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let lines = run.lines();
    sent.extend(accepted(&lines));
    rig.wait_arrived(&sent).await?;
    let fault = if outage { "kill -9 of tether during an outage" } else { "kill -9 of tether while sending" };
    Ok(Report { fault: fault.into(), tally: rig.tally(&sent), recovery: Some(recovery), depth: left_over(&lines) })
}

/// `kill -9` of a `tether hub --persist` process after 20 of 150 messages, and a new one on
/// the same state and ports 3 s later. Messages the killed hub acknowledged (the agent
/// logged `acked N` before it noticed the loss) count as arrived: its record died with it.
pub async fn hub_kill_9() -> anyhow::Result<Report> {
    let agent = build_agent("az-sender")?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("hub");
    // The ports must stay the same across the restart, so they are chosen here; another
    // process may take a free port first, and then the next pair is tried.
    let mut attempts = 0;
    let (hub, mqtt_port, https_port) = loop {
        let (mqtt_port, https_port) = (crate::free_port(), crate::free_port());
        match Hub::start(HubConfig { mqtt_port, https_port, state_dir: state.clone(), persist: true, ..HubConfig::default() }).await {
            Ok(hub) => break (hub, mqtt_port, https_port),
            Err(e) if attempts < 5 => {
                attempts += 1;
                eprintln!("ports {mqtt_port}/{https_port} taken ({e}); trying others");
            }
            Err(e) => return Err(e.into()),
        }
    };
    // The device, kept in the hub's state for the processes that follow (and so is the
    // control token, in `control-token` there).
    let (cs, ca, control_token) = {
        let cs = hub.create_device("sender")?.connection_string;
        let ca = hub.ca_cert_path().to_owned();
        let control_token = hub.control_token().to_owned();
        hub.shutdown().await;
        (cs, ca, control_token)
    };
    let hub_args = |ports: &[String; 2]| {
        let s = state.display().to_string();
        ["hub", "--persist", "--state-dir", &s, "--mqtt-port", &ports[0], "--https-port", &ports[1], "--page-listen", "127.0.0.1:0"].map(std::ffi::OsString::from)
    };
    let ports = [mqtt_port.to_string(), https_port.to_string()];
    let start_hub = || async {
        let args = hub_args(&ports);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        TetherRun::spawn(&args, "emulator running", WAIT).await
    };
    let hub = start_hub().await?;
    let config = write_config(dir.path(), &cs, &ca, mqtt_port, 150, 0.05, None)?;
    let run = TetherRun::start(&agent, &config, WAIT).await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    let lines_before = run.lines().len();
    hub.kill_9().await?;
    // PUBACKs reach the agent before the loss of their connection: what it logged as acked
    // by then, the killed hub had.
    run.wait_until("the loss", WAIT, |lines| lines[lines_before..].iter().any(|l| l.contains("disconnected 1100"))).await?;
    let lines = run.lines();
    let loss = lines.iter().skip(lines_before).position(|l| l.contains("disconnected 1100")).map_or(lines.len(), |p| lines_before + p);
    let acked: BTreeSet<u64> = lines[..loss].iter().filter_map(|l| l.split("acked ").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    let down = Duration::from_secs(3);
    tokio::time::sleep(down).await;
    let depth = depth(&run).await?;
    let restarted = Instant::now();
    let _hub = start_hub().await?;
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let sent = accepted(&run.lines());
    // The new hub's record, through its control API.
    let http = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?]).build()?;
    let url = format!("https://localhost:{https_port}/emulator/events?since=0&deviceId=sender&type=telemetry");
    let deadline = Instant::now() + WAIT;
    let mut recovery = None;
    let arrived = loop {
        let response = http.get(&url).bearer_auth(&control_token).send().await?.error_for_status()?;
        let body: Value = serde_json::from_str(&response.text().await?)?;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        // Polled every 100 ms: the first poll that saw a message bounds the recovery.
        if recovery.is_none() && !events.is_empty() {
            recovery = Some(restarted.elapsed());
        }
        let arrived = by_number(&events);
        if sent.iter().all(|s| arrived.contains_key(s) || acked.contains(s)) || Instant::now() > deadline {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(Report { fault: "kill -9 of the hub, restarted with --persist after 3 s".into(), tally: tally(&sent, &arrived, &acked), recovery, depth: Some(depth) })
}
