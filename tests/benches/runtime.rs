//! Runtime benchmark: instantiation from the cached component, host->guest event dispatch,
//! guest->host calls, and RSS per idle agent. Prints a Markdown table.
//!
//! Run: `cargo bench -p tether-tests --bench runtime` (add `-- --agents N` for the idle test).

use std::time::{Duration, Instant};

use tether_host::config::{AgentSettings, HostConfig};
use tether_host::{AgentStatus, Host};
use tether_tests::bench::{percentile, rss_kib};

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 { format!("{ns} ns") } else { format!("{:.1} µs", ns as f64 / 1000.0) }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let agents: u32 = args.iter().position(|a| a == "--agents").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(1000);
    let probe = tether_tests::build_agent("probe")?;
    let dir = tempfile::tempdir()?;
    let config = HostConfig {
        http_listen: "127.0.0.1:0".parse()?,
        store_dir: dir.path().join("store"),
        cache_dir: dir.path().join("cache"),
        max_agents: agents + 64,
        ..HostConfig::default()
    };
    let host = Host::start(config).await?;
    let module = host.runtime().load_file(&probe)?;
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // Instantiation from the reused InstancePre, pooling allocator.
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let instance = host.bench_instantiate("bench", &module).await?;
        samples.push(t.elapsed());
        drop(instance);
    }
    samples.sort();
    rows.push(("instantiate (pooling, InstancePre)".into(), format!("p50 {} / p99 {}", fmt(percentile(&samples, 0.5)), fmt(percentile(&samples, 0.99))), "≤ 50 µs".into()));

    // Host->guest: a timer event for an unknown timer: the SDK looks it up and returns.
    let mut instance = host.bench_instantiate("bench", &module).await?;
    instance.start().await?;
    let n = 200_000u32;
    for _ in 0..10_000 {
        instance.timer(u64::MAX).await?;
    }
    let t = Instant::now();
    for _ in 0..n {
        instance.timer(u64::MAX).await?;
    }
    let dispatch = t.elapsed() / n;
    rows.push(("host→guest event dispatch".into(), fmt(dispatch), "≤ 1 µs".into()));

    // Guest->host: N no-op imports in one event, minus the event itself.
    let calls = 2_000_000u64;
    let t = Instant::now();
    instance.request("/host-calls", &[("n", "0")]).await?;
    let base = t.elapsed();
    let t = Instant::now();
    instance.request("/host-calls", &[("n", &calls.to_string())]).await?;
    let per_call = (t.elapsed().saturating_sub(base)) / calls as u32;
    rows.push(("guest→host call (no-op import)".into(), fmt(per_call), "—".into()));
    drop(instance);

    // RSS per idle agent: spawn, wait for every `start`, let things settle, measure.
    let before = rss_kib();
    for i in 0..agents {
        host.spawn(&format!("idle-{i}"), AgentSettings::default(), module.clone())?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (0..agents).any(|i| !matches!(host.status(&format!("idle-{i}")), Some((AgentStatus::Running, _)))) {
        anyhow::ensure!(Instant::now() < deadline, "agents did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let per_agent = (after.saturating_sub(before)) as f64 / agents as f64;
    rows.push((format!("RSS per idle agent ({agents} agents)"), format!("{per_agent:.1} KiB"), "≤ 256 KiB".into()));
    host.shutdown().await;

    println!("| measure | result | target |\n|---|---|---|");
    for (m, r, t) in rows {
        println!("| {m} | {r} | {t} |");
    }
    println!("\n(probe agent, {} bytes; RSS {before} KiB before the agents, {after} KiB after)", std::fs::metadata(&probe)?.len());
    Ok(())
}
