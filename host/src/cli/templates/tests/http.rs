//! `tether test` runs this natively: it builds the agent, runs it with `tether run` and
//! calls its URL.

use tether_testkit::Agent;

#[tokio::test]
async fn it_greets_and_counts() -> anyhow::Result<()> {
    let agent = Agent::start(env!("CARGO_MANIFEST_DIR"), &[], None, None).await?;
    assert_eq!(agent.get("/").await?, (200, "hello from {name}\n".to_owned()));
    assert_eq!(agent.post("/count", "").await?, (200, r#"{"count":1}"#.to_owned()));
    assert_eq!(agent.post("/count", "").await?, (200, r#"{"count":2}"#.to_owned()));
    assert_eq!(agent.get("/nothing").await?.0, 404);
    Ok(())
}
