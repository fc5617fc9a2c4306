//! Multi-tenant hosting benchmark: RSS per idle agent at 1,000 and 10,000 agents from a
//! manifest, deploy time (compile, swap), event latency with 1,000 busy agents, and a
//! noisy neighbour's effect on the others. Prints a Markdown table.
//!
//! Run: `cargo bench -p tether-tests --bench hosting` (`-- --agents N` sets the largest
//! idle count, 10,000 by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_host::manifest::Manifest;
use tether_host::{AgentModule, AgentStatus, Host};
use tether_tests::bench::{percentile, rss_kib};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn p50_p99(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!("p50 {} / p99 {}", ms(percentile(&samples, 0.5)), ms(percentile(&samples, 0.99)))
}

/// A manifest of `n` probe agents over 10 tenants; the noisy agent may reach `allow`.
fn manifest_text(dir: &std::path::Path, probe: &std::path::Path, n: usize, allow: &str) -> String {
    let mut text = format!(
        "[host]\nhttp_listen = \"127.0.0.1:0\"\nstore_dir = \"{}\"\ncache_dir = \"{}\"\n",
        dir.join("store").display(),
        dir.join("cache").display()
    );
    for t in 0..10 {
        text += &format!("\n[[tenant]]\nname = \"t{t}\"\ntoken = \"tenant-{t}-token-0123456789\"\n");
    }
    for i in 0..n {
        text += &format!("\n[[agent]]\nid = \"agent-{i:05}\"\ntenant = \"t{}\"\nmodule = \"{}\"\n", i % 10, probe.display());
        if i == 0 {
            text += &format!("allowed_hosts = [\"{allow}\"]\nlimits = {{ memory_mib = 16, cpu_ms_per_event = 100, max_restarts = 100000, inbound_timeout_secs = 2 }}\n");
        }
    }
    text
}

async fn wait_running(host: &Host, ids: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in ids {
        while !host.agent(&id).is_some_and(|r| r.status == AgentStatus::Running) {
            anyhow::ensure!(Instant::now() < deadline, "{id} is not running: {:?}", host.agent(&id).map(|r| r.status));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

/// `n` requests from `concurrency` clients over `agents`, with `path`: the latencies.
async fn load(url: &Arc<dyn Fn(usize) -> String + Send + Sync>, agents: usize, n: usize, concurrency: usize, path: &'static str) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            for i in (c..n).step_by(concurrency) {
                let target = format!("{}{path}", url((i * 7919) % agents));
                let t = Instant::now();
                let ok = client.get(&target).send().await.is_ok_and(|r| r.status().is_success());
                if ok {
                    samples.push(t.elapsed());
                }
            }
            samples
        });
    }
    let mut all = Vec::new();
    while let Some(Ok(samples)) = tasks.join_next().await {
        all.extend(samples);
    }
    all
}

/// Timer lateness and `/ping` round trip of a few quiet agents, sequentially.
async fn quiet(url: &Arc<dyn Fn(usize) -> String + Send + Sync>, ids: &[usize]) -> (Vec<Duration>, Vec<Duration>) {
    let client = reqwest::Client::new();
    let (mut timer, mut ping) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        for &i in ids {
            let t = Instant::now();
            let _ = client.get(format!("{}/ping", url(i))).send().await;
            ping.push(t.elapsed());
            let t = Instant::now();
            let _ = client.get(format!("{}/later?ms=20", url(i))).send().await;
            timer.push(t.elapsed().saturating_sub(Duration::from_millis(20)));
        }
    }
    (timer, ping)
}

