//! Nothing lost: numbered telemetry from the `az-sender` agent, in a real `tether run`,
//! through the AzureIoTHub client's durable outbox with reconnect on
//! (`ClientOptions::resilient`), across every fault the hub emulator injects, a crash of
//! the agent and `kill -9` of tether. Each test counts at the hub: the messages
//! `send_message` accepted, those lost (must be 0), the duplicates by message id (a message
//! published again because its PUBACK was lost: allowed, counted), and the time from the
//! fault's end to the first new message at the hub. Rates are modest: these are
//! correctness tests; the fault benchmark measures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_hub_emulator::{EventFilter, Fault, Hub, HubConfig};
use tether_tests::build_agent;
use tether_tests::tether_run::TetherRun;

const WAIT: Duration = Duration::from_secs(90);
/// The agent's `max_pending_send_requests`: at most this many can be published twice.
const WINDOW: usize = 10;

/// The hub, a device and the configuration of a `tether run` of `az-sender` sending to it.
struct Rig {
    hub: Hub,
    device: String,
    config: PathBuf,
    agent: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// `count` messages, one every `interval` seconds.
    async fn start(count: u64, interval: f64) -> anyhow::Result<Rig> {
        let agent = build_agent("az-sender")?;
        let dir = tempfile::tempdir()?;
        let hub = Hub::start(HubConfig { mqtt_port: 0, https_port: 0, state_dir: dir.path().join("hub"), ..HubConfig::default() }).await?;
        let device = "sender".to_owned();
        let cs = hub.create_device(&device)?.connection_string;
        let config = dir.path().join("tether.toml");
        let path = |p: &str| dir.path().join(p).display().to_string();
        std::fs::write(
            &config,
            format!(
                "[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = {:?}\ncache_dir = {:?}\ntrusted_ca_files = [{:?}]\n\n\
                 [agent]\nid = \"az\"\n\n[agent.config]\ncs = {cs:?}\nport = \"{}\"\ncount = \"{count}\"\ninterval = \"{interval}\"\n",
                path("store"),
                path("cache"),
                hub.ca_cert_path().display().to_string(),
                hub.mqtt_addr().port(),
            ),
        )?;
        Ok(Rig { hub, device, config, agent, _dir: dir })
    }

    async fn run(&self) -> anyhow::Result<TetherRun> {
        TetherRun::start(&self.agent, &self.config, WAIT).await
    }

    /// The telemetry at the hub so far: seq → message ids of each copy.
    fn arrived(&self) -> BTreeMap<u64, Vec<String>> {
        let filter = EventFilter { device_id: Some(self.device.clone()), kind: Some("telemetry".into()) };
        let mut arrived: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for event in self.hub.control().events(0, &filter) {
            let Ok(event) = serde_json::to_value(&event) else { continue };
            let seq = event["properties"]["seq"].as_str().and_then(|s| s.parse().ok());
            let mid = event["systemProperties"]["messageId"].as_str().unwrap_or_default().to_owned();
            if let Some(seq) = seq {
                arrived.entry(seq).or_default().push(mid);
            }
        }
        arrived
    }

    /// Waits until every message in `accepted` is at the hub.
    async fn wait_arrived(&self, accepted: &BTreeSet<u64>) -> anyhow::Result<()> {
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
    async fn first_message_after(&self, since: u64) -> anyhow::Result<Instant> {
        let filter = EventFilter { device_id: Some(self.device.clone()), kind: Some("telemetry".into()) };
        let events = self.hub.control().wait_events(since, &filter, WAIT).await;
        anyhow::ensure!(!events.is_empty(), "no message at the hub after the fault");
        Ok(Instant::now())
    }

    /// Counts, prints and checks: nothing accepted is lost, and no message arrived more
    /// often than a lost acknowledgement explains.
    fn tally(&self, fault: &str, accepted: &BTreeSet<u64>, recovery: Option<Duration>) -> anyhow::Result<()> {
        let arrived = self.arrived();
        let lost: Vec<u64> = accepted.iter().filter(|s| !arrived.contains_key(s)).copied().collect();
        let duplicated: usize = arrived.values().map(|mids| mids.len() - mids.iter().collect::<BTreeSet<_>>().len()).sum();
        let same_number_other_id = arrived.values().filter(|mids| mids.iter().collect::<BTreeSet<_>>().len() > 1).count();
        eprintln!(
            "{fault}: sent {} arrived {} lost {} duplicated {duplicated} recovery {}",
            accepted.len(),
            arrived.len(),
            lost.len(),
            recovery.map_or("-".to_owned(), |r| format!("{:.2} s", r.as_secs_f64())),
        );
        anyhow::ensure!(lost.is_empty(), "{fault}: lost {lost:?}");
        anyhow::ensure!(same_number_other_id == 0, "{fault}: a number was sent as two different messages");
        anyhow::ensure!(duplicated <= WINDOW, "{fault}: {duplicated} duplicates, more than the {WINDOW} that can be in flight");
        Ok(())
    }
}

/// The numbers the agent logged as accepted.
fn accepted(lines: &[String]) -> BTreeSet<u64> {
    lines.iter().filter_map(|l| l.split("accepted ").nth(1)?.split_whitespace().next()?.parse().ok()).collect()
}

fn count_accepted(n: usize) -> impl Fn(&[String]) -> bool {
    move |lines| accepted(lines).len() >= n
}

fn all_accepted(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains("all accepted"))
}

