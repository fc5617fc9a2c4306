//! Multi-tenant hosting benchmark: RSS per idle agent at 1,000 and 10,000 agents from a
//! manifest, deploy time (compile, swap), event latency with 1,000 busy agents, and a
//! noisy neighbour's effect on the others. Prints a Markdown table.
//!
//! Run: `cargo bench -p tether-tests --bench hosting` (`-- --agents N` sets the largest
//! idle count, 10,000 by default; `-- --noisy-only` measures just the noisy neighbour,
//! over the agents spawned).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_host::manifest::Manifest;
use tether_host::{AgentModule, AgentStatus, Host};
use tether_host::hosting::history::History;
use tether_tests::bench::{heap_kib, map_count, percentile, pss_kib, release_free_memory, rss_kib, thread_cpu};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn p50_p99(samples: Vec<Duration>) -> String {
    p50_p99_in(samples, ms)
}

fn p50_p99_in(mut samples: Vec<Duration>, unit: fn(Duration) -> String) -> String {
    samples.sort();
    format!("p50 {} / p99 {}", unit(percentile(&samples, 0.5)), unit(percentile(&samples, 0.99)))
}

/// A manifest of `n` probe agents over 10 tenants; agent 0 has tight limits, agent 7 may
/// reach `allow`.
/// What the console's history costs per idle agent: the heap it takes once every ring is
/// full, and the CPU of one sample of all agents (what the management server does every
/// `history_interval_ms`).
fn console_history(host: &Host, agents: usize) -> (String, String, String) {
    release_free_memory();
    let before = heap_kib();
    let history = History::new(Duration::from_secs(10));
    let mut sample_cpu = Vec::new();
    for _ in 0..=tether_host::hosting::history::SAMPLES {
        let cpu = thread_cpu();
        history.sample(&host.agents());
        sample_cpu.push(thread_cpu() - cpu);
    }
    release_free_memory();
    let bytes = heap_kib().saturating_sub(before) as f64 * 1024.0 / agents as f64;
    sample_cpu.sort();
    let cpu = sample_cpu[sample_cpu.len() / 2];
    drop(history);
    (
        format!("console history per idle agent ({agents} agents)"),
        format!("{bytes:.0} bytes of heap with every ring full; one sample of all agents takes {:.1} ms of CPU (every 10 s by default)", cpu.as_secs_f64() * 1000.0),
        "≤ 1 KiB per idle agent".into(),
    )
}

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
            text += "limits = { memory_mib = 16, cpu_ms_per_event = 100, max_restarts = 100000, inbound_timeout_secs = 2 }\n";
        }
        if i == 7 {
            text += &format!("allowed_hosts = [\"{allow}\"]\n");
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
async fn quiet(url: Arc<dyn Fn(usize) -> String + Send + Sync>, ids: [usize; 3]) -> (Vec<Duration>, Vec<Duration>) {
    let client = reqwest::Client::new();
    let (mut timer, mut ping) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        for i in ids {
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

/// Deploys to one agent while the others idle: fresh compile, cached compile, swap.
async fn deploys(host: &Host, probe_bytes: &[u8]) -> anyhow::Result<Vec<(String, String, String)>> {
    let target = "agent-00001";
    let (mut compile, mut cached, mut swap) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..5 {
        let bytes = variant(probe_bytes, n);
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
    Ok(vec![
        ("deploy: compile (new module)".into(), p50_p99(compile), "—".into()),
        ("deploy: compile (cached on disk)".into(), p50_p99(cached), "—".into()),
        ("deploy: swap (deploy call → new instance running)".into(), p50_p99(swap), "≤ 10 ms".into()),
    ])
}

/// Instantiations of `module` one after the other, a millisecond apart, while the host is
/// busy: each from its `InstancePre` into a pool slot, as a restart or deploy does. On a
/// thread of their own, so that the thread's CPU time is the instantiation's alone (on
/// the host's threads a yield would add other tasks' work to it); wall times and CPU times.
async fn instantiations(host: Arc<Host>, module: AgentModule, n: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    outside(async move {
        let (mut wall, mut cpu) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let (t, c) = (Instant::now(), thread_cpu());
            let instance = host.bench_instantiate("bench-instantiate", &module).await?;
            wall.push(t.elapsed());
            cpu.push(thread_cpu().saturating_sub(c));
            drop(instance);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok((wall, cpu))
    })
    .await?
}

/// `busy` agents under load: requests spread over them from 64 clients at once (and
/// instantiations meanwhile), then timers from 256.
async fn busy(host: &Arc<Host>, module: &AgentModule, url: &Arc<dyn Fn(usize) -> String + Send + Sync>, busy: usize) -> anyhow::Result<Vec<(String, String, String)>> {
    let t = Instant::now();
    let (samples, instantiate) = tokio::join!(load(url, busy, 50_000, 64, "/ping"), instantiations(host.clone(), module.clone(), 1000));
    let rate = samples.len() as f64 / t.elapsed().as_secs_f64();
    let (wall, cpu) = instantiate?;
    let mut rows = vec![
        (format!("HTTP event round trip, {busy} busy agents, 64 clients"), format!("{} ({rate:.0} events/s)", p50_p99(samples)), "—".into()),
        ("instantiate while those agents are busy: wall time".into(), p50_p99_in(wall, us), "p99 ≤ 50 µs".into()),
        ("instantiate while those agents are busy: its thread's CPU time".into(), p50_p99_in(cpu, us), "—".into()),
    ];
    let samples = load(url, busy, 20_000, 256, "/later?ms=10").await;
    let lateness: Vec<Duration> = samples.into_iter().map(|d| d.saturating_sub(Duration::from_millis(10))).collect();
    rows.push((format!("timer event lateness, {busy} busy agents, 256 timers in flight"), p50_p99(lateness), "—".into()));
    eprintln!("busy agents measured");
    Ok(rows)
}

/// Runs `work` on a thread of its own, as a client outside the host would: its CPU use
/// still competes with the host's, but not inside the host's worker threads.
async fn outside<T: Send + 'static>(work: impl std::future::Future<Output = T> + Send + 'static) -> anyhow::Result<T> {
    let thread = std::thread::spawn(move || -> anyhow::Result<T> {
        Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work))
    });
    tokio::task::spawn_blocking(move || thread.join()).await?.map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// Noisy neighbours against three quiet agents: agent 0 breaks its limits (spins to the CPU
/// limit, allocates to the memory cap, and so sits mostly in restart backoff), agent 5 stays
/// within them but keeps a core busy with ~100 ms events, agent 6 floods logs and agent 7
/// floods outgoing HTTP, all three without end.
async fn noisy_neighbours(host: &Host, url: &Arc<dyn Fn(usize) -> String + Send + Sync>, server_port: u16) -> anyhow::Result<Vec<(String, String, String)>> {
    let quiet_ids = [2, 3, 4];
    let (timer_base, ping_base) = outside(quiet(url.clone(), quiet_ids)).await?;
    // Agents 5-7 make their noise by themselves once started; agent 0 is asked to spin or
    // hog every 50 ms (it is mostly in backoff).
    let client = reqwest::Client::new();
    for (agent, query) in [(5, "kind=calls&n=3000000".to_owned()), (6, "kind=logs&n=2000".into()), (7, format!("kind=http&n=100&url=http://127.0.0.1:{server_port}/data"))] {
        client.get(format!("{}/noise?{query}", url(agent))).send().await?.error_for_status()?;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (crash_url, crash_stop) = (url(0), stop.clone());
    let crasher = outside(async move {
        let client = reqwest::Client::new();
        for path in ["/spin", "/hog"].iter().cycle() {
            if crash_stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let _ = client.get(format!("{crash_url}{path}")).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let crasher = tokio::spawn(crasher);
    let (timer_noisy, ping_noisy) = outside(quiet(url.clone(), quiet_ids)).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    crasher.await??;
    let counts = |id: &str| host.agent(id).map(|r| (r.restarts, r.metrics)).unwrap_or_default();
    let (restarts, _) = counts("agent-00000");
    let (_, busy) = counts("agent-00005");
    let (_, logs) = counts("agent-00006");
    let (_, http) = counts("agent-00007");
    Ok(vec![
        ("quiet agents' timer lateness: alone → noisy neighbours".into(), format!("{} → {}", p50_p99(timer_base), p50_p99(timer_noisy)), "p99 within 2×".into()),
        ("quiet agents' HTTP round trip: alone → noisy neighbours".into(), format!("{} → {}", p50_p99(ping_base), p50_p99(ping_noisy)), "p99 within 2×".into()),
        ("agent 0 (spin, hog): restarts".into(), restarts.to_string(), "—".into()),
        ("agent 5 (busy): events / CPU seconds".into(), format!("{} / {:.1} s", busy.events, busy.busy_seconds), "—".into()),
        ("agent 6 (log flood): lines logged / dropped".into(), format!("{} / {}", logs.log_lines, logs.log_dropped), "—".into()),
        ("agent 7 (HTTP flood): requests sent / refused".into(), format!("{} / {}", http.http_requests, http.http_refused), "—".into()),
    ])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let max: usize = args.iter().position(|a| a == "--agents").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(10_000);
    let noisy_only = args.iter().any(|a| a == "--noisy-only");
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

    // Memory per idle agent: the first 1,000, then up to 10,000, then all.
    let (base, base_pss, base_maps) = (rss_kib(), pss_kib(), map_count());
    let mut spawned = 0;
    let mut steps = vec![1000.min(max), 10_000.min(max), max];
    steps.dedup();
    for step in steps {
        let t = Instant::now();
        for entry in &manifest.agents[spawned..step] {
            host.spawn_with_policy(&entry.id, entry.settings.clone(), entry.policy.clone(), module.clone())?;
        }
        wait_running(&host, manifest.agents[spawned..step].iter().map(|a| a.id.clone())).await?;
        eprintln!("{step} agents running");
        let (took, started) = (t.elapsed(), step - spawned);
        spawned = step;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, pss, maps) = (rss_kib(), pss_kib(), map_count());
        let per = |now: u64, before: u64| now.saturating_sub(before) as f64 / step as f64;
        rows.push((
            format!("memory per idle agent ({step} agents)"),
            format!(
                "RSS {:.1} KiB, PSS {:.1} KiB, {:.1} memory maps (process RSS {:.0} MiB; the last {started} started in {:.2} s)",
                per(rss, base),
                per(pss, base_pss),
                maps.saturating_sub(base_maps) as f64 / step as f64,
                rss as f64 / 1024.0,
                took.as_secs_f64()
            ),
            if step >= 100_000 { "100,000 on a 24 GiB node".into() } else if step >= 10_000 { "10,000 under 4 GiB".into() } else { "—".into() },
        ));
    }

    rows.push(console_history(&host, max));

    let base_url = host.agent_url("");
    let url: Arc<dyn Fn(usize) -> String + Send + Sync> = Arc::new(move |i| format!("{base_url}agent-{i:05}"));
    if !noisy_only {
        rows.extend(deploys(&host, &probe_bytes).await?);
        rows.extend(busy(&host, &module, &url, 1000.min(max)).await?);
    }
    rows.extend(noisy_neighbours(&host, &url, server.port()).await?);

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