/// The component with a custom section appended: same code, another digest, so the
/// host compiles it afresh.
fn variant(bytes: &[u8], n: u32) -> Vec<u8> {
    let name = format!("bench-{n}");
    let mut out = bytes.to_vec();
    out.push(0);
    out.push((name.len() + 1) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let max: usize = args.iter().position(|a| a == "--agents").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(10_000);
    let probe = tether_tests::build_agent("probe")?;
    let probe_bytes = std::fs::read(&probe)?;
    let dir = tempfile::tempdir()?;

    // A local server for the noisy agent's HTTP flood.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().route("/data", axum::routing::get(|| async { "x" }))).await });

    let path = dir.path().join("manifest.toml");
    std::fs::write(&path, manifest_text(dir.path(), &probe, max, &format!("http://127.0.0.1:{}", server.port())))?;
    let t = Instant::now();
    let manifest = Manifest::load(&path)?;
    let parse = t.elapsed();
    let host = Arc::new(Host::start(manifest.host.clone()).await?);
    let module: AgentModule = host.runtime().load_file(&probe)?;
    let mut rows: Vec<(String, String, String)> = vec![("parse a manifest of N agents".into(), format!("{} ({max} agents)", ms(parse)), "—".into())];

    // RSS per idle agent: the first 1,000, then all.
    let base = rss_kib();
    let mut spawned = 0;
    let mut steps = vec![1000.min(max), max];
    steps.dedup();
    for step in steps {
        let t = Instant::now();
        for entry in &manifest.agents[spawned..step] {
            host.spawn_with_policy(&entry.id, entry.settings.clone(), entry.policy.clone(), module.clone())?;
        }
        wait_running(&host, manifest.agents[spawned..step].iter().map(|a| a.id.clone())).await?;
        eprintln!("{step} agents running");
        let took = t.elapsed();
        spawned = step;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib();
        let per = (rss.saturating_sub(base)) as f64 / step as f64;
        rows.push((
            format!("RSS per idle agent ({step} agents)"),
            format!("{per:.1} KiB (process {:.0} MiB; started in {:.2} s)", rss as f64 / 1024.0, took.as_secs_f64()),
            if step >= 10_000 { "10,000 under 4 GiB".into() } else { "—".into() },
        ));
    }

    // Deploys to one agent while the others idle: fresh compile, cached compile, swap.
    let target = "agent-00001";
    let (mut compile, mut cached, mut swap) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..5 {
        let bytes = variant(&probe_bytes, n);
        let t = Instant::now();
        let module = host.compile(bytes.clone()).await?;
        compile.push(t.elapsed());
        let t = Instant::now();
        let _ = host.compile(bytes).await?;
        cached.push(t.elapsed());
        let digest = module.digest.clone();
        let t = Instant::now();
        host.deploy(target, module)?;
        while !host.agent(target).is_some_and(|r| r.module_digest == digest && r.status == AgentStatus::Running) {
            tokio::task::yield_now().await;
        }
        swap.push(t.elapsed());
    }
    eprintln!("deploys measured");
    rows.push(("deploy: compile (new module)".into(), p50_p99(compile), "—".into()));
    rows.push(("deploy: compile (cached on disk)".into(), p50_p99(cached), "—".into()));
    rows.push(("deploy: swap (deploy call → new instance running)".into(), p50_p99(swap), "≤ 10 ms".into()));

    // 1,000 busy agents: requests spread over them from 64 clients at once.
    let busy = 1000.min(max);
    let base_url = host.agent_url("");
    let url: Arc<dyn Fn(usize) -> String + Send + Sync> = Arc::new(move |i| format!("{base_url}agent-{i:05}"));
    let t = Instant::now();
    let samples = load(&url, busy, 50_000, 64, "/ping").await;
    let rate = samples.len() as f64 / t.elapsed().as_secs_f64();
    rows.push((format!("HTTP event round trip, {busy} busy agents, 64 clients"), format!("{} ({rate:.0} events/s)", p50_p99(samples)), "—".into()));
    let samples = load(&url, busy, 20_000, 256, "/later?ms=10").await;
    let lateness: Vec<Duration> = samples.into_iter().map(|d| d.saturating_sub(Duration::from_millis(10))).collect();
    rows.push((format!("timer event lateness, {busy} busy agents, 256 timers in flight"), p50_p99(lateness), "—".into()));

    eprintln!("busy agents measured");
    // A noisy neighbour (agent 0) against three quiet agents.
    let quiet_ids = [2, 3, 4];
    let (timer_base, ping_base) = quiet(&url, &quiet_ids).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut noise = tokio::task::JoinSet::new();
    // Agent 0 breaks its limits (and so spends most of the time in restart backoff);
    // agent 5 stays within them but keeps a core busy with ~100 ms events.
    let paths = ["/spin", "/hog", "/flood-logs?n=2000", "/flood-http?n=100&url=http://127.0.0.1:PORT/data"].map(|p| (0, p));
    for (agent, path) in paths.into_iter().chain([(5, "/host-calls?n=3000000")]) {
        let path = path.replace("PORT", &server.port().to_string());
        let (url, stop) = (url.clone(), stop.clone());
        noise.spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.get(format!("{}{path}", url(agent))).send().await;
            }
        });
    }
    let (timer_noisy, ping_noisy) = quiet(&url, &quiet_ids).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while noise.join_next().await.is_some() {}
    rows.push(("quiet agents' timer lateness: alone → noisy neighbour".into(), format!("{} → {}", p50_p99(timer_base), p50_p99(timer_noisy)), "p99 within 2×".into()));
    rows.push(("quiet agents' HTTP round trip: alone → noisy neighbour".into(), format!("{} → {}", p50_p99(ping_base), p50_p99(ping_noisy)), "p99 within 2×".into()));
    let noisy = host.agent("agent-00000").map(|r| (r.restarts, r.metrics.log_dropped, r.metrics.http_refused)).unwrap_or_default();
    rows.push(("noisy agent: restarts / log lines dropped / HTTP refused".into(), format!("{} / {} / {}", noisy.0, noisy.1, noisy.2), "—".into()));
    let busy_events = host.agent("agent-00005").map(|r| (r.metrics.events, r.metrics.busy_seconds)).unwrap_or_default();
    rows.push(("busy neighbour: events / CPU seconds".into(), format!("{} / {:.1} s", busy_events.0, busy_events.1), "—".into()));

    println!("command: cargo bench -p tether-tests --bench hosting -- --agents {max}\n");
    println!("| measure | result | target |\n|---|---|---|");
    for (measure, result, target) in rows {
        println!("| {measure} | {result} | {target} |");
    }
    if let Ok(host) = Arc::try_unwrap(host) {
        host.shutdown().await;
    }
    Ok(())
}
