//! The attack table of "hostile tenants": a real `tether serve` (debug build) with a quiet
//! victim agent of one tenant and an attacker agent of another. Each attack runs while
//! the victim is asked `/ping` 500 times in a row, three times (the median p99 counts);
//! before it, the same with the host quiet. Printed per attack: how the host refused it, the victim's p99 alone
//! and under attack, the host's RSS growth (peak during the attack over the quiet RSS)
//! and its peak count of open file descriptors. Loopback only: the attacker's raw
//! connections come from 127.0.0.2, the victim's client from 127.0.0.1.
//!
//! `cargo bench -p tether-tests --bench attacks` (about 2 minutes).

use std::ffi::OsStr;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_tests::bench::percentile;
use tether_tests::{build_agent, manifest_head, silent_server};
use tether_tests::tether_run::TetherRun;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TOKEN_X: &str = "attacker-token-0123456789";
const QUEUE_MIB: u64 = 16;
const PINGS: usize = 500;

type Attack = Pin<Box<dyn Future<Output = anyhow::Result<String>> + Send>>;
/// An attack's name, and how to start it against a host.
type Named = (&'static str, Box<dyn Fn(Arc<Target>) -> Attack>);

struct Row {
    attack: &'static str,
    outcome: String,
    alone: Duration,
    attacked: Duration,
    rss_growth_kib: u64,
    /// Of that growth, the attacker agent's own linear memory (charged to its cap).
    agent_growth_kib: u64,
    fds: u64,
}

struct Target {
    agents: String,
    manage: String,
    http: reqwest::Client,
}

impl Target {
    async fn get(&self, path: &str) -> anyhow::Result<String> {
        Ok(self.http.get(format!("{}{path}", self.agents)).send().await?.text().await?)
    }

    /// The victim's p99: the median of three runs of `PINGS` requests in a row, as one
    /// run's p99 of sub-millisecond answers moves with a single scheduler hiccup.
    async fn victim_p99(&self) -> anyhow::Result<Duration> {
        let mut p99s = Vec::new();
        for _ in 0..3 {
            let mut samples = Vec::with_capacity(PINGS);
            for _ in 0..PINGS {
                let t = Instant::now();
                let r = self.http.get(format!("{}/victim/ping", self.agents)).send().await?;
                anyhow::ensure!(r.status() == 200, "victim answered {}", r.status());
                r.bytes().await?;
                samples.push(t.elapsed());
            }
            samples.sort();
            p99s.push(percentile(&samples, 0.99));
        }
        p99s.sort();
        Ok(p99s[1])
    }

    /// The attacker agent's linear memory now, KiB.
    async fn attacker_memory_kib(&self) -> u64 {
        let report = async {
            let r = self.http.get(format!("{}/api/agents/x", self.manage)).bearer_auth(TOKEN_X).send().await?;
            anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&r.bytes().await?)?)
        };
        report.await.ok().and_then(|v| v["memory_bytes"].as_u64()).unwrap_or(0) / 1024
    }
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Peaks of RSS and fds of `pid`, sampled every 10 ms until stopped.
fn sample(pid: u32) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let (mut rss, mut fds) = (0, 0);
        while !done.load(Ordering::Relaxed) {
            rss = rss.max(proc_rss_kib(pid));
            fds = fds.max(proc_fds(pid));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (rss, fds)
    });
    (stop, task)
}

/// A connection from one of the attacker's addresses, 127.0.0.2 and up (the victim's
/// client is 127.0.0.1).
async fn connect_as_attacker(addr: SocketAddr, which: u8) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 2 + which], 0)))?;
    socket.connect(addr).await
}

/// Opens `n` connections to `addr` from `addresses` addresses in turn, each writing
/// `head`, and holds them for `hold`. What the host keeps of them shows in its file
/// descriptors.
async fn hold_connections(addr: SocketAddr, n: usize, addresses: u8, head: &'static [u8], hold: Duration) -> anyhow::Result<String> {
    let mut open = Vec::new();
    for i in 0..n {
        let Ok(mut c) = connect_as_attacker(addr, (i % usize::from(addresses.max(1))) as u8).await else { break };
        if c.write_all(head).await.is_ok() {
            open.push(c);
        }
    }
    tokio::time::sleep(hold).await;
    Ok(format!("{} connects from {addresses} address(es); the host keeps what its fds show", open.len()))
}

