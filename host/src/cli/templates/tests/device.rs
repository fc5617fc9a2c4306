//! `tether test` runs this natively: a simulated board (device-sim) on a pty, the agent
//! bound to it, and its URL.

use std::time::Duration;

use tether_testkit::{Agent, Board};

#[tokio::test]
async fn it_reads_the_board_and_switches_its_led() -> anyhow::Result<()> {
    let board = Board::start(&["--interval", "0.2"])?;
    let mut agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[], None, Some(&board)).await?;
    agent.wait_for_log("temperature", Duration::from_secs(30)).await?;
    assert_eq!(agent.get("/led").await?, (200, "off\n".to_owned()));
    assert_eq!(agent.post("/led", "on").await?, (200, "on\n".to_owned()));
    assert_eq!(agent.get("/led").await?, (200, "on\n".to_owned()));
    Ok(())
}