/// A hub fault of `duration` after 20 messages: everything accepted arrives, and the time
/// from the fault's end to the first new message is measured.
async fn survive(fault: Fault, duration: Duration) -> anyhow::Result<()> {
    let rig = Rig::start(300, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    rig.hub.control().inject_fault(Some(&rig.device), fault, duration);
    let ends = Instant::now() + duration;
    tokio::time::sleep_until(ends.into()).await;
    let since = rig.hub.control().last_event_seq();
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(ends);
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let sent = accepted(&run.lines());
    rig.wait_arrived(&sent).await?;
    rig.tally(&format!("{fault:?} {} s", duration.as_secs()), &sent, Some(recovery))
}

#[tokio::test]
async fn kill_tcp_loses_nothing() -> anyhow::Result<()> {
    survive(Fault::KillTcp, Duration::ZERO).await
}

#[tokio::test]
async fn ten_seconds_of_mqtt_shutdown_lose_nothing() -> anyhow::Result<()> {
    survive(Fault::ShutDownMqtt, Duration::from_secs(10)).await
}

#[tokio::test]
async fn ten_seconds_of_throttling_lose_nothing() -> anyhow::Result<()> {
    survive(Fault::InvokeThrottling, Duration::from_secs(10)).await
}

#[tokio::test]
async fn a_token_expiry_forced_by_the_hub_loses_nothing() -> anyhow::Result<()> {
    let rig = Rig::start(100, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    let at = Instant::now();
    rig.hub.control().expire_token(&rig.device)?;
    let since = rig.hub.control().last_event_seq();
    let recovery = rig.first_message_after(since).await?.saturating_duration_since(at);
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let sent = accepted(&run.lines());
    rig.wait_arrived(&sent).await?;
    rig.tally("token expiry", &sent, Some(recovery))
}

#[tokio::test]
async fn an_agent_crash_with_a_full_outbox_loses_nothing() -> anyhow::Result<()> {
    let rig = Rig::start(150, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    let outage = Duration::from_secs(8);
    rig.hub.control().inject_fault(Some(&rig.device), Fault::ShutDownMqtt, outage);
    let ends = Instant::now() + outage;
    // Messages pile up in the outbox while the hub is down; then the agent traps.
    run.wait_until("60 accepted", WAIT, count_accepted(60)).await?;
    let http = reqwest::Client::new();
    let depth: usize = http.get(format!("{}/depth", run.url)).send().await?.text().await?.parse()?;
    assert!(depth >= 30, "the outbox holds what the hub did not get: {depth}");
    let _ = http.get(format!("{}/panic", run.url)).send().await;
    run.wait_until("the crash", WAIT, |lines| lines.iter().any(|l| l.contains("agent crashed"))).await?;
    tokio::time::sleep_until(ends.into()).await;
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    let sent = accepted(&run.lines());
    rig.wait_arrived(&sent).await?;
    rig.tally("agent panic, outbox full", &sent, None)
}

/// `kill -9` of tether after `before` messages, during a hub outage if `outage`; a new
/// `tether run` over the same store sends what the first one accepted.
async fn survive_kill_9(outage: Option<Duration>, before: usize) -> anyhow::Result<()> {
    let rig = Rig::start(150, 0.05).await?;
    let run = rig.run().await?;
    run.wait_until("20 accepted", WAIT, count_accepted(20)).await?;
    if let Some(outage) = outage {
        rig.hub.control().inject_fault(Some(&rig.device), Fault::ShutDownMqtt, outage);
    }
    run.wait_until("enough accepted", WAIT, count_accepted(before)).await?;
    let mut sent = accepted(&run.kill_9().await?);
    let run = rig.run().await?;
    run.wait_until("all accepted", WAIT, all_accepted).await?;
    sent.extend(accepted(&run.lines()));
    rig.wait_arrived(&sent).await?;
    let fault = if outage.is_some() { "kill -9 of tether during an outage" } else { "kill -9 of tether while sending" };
    rig.tally(fault, &sent, None)
}

#[tokio::test]
async fn kill_9_of_tether_during_an_outage_loses_nothing() -> anyhow::Result<()> {
    survive_kill_9(Some(Duration::from_secs(6)), 60).await
}

#[tokio::test]
async fn kill_9_of_tether_while_sending_loses_nothing() -> anyhow::Result<()> {
    survive_kill_9(None, 50).await
}
