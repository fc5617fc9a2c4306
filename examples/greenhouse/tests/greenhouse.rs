//! The greenhouse against the hub emulator and a scripted board, as its author would test
//! it: `tether test examples/greenhouse`.

use std::time::{Duration, Instant};

use serde_json::json;
use tether_testkit::{Agent, Board, Hub};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn alerts_follow_the_twin_threshold_the_vent_asks_the_board_and_readings_are_kept() -> anyhow::Result<()> {
    let hub = Hub::start().await?;
    let cs = hub.create_device("greenhouse").await?;
    // Readings around 20 °C every 0.2 s, and a vent that says it moved.
    let board = Board::start(&["--interval", "0.2", "--on", "vent=true"])?;
    let mut agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[("connection_string", &cs)], Some(&hub), Some(&board)).await?;
    agent.wait_for_log("greenhouse connected", WAIT).await?;

    let first = hub.wait_for_event("greenhouse", "telemetry", WAIT).await?;
    assert_eq!(first["properties"]["alert"], "false", "20 °C is under the default 30: {first}");

    // A lower threshold through the twin: reported back, and readings now alert.
    hub.set_desired("greenhouse", json!({ "threshold": 5 })).await?;
    hub.wait_for_event_where("greenhouse", "telemetry", WAIT, |e| e["properties"]["alert"] == "true").await?;
    let deadline = Instant::now() + WAIT;
    while hub.twin("greenhouse").await?["properties"]["reported"]["threshold"] != 5.0 {
        anyhow::ensure!(Instant::now() < deadline, "the threshold was not reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The vent method, answered by asking the board.
    assert_eq!(hub.invoke_method("greenhouse", "vent", json!({ "open": 40 })).await?, (200, json!({ "open": 40 })));

    // The last readings, from the agent's store.
    let (status, body) = agent.get("/readings").await?;
    let readings: Vec<f64> = serde_json::from_str(&body)?;
    assert_eq!(status, 200);
    assert!(!readings.is_empty() && readings.len() <= 10 && readings.iter().all(|c| (15.0..25.0).contains(c)), "{readings:?}");
    Ok(())
}
