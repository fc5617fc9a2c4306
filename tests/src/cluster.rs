//! A Tether cluster of real processes on loopback: a nats-server with JetStream and
//! `tether serve --cluster` nodes running probe agents, for the cluster tests and bench.
//! Node `n1`'s manifest has the tenants and agents, which it makes the cluster's desired
//! state; the other nodes' manifests have only their own `[host]` and `[manage]`, and they
//! take the agents, and their modules, from the cluster.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{build_agent, build_bin, manifest_head};
use crate::nats::Nats;
use crate::tether_run::TetherRun;

/// How long a node waits for a silent node before taking its agents, in the tests.
pub const LEASE_TTL_MS: u64 = 3000;

/// Every tenant's token: `token-<tenant>-0123456789`.
pub fn token(tenant: &str) -> String {
    format!("token-{tenant}-0123456789")
}

/// One `tether serve --cluster` node.
pub struct Node {
    pub name: String,
    run: TetherRun,
    /// Where its agents' URLs are served: `http://127.0.0.1:<port>`.
    pub agents: String,
    /// Its management API: `http://127.0.0.1:<port>`.
    pub manage: String,
}

impl Node {
    /// Every line the node printed.
    pub fn lines(&self) -> Vec<String> {
        self.run.lines()
    }

    /// The agents this node runs now, by its log.
    pub fn running(&self) -> Vec<String> {
        running(&self.name, &self.lines())
    }

    pub fn pid(&self) -> Option<u32> {
        self.run.pid()
    }

    /// Waits until the node prints a line holding `text`.
    pub async fn wait_line(&self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_lines(text, 1, timeout).await
    }

    /// Waits until the node has printed `n` lines holding `text`.
    pub async fn wait_lines(&self, text: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.run.wait_until(text, timeout, |lines| lines.iter().filter(|l| l.contains(text)).count() >= n).await
    }
}

/// The agents node `name` runs by its log `lines`: those whose last line of
/// "agent X runs on node N" and "agent X left node N" is the first.
pub fn running(name: &str, lines: &[String]) -> Vec<String> {
    let (runs, left) = (format!(" runs on node {name} "), format!(" left node {name}:"));
    let mut state: HashMap<String, bool> = HashMap::new();
    for line in lines {
        let Some(rest) = line.split("cluster: agent ").nth(1) else { continue };
        let Some(id) = rest.split_whitespace().next() else { continue };
        if rest.contains(&runs) {
            state.insert(id.to_owned(), true);
        } else if rest.contains(&left) {
            state.insert(id.to_owned(), false);
        }
    }
    let mut ids: Vec<String> = state.into_iter().filter(|(_, on)| *on).map(|(id, _)| id).collect();
    ids.sort();
    ids
}

/// The NATS server, the nodes and the manifest they share.
pub struct Rig {
    pub nats: Nats,
    pub nodes: Vec<Option<Node>>,
    /// The agents' ids, by tenant.
    pub agents: Vec<(String, String)>,
    dir: tempfile::TempDir,
    probe: PathBuf,
    /// The `tether` binary the nodes run.
    tether: PathBuf,
    /// Lines added to every node's `[host]`.
    host_extra: String,
    /// `[[agent]]` entries added to the manifest.
    pub extra_agents: String,
}

impl Rig {
    /// NATS and `nodes` nodes (`n1`, `n2`, …) with `per_tenant` probe agents in each of
    /// `tenants` (`<tenant>-<i>`), started one after the other.
    pub async fn start(nodes: usize, tenants: &[&str], per_tenant: usize) -> anyhow::Result<Rig> {
        Self::start_with(&build_bin("tether")?, "", nodes, tenants, per_tenant).await
    }

    /// [`Rig::start`] with nodes running `tether` and `host_extra` added to their `[host]`
    /// table.
    pub async fn start_with(tether: &Path, host_extra: &str, nodes: usize, tenants: &[&str], per_tenant: usize) -> anyhow::Result<Rig> {
        Self::start_full(tether, host_extra, "", nodes, tenants, per_tenant).await
    }

    /// [`Rig::start_with`] with more agents: `[[agent]]` entries of existing tenants.
    pub async fn start_full(tether: &Path, host_extra: &str, extra_agents: &str, nodes: usize, tenants: &[&str], per_tenant: usize) -> anyhow::Result<Rig> {
        let nats = Nats::start().await?;
        let probe = build_agent("probe")?;
        let agents = tenants.iter().flat_map(|t| (0..per_tenant).map(move |i| (format!("{t}-{i:04}"), (*t).to_owned()))).collect();
        let mut rig = Rig {
            nats,
            nodes: Vec::new(),
            agents,
            dir: tempfile::tempdir()?,
            probe,
            tether: tether.to_owned(),
            host_extra: host_extra.to_owned(),
            extra_agents: extra_agents.to_owned(),
        };
        for i in 1..=nodes {
            let node = rig.start_node(&format!("n{i}")).await?;
            rig.nodes.push(Some(node));
        }
        Ok(rig)
    }