/// CPU time of `pid`'s children that have ended (its compile workers), s.
fn children_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state first, and cutime and cstime 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(13) + field(14);
    ticks as f64 / 100.0
}

/// Deploys `module` to the attacker `n` times in a row: the answers, and the wall and
/// compile CPU time each took.
async fn deploys(t: &Target, pid: u32, module: &[u8], n: u32) -> anyhow::Result<String> {
    let (cpu, started) = (children_cpu_secs(pid), Instant::now());
    let mut statuses = Vec::new();
    let mut reason = String::new();
    for _ in 0..n {
        let r = t.http.post(format!("{}/api/agents/x/deploy", t.manage)).bearer_auth(TOKEN_X).body(module.to_vec()).send().await?;
        statuses.push(r.status().as_u16());
        reason = r.text().await?;
    }
    statuses.dedup();
    let (wall, cpu) = (started.elapsed().as_secs_f64() / f64::from(n), (children_cpu_secs(pid) - cpu) / f64::from(n));
    let reason = reason.split("refused").nth(1).and_then(|r| r.split(['(', ',']).next()).unwrap_or_default().trim().to_owned();
    Ok(format!("HTTP {statuses:?} (refused {reason}) after {wall:.2} s, {cpu:.2} s of compile CPU each"))
}

fn nested_loops_component(depth: usize) -> anyhow::Result<Vec<u8>> {
    let text = format!("(component (core module (func {}{})))", "(loop ".repeat(depth), ")".repeat(depth));
    Ok(wat::parse_str(text)?)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let rows = runtime.block_on(run())?;
    println!("Victim: a probe agent of tenant v, /ping {PINGS} times in a row; attacker: a probe agent of tenant x. tether serve (debug build), loopback.\n");
    println!("| attack | what the host did | victim p99 alone | under attack | ratio | host RSS growth | of it, attacker's own memory | host fds (peak) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let ratio = r.attacked.as_secs_f64() / r.alone.as_secs_f64().max(1e-9);
        println!(
            "| {} | {} | {:.2} ms | {:.2} ms | {ratio:.2}× | {:.1} MiB | {:.1} MiB | {} |",
            r.attack,
            r.outcome,
            r.alone.as_secs_f64() * 1e3,
            r.attacked.as_secs_f64() * 1e3,
            r.rss_growth_kib as f64 / 1024.0,
            r.agent_growth_kib as f64 / 1024.0,
            r.fds
        );
    }
    println!("\nTargets: victim p99 within 2× under every attack; RSS growth under abandoned bodies, less the attacker's own memory, ≤ the queue budget ({QUEUE_MIB} MiB) + 10 %.");
    Ok(())
}

