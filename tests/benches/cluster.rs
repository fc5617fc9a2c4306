//! Cluster mode, measured with real processes on loopback (a nats-server with JetStream and
//! release-built `tether serve --cluster` nodes running probe agents):
//! - failover: nodes killed with `kill -9` one after the other (each comes back before the
//!   next kill); for every agent of the killed node, the time from the kill to its first
//!   answer through another node;
//! - an agent's request answered by its own node, and forwarded from another node;
//! - a `/save` request (one `server.save` of 64 bytes) with the store in a file (`tether
//!   serve` without a cluster) and in JetStream KV, beside a `/ping` on the same agent;
//! - a device's round trip (a request from the agent, the device's reply) on a serial
//!   line of the agent's own node, and through `tether gateway` with the agent on a
//!   cluster node; both timed from the HTTP request that makes the agent ask;
//! - one node with many agents, cluster mode off and on: start-up time and memory.
//!
//! `cargo bench -p tether-tests --bench cluster [-- --kills K --requests N --agents A
//! --only gateway]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether_tests::bench::percentile;
use tether_tests::cluster::{Node, Rig, get, get_ok};

/// Saves fast enough for the measurement: the default rate limit would refuse most.
const HOST_EXTRA: &str = "\n[host.limits]\nstore_rate = { burst = 1000000, per_sec = 1000000.0 }\n";

const WAIT: Duration = Duration::from_secs(120);

fn release_tether() -> anyhow::Result<PathBuf> {
    let root = tether_tests::workspace_root();
    let status = std::process::Command::new(env!("CARGO")).args(["build", "--release", "-p", "tether-host", "--bin", "tether"]).current_dir(&root).status()?;
    anyhow::ensure!(status.success(), "cannot build tether in release");
    Ok(root.join("target/release/tether"))
}

fn row(what: &str, times: &mut [Duration]) {
    times.sort();
    println!(
        "| {what} | {} | {:.2} | {:.2} | {:.2} |",
        times.len(),
        percentile(times, 0.5).as_secs_f64() * 1000.0,
        percentile(times, 0.99).as_secs_f64() * 1000.0,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
}

/// `n` sequential GETs of `url`, each timed.
async fn timed(http: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (status, body) = get(http, url).await;
        anyhow::ensure!(status == 200 && !body.contains("failed"), "{url}: {status} {body}");
        times.push(t.elapsed());
    }
    Ok(times)
}

