//! Nothing lost: numbered telemetry from the `az-sender` agent, in a real `tether run`,
//! through the AzureIoTHub client's durable outbox with reconnect on
//! (`ClientOptions::resilient`), across every fault the hub emulator injects, a crash of
//! the agent, `kill -9` of tether, and the serial line to the board that numbers them
//! unplugged and plugged back in. Each test counts at the hub: the messages
//! `send_message` accepted, those lost (must be 0), the duplicates by message id (a message
//! published again because its PUBACK was lost: allowed, counted), and the time from the
//! fault's end to the first new message. Rates are modest: these are correctness tests;
//! `cargo bench -p tether-tests --bench faults` prints the same faults as a table.

use std::time::Duration;

use tether_hub_emulator::Fault;
use tether_tests::faults::{self, Report};

fn check(report: Report) -> anyhow::Result<()> {
    eprintln!("{}", report.line());
    report.tally.check(&report.fault)
}

#[tokio::test]
async fn kill_tcp_loses_nothing() -> anyhow::Result<()> {
    check(faults::hub_fault(Fault::KillTcp, Duration::ZERO).await?)
}

#[tokio::test]
async fn ten_seconds_of_mqtt_shutdown_lose_nothing() -> anyhow::Result<()> {
    check(faults::hub_fault(Fault::ShutDownMqtt, Duration::from_secs(10)).await?)
}

#[tokio::test]
async fn ten_seconds_of_throttling_lose_nothing() -> anyhow::Result<()> {
    check(faults::hub_fault(Fault::InvokeThrottling, Duration::from_secs(10)).await?)
}

#[tokio::test]
async fn a_token_expiry_forced_by_the_hub_loses_nothing() -> anyhow::Result<()> {
    check(faults::token_expiry().await?)
}

#[tokio::test]
async fn an_agent_crash_with_a_full_outbox_loses_nothing() -> anyhow::Result<()> {
    check(faults::agent_crash().await?)
}

#[tokio::test]
async fn kill_9_of_tether_during_an_outage_loses_nothing() -> anyhow::Result<()> {
    check(faults::kill_9(true, 60).await?)
}

#[tokio::test]
async fn kill_9_of_tether_while_sending_loses_nothing() -> anyhow::Result<()> {
    check(faults::kill_9(false, 50).await?)
}

#[tokio::test]
async fn kill_9_of_the_hub_and_a_restart_with_persist_lose_nothing() -> anyhow::Result<()> {
    check(faults::hub_kill_9().await?)
}

#[tokio::test]
async fn a_serial_line_unplugged_for_five_seconds_loses_no_reading() -> anyhow::Result<()> {
    check(faults::serial_replug(Duration::from_secs(5)).await?)
}
