//! What the console costs the host: 1,000 idle agents of one tenant, with the management
//! server and its history sampler in this process, and the host's CPU over a window with no
//! console open, then with five console tabs open in headless Chromium (two overviews and
//! three agent pages, each refreshing every 2 s and following a live log). Chromium runs in
//! its own processes, so this process's CPU is the host's. Also the time to answer the
//! overview's page of 50, filtered, at 1,000 agents.
//!
//! `cargo bench -p tether-tests --bench console [-- --agents N --seconds S]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_host::Host;
use tether_host::manage::ManageServer;
use tether_host::manifest::Manifest;
use tether_tests::bench::{percentile, process_cpu};
use tether_tests::browser::Browser;

const TOKEN: &str = "console-bench-token-0123456789";

/// The host's CPU over `window`, as a share of one core.
async fn cpu_share(window: Duration) -> f64 {
    let (cpu, wall) = (process_cpu(), Instant::now());
    tokio::time::sleep(window).await;
    (process_cpu() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default);
    let (agents, seconds) = (arg("--agents", 1000) as usize, arg("--seconds", 30));
    let probe = tether_tests::build_agent("probe")?;
    let dir = tempfile::tempdir()?;
    let mut text = tether_tests::manifest_head(dir.path(), "", "") + &format!("\n[[tenant]]\nname = \"t\"\ntoken = \"{TOKEN}\"\n");
    for i in 0..agents {
        text += &format!("\n[[agent]]\nid = \"agent-{i:05}\"\ntenant = \"t\"\nmodule = \"{}\"\n", probe.display());
    }
    let path = dir.path().join("manifest.toml");
    std::fs::write(&path, text)?;
    let manifest = Manifest::load(&path)?;
    let host = Arc::new(Host::start(manifest.host.clone()).await?);
    manifest.spawn_agents(&host)?;
    let listen = manifest.manage.listen.ok_or_else(|| anyhow::anyhow!("no manage.listen"))?;
    let manage = ManageServer::start(host.clone(), manifest.access(), &manifest.manage, listen).await?;
    let base = format!("http://{}", manage.addr());
    let http = reqwest::Client::new();
    // Every agent running before anything is measured.
    let deadline = Instant::now() + Duration::from_secs(120);
    while host.agents().iter().any(|a| a.status != tether_host::AgentStatus::Running) {
        anyhow::ensure!(Instant::now() < deadline, "agents did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The overview's request at this size: a page of 50, with and without a filter.
    let mut times = Vec::new();
    for i in 0..200 {
        let query = if i % 2 == 0 { "offset=0&limit=50" } else { "q=agent-009&status=running&offset=0&limit=50" };
        let t = Instant::now();
        http.get(format!("{base}/api/agents?{query}")).bearer_auth(TOKEN).send().await?.error_for_status()?.bytes().await?;
        times.push(t.elapsed());
    }
    times.sort();

    let window = Duration::from_secs(seconds);
    let idle = cpu_share(window).await;
    let browser = Browser::start().await?;
    let link = manage.login_link("t")?;
    browser.goto(&link).await?;
    browser.find("tr[data-agent]").await?;
    let pages = [format!("{base}/?status=running"), format!("{base}/agents/agent-00001"), format!("{base}/agents/agent-00500"), format!("{base}/agents/agent-00999")];
    for page in &pages {
        let tab = browser.client().new_window(true).await?;
        browser.client().switch_to_window(tab.handle).await?;
        browser.goto(page).await?;
    }
    browser.find("#plots").await?;
    // Past the first sample and the first refreshes, then measured.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = cpu_share(window).await;
    browser.close().await;

    println!("command: cargo bench -p tether-tests --bench console -- --agents {agents} --seconds {seconds}\n");
    println!("| measure ({agents} idle agents) | result |\n|---|---|");
    println!("| `GET /api/agents`, a page of 50 (half of them filtered) | p50 {:.2} ms, p99 {:.2} ms |", percentile(&times, 0.5).as_secs_f64() * 1e3, percentile(&times, 0.99).as_secs_f64() * 1e3);
    println!("| host CPU, no console open, {seconds} s | {:.2} % of a core |", idle * 100.0);
    println!("| host CPU, five console tabs open, {seconds} s | {:.2} % of a core |", open * 100.0);
    println!("| what the five tabs cost | {:.2} % of a core |", (open - idle) * 100.0);
    manage.stop().await;
    if let Ok(host) = Arc::try_unwrap(host) {
        host.shutdown().await;
    }
    Ok(())
}