/// The node's resident memory, KiB.
fn rss_kib(node: &Node) -> u64 {
    let status = node.pid().and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok()).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default);
    let (kills, requests, many) = (arg("--kills", 6), arg("--requests", 2000), arg("--agents", 1000));
    let tether = release_tether()?;
    let http = reqwest::Client::new();
    println!("| measurement | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    gateway(&tether, &http, requests).await?;
    if args.iter().any(|a| a == "gateway") {
        return Ok(());
    }

    let mut rig = Rig::start_with(&tether, HOST_EXTRA, 3, &["a", "b", "c"], 10).await?;
    rig.wait_spread(WAIT).await?;

    // Local and forwarded requests, interleaved so that both see the same machine.
    let id = rig.node(0).running().into_iter().next().ok_or_else(|| anyhow::anyhow!("node 1 runs nothing"))?;
    let (here, there) = (format!("{}/{id}/ping", rig.node(0).agents), format!("{}/{id}/ping", rig.node(1).agents));
    timed(&http, &there, 200).await?;
    let (mut local, mut forwarded) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        local.extend(timed(&http, &here, requests / 10).await?);
        forwarded.extend(timed(&http, &there, requests / 10).await?);
    }
    row("request to the agent's own node", &mut local);
    row("request forwarded from another node", &mut forwarded);

    // server.save in JetStream KV, then in a file (the same manifest without a cluster).
    let (save, ping) = (format!("{}/{id}/save?bytes=64", rig.node(0).agents), format!("{}/{id}/ping", rig.node(0).agents));
    let (mut kv_save, mut kv_ping) = (timed(&http, &save, requests).await?, timed(&http, &ping, requests).await?);
    row("/save, store in JetStream KV", &mut kv_save);
    row("/ping beside it", &mut kv_ping);
    let alone = rig.start_alone("alone").await?;
    let (save, ping) = (format!("{}/{id}/save?bytes=64", alone.agents), format!("{}/{id}/ping", alone.agents));
    get_ok(&http, &ping, WAIT).await?;
    let (mut file_save, mut file_ping) = (timed(&http, &save, requests).await?, timed(&http, &ping, requests).await?);
    row("/save, store in a file (no cluster)", &mut file_save);
    row("/ping beside it", &mut file_ping);
    drop(alone);

    // Failover: kill each node in turn; every agent of it timed to its first answer.
    let mut moved = Vec::new();
    let mut whole = Vec::new();
    for k in 0..kills {
        let victim = k % rig.nodes.len();
        let ids = rig.node(victim).running();
        let via = rig.node((victim + 1) % rig.nodes.len()).agents.clone();
        let killed = Instant::now();
        rig.kill(victim).await?;
        let waits = ids.iter().map(|id| {
            let (http, url) = (http.clone(), format!("{via}/{id}/ping"));
            tokio::spawn(async move {
                loop {
                    if get(&http, &url).await.0 == 200 {
                        return killed.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        let mut all = Duration::ZERO;
        for wait in waits.collect::<Vec<_>>() {
            let t = tokio::time::timeout(WAIT, wait).await??;
            all = all.max(t);
            moved.push(t);
        }
        whole.push(all);
        let name = format!("n{}", victim + 1);
        rig.nodes[victim] = Some(rig.start_node(&name).await?);
        rig.wait_spread(WAIT).await?;
    }
    row(&format!("failover: one agent answers again after kill -9 of its node (lease TTL {} ms)", tether_tests::cluster::LEASE_TTL_MS), &mut moved);
    row("failover: all of the node's agents answer again", &mut whole);
    drop(rig);

    // Many agents on one node, cluster mode off and on.
    println!();
    println!("| one node, {many} agents | all answering after start, s | RSS, MiB | KiB per agent |");
    println!("|---|---:|---:|---:|");
    for cluster in [false, true] {
        let rig = Rig::start_with(&tether, "", 0, &["t"], many).await?;
        let started = Instant::now();
        let node = if cluster { rig.start_node("n1").await? } else { rig.start_alone("alone").await? };
        for (id, _) in &rig.agents {
            get_ok(&http, &format!("{}/{id}/ping", node.agents), WAIT).await?;
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(&node);
        println!("| cluster mode {} | {:.1} | {:.0} | {:.1} |", if cluster { "on" } else { "off" }, took.as_secs_f64(), rss as f64 / 1024.0, rss as f64 / many as f64);
    }
    Ok(())
}

/// A device round trip through a local serial line, then through a gateway.
async fn gateway(tether: &std::path::Path, http: &reqwest::Client, requests: usize) -> anyhow::Result<()> {
    use std::ffi::OsStr;
    let probe = tether_tests::build_agent("device-probe")?;
    let scratch = tempfile::tempdir()?;
    let link = scratch.path().join("ttyBOARD");
    let link_arg = link.to_str().unwrap_or_default().to_owned();
    let _sim = tether_tests::DeviceSim::start(&["--link", &link_arg, "--device-id", "board-1", "--interval", "0"])?;
    let entry = |device: &str| format!("\n[[agent]]\nid = \"board\"\ntenant = \"a\"\nmodule = \"{}\"\ndevice = {device}\n", probe.display());
    let ask = |base: &str| format!("{base}/board/request?name=ping");

    // The device on the agent's own node.
    let rig = Rig::start_full(tether, "", &entry(&format!("{{ path = \"{link_arg}\" }}")), 0, &["a"], 1).await?;
    let alone = rig.start_alone("alone").await?;
    wait_reply(http, &ask(&alone.agents)).await?;
    let mut local = timed(http, &ask(&alone.agents), requests).await?;
    drop(alone);
    drop(rig);

    // The device on a gateway, the agent on a cluster node.
    let rig = Rig::start_full(tether, "", &entry("{ gateway = true }"), 1, &["a"], 1).await?;
    let url = rig.nats.url();
    let args: Vec<&OsStr> = ["gateway", "--cluster", &url, "--device", &link_arg, "--agent", "board"].into_iter().map(OsStr::new).collect();
    let _gateway = tether_tests::tether_run::TetherRun::spawn_program(tether, &args, &[], "gateway for agent", WAIT).await?;
    wait_reply(http, &ask(&rig.node(0).agents)).await?;
    let mut through = timed(http, &ask(&rig.node(0).agents), requests).await?;
    row("device round trip, serial line on the agent's node", &mut local);
    row("device round trip, through tether gateway over NATS", &mut through);
    Ok(())
}

/// Waits until the device answers the agent's ping.
async fn wait_reply(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while get(http, url).await.1 != "reply \"pong\"" {
        anyhow::ensure!(Instant::now() < deadline, "the device does not answer at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
