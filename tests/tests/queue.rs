//! The durable queue capability end to end: the probe agent appends, reads and removes
//! over its URL, and its entries outlive a crash of the agent, a restart of the host and a
//! `kill -9` of a real `tether run` process.

use std::path::Path;
use std::time::{Duration, Instant};

use tether_tests::tether_run::TetherRun;
use tether_tests::{TestHost, build_agent};

const WAIT: Duration = Duration::from_secs(60);

/// The body of a GET that must answer 200.
async fn ask(url: &str) -> anyhow::Result<String> {
    let response = reqwest::get(url).await?;
    let status = response.status();
    let body = response.text().await?;
    anyhow::ensure!(status == 200, "{url}: {status} {body}");
    Ok(body)
}

/// The ids of an answer to `/queue/append`, comma-separated.
fn ids(answer: &str) -> anyhow::Result<Vec<u64>> {
    answer.split(',').map(|id| id.parse().map_err(|e| anyhow::anyhow!("{answer:?}: {e}"))).collect()
}

/// Entries as `/queue/entries` answers them: `<id> <payload>` lines.
fn listing(entries: &[(u64, &str)]) -> String {
    entries.iter().map(|(id, payload)| format!("{id} {payload}")).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn entries_survive_an_agent_crash_and_a_host_restart() -> anyhow::Result<()> {
    let mut t = TestHost::start(|_| {}).await?;
    t.spawn("q", "probe", &[])?;
    let out = ids(&ask(&t.url("q", "/queue/append?name=out&payload=m&n=3")).await?)?;
    assert!(out.windows(2).all(|w| w[0] < w[1]), "{out:?}");
    let other = ids(&ask(&t.url("q", "/queue/append?name=other&payload=o")).await?)?;
    assert_eq!(ask(&t.url("q", &format!("/queue/remove?name=out&id={}", out[1]))).await?, "true");
    let kept = listing(&[(out[0], "m0"), (out[2], "m2")]);
    let entries = t.url("q", "/queue/entries?name=out&after=0&max=10");
    assert_eq!(ask(&entries).await?, kept);

    let crashed = reqwest::get(t.url("q", "/panic")).await?;
    assert_eq!(crashed.status(), 503);
    t.logs.wait_for("q", "agent crashed", WAIT).await?;
    t.logs.wait_for_count("q", "probe started", 2, WAIT).await?;
    assert_eq!(ask(&entries).await?, kept, "after the agent's crash");
    let dir = t.stop().await;

    let t = TestHost::start_in(dir, |_| {}).await?;
    t.spawn("q", "probe", &[])?;
    let entries = t.url("q", "/queue/entries?name=out&after=0&max=10");
    assert_eq!(ask(&entries).await?, kept, "after the host's restart");
    assert_eq!(ask(&t.url("q", "/queue/entries?name=other&after=0&max=10")).await?, listing(&[(other[0], "o")]));
    assert_eq!(ask(&t.url("q", "/queue/stats")).await?, "entries=3 bytes=5 quota=16777216");
    let next = ids(&ask(&t.url("q", "/queue/append?name=out&payload=m3")).await?)?;
    assert!(next[0] > other[0], "ids go on increasing: {next:?} after {other:?}");
    t.stop().await;
    Ok(())
}

#[tokio::test]
async fn over_the_quota_nothing_is_appended_and_stats_add_up() -> anyhow::Result<()> {
    let t = TestHost::start(|c| c.limits.queue_bytes = 1000).await?;
    t.spawn("q", "probe", &[])?;
    let append = |query: &str| {
        let url = t.url("q", &format!("/queue/append?{query}"));
        async move { ask(&url).await }
    };
    let a = append("name=a&bytes=600").await?;
    let b = append("name=b&bytes=300").await?;
    assert_eq!(append("name=a&bytes=200").await?, "error QuotaExceeded");
    assert_eq!(append("name=c&bytes=101").await?, "error QuotaExceeded");
    assert_eq!(ask(&t.url("q", "/queue/stats")).await?, "entries=2 bytes=900 quota=1000");
    let entries = ask(&t.url("q", "/queue/entries?name=a&after=0&max=10")).await?;
    assert_eq!(entries, listing(&[(ids(&a)?[0], &"x".repeat(600))]), "nothing was appended to a");
    assert_eq!(ask(&t.url("q", "/queue/entries?name=c&after=0&max=10")).await?, "");

    // The largest entry is the quota here, as it is under 1 MiB.
    assert_eq!(append("name=a&bytes=1001").await?, "error TooLarge");
    assert_eq!(append("name=&payload=x").await?, "error InvalidName");
    assert_eq!(append(&format!("name={}&payload=x", "n".repeat(65))).await?, "error InvalidName");
    append(&format!("name={}&bytes=100", "n".repeat(64))).await?;
    assert_eq!(ask(&t.url("q", "/queue/stats")).await?, "entries=3 bytes=1000 quota=1000");

    assert_eq!(ask(&t.url("q", &format!("/queue/remove?name=b&id={b}"))).await?, "true");
    assert_eq!(ask(&t.url("q", &format!("/queue/remove?name=b&id={b}"))).await?, "false");
    assert_eq!(ask(&t.url("q", "/queue/stats")).await?, "entries=2 bytes=700 quota=1000");
    append("name=c&bytes=300").await?;
    t.stop().await;
    Ok(())
}

/// `tether run` of the probe as agent `q`, once the agent answers.
async fn run_probe(agent: &Path, config: &Path) -> anyhow::Result<TetherRun> {
    let run = TetherRun::start(agent, config, WAIT).await?;
    let deadline = Instant::now() + WAIT;
    while ask(&format!("{}/ping", run.url)).await.ok().as_deref() != Some("pong") {
        anyhow::ensure!(Instant::now() < deadline, "the agent at {} does not answer", run.url);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(run)
}

#[tokio::test]
async fn entries_survive_kill_9_of_tether_run() -> anyhow::Result<()> {
    let agent = build_agent("probe")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("tether.toml");
    let store = dir.path().join("store").display().to_string();
    let cache = dir.path().join("cache").display().to_string();
    std::fs::write(&config, format!("[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = {store:?}\ncache_dir = {cache:?}\n\n[agent]\nid = \"q\"\n"))?;

    let run = run_probe(&agent, &config).await?;
    let mut appended = Vec::new();
    for i in 0..50 {
        // Answered once the append has returned: durable from then on.
        let id = ids(&ask(&format!("{}/queue/append?name=out&payload=e{i}", run.url)).await?)?[0];
        appended.push((id, format!("e{i}")));
    }
    run.kill_9().await?;

    let run = run_probe(&agent, &config).await?;
    let expected: Vec<(u64, &str)> = appended.iter().map(|(id, p)| (*id, p.as_str())).collect();
    assert_eq!(ask(&format!("{}/queue/entries?name=out&after=0&max=100", run.url)).await?, listing(&expected));
    let next = ids(&ask(&format!("{}/queue/append?name=out&payload=after", run.url)).await?)?[0];
    assert!(next > appended[49].0, "ids go on increasing: {next} after {}", appended[49].0);
    run.kill_9().await?;
    Ok(())
}
