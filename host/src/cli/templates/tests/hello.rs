//! `tether test` runs this natively: it builds the agent, runs it with `tether run` and
//! reads its log (tether-testkit's docs show the hub and a board too).

use std::time::Duration;

use tether_testkit::Agent;

#[tokio::test]
async fn it_says_hello() -> anyhow::Result<()> {
    let mut agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[], None, None).await?;
    agent.wait_for_log("hello from {name}", Duration::from_secs(30)).await?;
    Ok(())
}