    /// The manifest of node `name`: its own directories and ports, and the tenants and
    /// agents if `agents`.
    fn manifest(&self, name: &str, agents: bool) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let mut text = manifest_head(&dir, &self.host_extra, "");
        let mut tenants: Vec<&str> = self.agents.iter().map(|(_, t)| t.as_str()).collect();
        tenants.dedup();
        for tenant in tenants.iter().filter(|_| agents) {
            text += &format!("\n[[tenant]]\nname = \"{tenant}\"\ntoken = \"{}\"\n", token(tenant));
        }
        for (id, tenant) in self.agents.iter().filter(|_| agents) {
            text += &format!("\n[[agent]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nmodule = \"{}\"\n", self.probe.display());
        }
        if agents {
            text += &self.extra_agents;
        }
        let path = dir.join("manifest.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts node `name` and waits until it has joined.
    pub async fn start_node(&self, name: &str) -> anyhow::Result<Node> {
        self.start_node_with(name, &[]).await
    }

    /// [`Rig::start_node`] with more options (`--label L`).
    pub async fn start_node_with(&self, name: &str, options: &[&str]) -> anyhow::Result<Node> {
        let url = self.nats.url();
        let ttl = LEASE_TTL_MS.to_string();
        let mut args = vec!["--cluster", &url, "--node", name, "--lease-ttl-ms", &ttl];
        args.extend_from_slice(options);
        self.serve(name, &args, name == "n1").await
    }

    /// `tether serve` of the same manifest without a cluster, as `name`: every agent runs
    /// in it, with its store in files.
    pub async fn start_alone(&self, name: &str) -> anyhow::Result<Node> {
        self.serve(name, &[], true).await
    }

    async fn serve(&self, name: &str, options: &[&str], agents: bool) -> anyhow::Result<Node> {
        let manifest = self.manifest(name, agents)?;
        let args: Vec<&OsStr> = ["serve"].iter().chain(options).chain(&["--manifest"]).map(OsStr::new).chain([manifest.as_os_str()]).collect();
        let run = TetherRun::spawn_program(&self.tether, &args, &[], "management API and console: ", Duration::from_secs(300)).await?;
        let agents = run.word_after("agent URLs under ")?;
        let manage = run.word_after("management API and console: ")?;
        Ok(Node { name: name.to_owned(), run, agents, manage })
    }

    /// Node `i` (0-based), while it runs.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("that node was killed")
    }

    /// The nodes that run.
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    /// `kill -9` of node `i`; its lines.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<Vec<String>> {
        let node = self.nodes[i].take().ok_or_else(|| anyhow::anyhow!("node {i} is not running"))?;
        node.run.kill_9().await
    }

    /// The node that runs agent `id` now, by the logs, waiting up to `timeout` for one.
    pub async fn owner(&self, id: &str, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.nodes.iter().position(|n| n.as_ref().is_some_and(|n| n.running().iter().any(|r| r == id))) {
                return Ok(i);
            }
            anyhow::ensure!(Instant::now() < deadline, "no node runs {id} after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node runs `share` agents or one more, and every agent
    /// runs on exactly one node (the extra agents are not counted).
    pub async fn wait_spread(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_shared(|id| self.agents.iter().any(|(a, _)| a == id), self.agents.len(), timeout).await
    }

    /// [`Rig::wait_spread`] counting the `extra` agents too (none of them pinned): once it
    /// returns, no node has an agent to give away.
    pub async fn wait_spread_with(&self, extra: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_shared(|_| true, self.agents.len() + extra, timeout).await
    }

    /// Waits until the `total` agents that `counted` picks run once each, spread evenly.
    async fn wait_shared(&self, counted: impl Fn(&str) -> bool, total: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let live: Vec<&Node> = self.live().collect();
            let share = total / live.len().max(1);
            let ours = |n: &Node| n.running().into_iter().filter(|id| counted(id)).collect::<Vec<_>>();
            let counts: Vec<usize> = live.iter().map(|n| ours(n).len()).collect();
            let mut all: Vec<String> = live.iter().flat_map(|n| ours(n)).collect();
            all.sort();
            let once = all.len() == total && all.windows(2).all(|w| w[0] != w[1]);
            if once && counts.iter().all(|c| *c == share || *c == share + 1) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "agents not spread over the nodes within {timeout:?}: {counts:?}, {} placed", all.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where node `name`'s files are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// GET `url`: status and body; 0 when no answer came.
pub async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    match http.get(url).timeout(Duration::from_secs(10)).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// GET `url` until it answers 200 (503 while an agent moves); its body.
pub async fn get_ok(http: &reqwest::Client, url: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = get(http, url).await;
        if status == 200 {
            return Ok(body);
        }
        anyhow::ensure!(Instant::now() < deadline, "{url}: {status} {body:?} for {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