async fn run() -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let probe = build_agent("probe")?;
    let silent = silent_server().await?;
    // max_nesting raised so that a compile bomb gets past the shape check to the compile
    // deadline.
    let head = manifest_head(dir.path(), &format!("[host.limits]\ninbound_queue_bytes = {}\n[host.modules]\nmax_nesting = 100000", QUEUE_MIB << 20), "");
    let manifest = format!(
        r#"{head}
[[tenant]]
name = "v"
token = "victim-token-0123456789"

[[tenant]]
name = "x"
token = "{TOKEN_X}"

[[agent]]
id = "victim"
tenant = "v"
module = "{probe}"

[[agent]]
id = "x"
tenant = "x"
module = "{probe}"
allowed_hosts = ["http://{silent}", "mqtt://{silent}"]
limits = {{ cpu_ms_per_event = 10000, http_rate = {{ burst = 1000000, per_sec = 1000000.0 }} }}
"#,
        probe = probe.display(),
    );
    let path = dir.path().join("manifest.toml");
    std::fs::write(&path, manifest)?;
    let serve = TetherRun::spawn(&[OsStr::new("serve"), OsStr::new("--manifest"), path.as_os_str()], "management API and console", Duration::from_secs(60)).await?;
    let agents = serve.word_after("agent URLs under ")?;
    let manage = serve.word_after("management API and console: ")?;
    let pid = serve.pid().ok_or_else(|| anyhow::anyhow!("tether serve is gone"))?;
    let target = Arc::new(Target { agents, manage, http: reqwest::Client::new() });
    let agent_addr: SocketAddr = target.agents.trim_start_matches("http://").parse()?;
    // Warm up: both agents answer, the connection pool is open.
    target.get("/x/ping").await?;
    target.victim_p99().await?;

    let attacks: Vec<Named> = vec![
        ("abandoned bodies: 40 × 4 MB POSTs to a busy agent", Box::new(move |t| Box::pin(async move {
            let spin = { let t = t.clone(); tokio::spawn(async move { t.get("/x/spin").await }) };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let body = Arc::new(vec![b'x'; 4_000_000]);
            let mut tasks = Vec::new();
            for _ in 0..40 {
                let body = body.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = connect_as_attacker(agent_addr, 0).await?;
                    c.write_all(b"POST /x/ping HTTP/1.1\r\nhost: a\r\ncontent-length: 4000000\r\n\r\n").await?;
                    // Written until the host stops reading (503) or all of it; then gone.
                    let _ = tokio::time::timeout(Duration::from_secs(2), c.write_all(&body)).await;
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
            let _ = spin.await;
            Ok("503 past inbound_queue_bytes; abandoned ones dropped".to_owned())
        }))),
        ("slowloris: 2000 connections from one address, headers never finished", Box::new(move |_| Box::pin(async move {
            hold_connections(agent_addr, 2000, 1, b"GET /x/ping HTTP/1.1\r\nhost: a\r\n", Duration::from_secs(2)).await
        }))),
        ("slow bodies: 600 connections from 8 addresses to one agent, bodies never sent", Box::new(move |_| Box::pin(async move {
            hold_connections(agent_addr, 600, 8, b"POST /x/ping HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n", Duration::from_secs(2)).await
        }))),
        ("timers: 100,000 wakeups", Box::new(|t| Box::pin(async move { t.get("/x/timers?n=100000").await }))),
        ("MQTT connections: 1,000", Box::new(move |t| Box::pin(async move {
            t.get(&format!("/x/mqtt/hoard?n=1000&url=tcp://{silent}")).await
        }))),
        ("outgoing requests held: 1,000 × 100 kB", Box::new(move |t| Box::pin(async move {
            t.get(&format!("/x/hold-http?n=1000&bytes=100000&timeout_s=3600&url=http://{silent}/")).await
        }))),
        ("log flood: 100,000 lines", Box::new(|t| Box::pin(async move { t.get("/x/flood-logs?n=100000").await.map(|_| "lines kept within log_rate".to_owned()) }))),
        ("store saves: 10,000", Box::new(|t| Box::pin(async move { t.get("/x/save-many?n=10000").await }))),
        ("shape bombs: 10 deploys of 60,000 functions", Box::new(move |t| Box::pin(async move {
            let bomb = wat::parse_str(format!("(component (core module {}))", "(func)".repeat(60_000)))?;
            deploys(&t, pid, &bomb, 10).await
        }))),
        ("slow compiles: 3 deploys of 20,000 nested loops", Box::new(move |t| Box::pin(async move {
            deploys(&t, pid, &nested_loops_component(20_000)?, 3).await
        }))),
    ];

    let mut rows = Vec::new();
    for (name, attack) in attacks {
        eprintln!("attacks: {name} ...");
        let alone = target.victim_p99().await?;
        let (rss0, memory0) = (proc_rss_kib(pid), target.attacker_memory_kib().await);
        let (stop, sampler) = sample(pid);
        let attacking = tokio::spawn(attack(target.clone()));
        // Let the attack get going before measuring.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let attacked = target.victim_p99().await?;
        let outcome = match tokio::time::timeout(Duration::from_secs(60), attacking).await {
            Ok(Ok(Ok(text))) => text.trim().replace('|', "/"),
            Ok(Ok(Err(e))) => format!("attack failed: {e}"),
            other => format!("attack did not end: {other:?}"),
        };
        stop.store(true, Ordering::Relaxed);
        let (rss, fds) = sampler.await?;
        let agent_growth_kib = target.attacker_memory_kib().await.saturating_sub(memory0);
        rows.push(Row { attack: name, outcome, alone, attacked, rss_growth_kib: rss.saturating_sub(rss0), agent_growth_kib, fds });
        // The attacker agent is restarted between attacks so that one's leftovers (timers,
        // clients, requests) do not count in the next.
        target.http.post(format!("{}/api/agents/x/restart", target.manage)).bearer_auth(TOKEN_X).send().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while target.get("/x/ping").await.ok().as_deref() != Some("pong") {
            anyhow::ensure!(Instant::now() < deadline, "attacker agent did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(serve);
    Ok(rows)
}
