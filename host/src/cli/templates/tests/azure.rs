//! `tether test` runs this natively: the hub emulator (`tether hub`), the agent with a
//! device of its own, and what the hub sees.

use std::time::Duration;

use serde_json::json;
use tether_testkit::{Agent, Hub};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn it_reports_sends_and_answers_ping() -> anyhow::Result<()> {
    let hub = Hub::start().await?;
    let cs = hub.create_device("{name}").await?;
    let mut agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[("connection_string", &cs)], Some(&hub), None).await?;
    agent.wait_for_log("connected to IoT Hub", WAIT).await?;
    let telemetry = hub.wait_for_event("{name}", "telemetry", WAIT).await?;
    assert!(telemetry["body"].as_str().unwrap_or_default().contains("uptime"), "{telemetry}");
    assert_eq!(hub.invoke_method("{name}", "ping", json!({})).await?, (200, json!({ "pong": "ping" })));
    assert_eq!(hub.twin("{name}").await?["properties"]["reported"]["interval"], 10.0);
    Ok(())
}
