//! Which node runs which agent. Every node puts a heartbeat into the nodes bucket five
//! times per lease TTL, and watches the nodes and leases buckets. An agent's lease names
//! its owner; a node takes a lease that is free, or whose owner has not been heard from for
//! a TTL, with a compare-and-set on the revision it saw, so two nodes never both win it.
//! Each node takes up to its fair share (agents / live nodes, rounded up) and gives back
//! what is over it, a few per round, so a node that comes back gets agents again. An agent
//! with a `node_label` runs only on nodes started with that `--label`, outside the share.
//!
//! No agent runs twice: a node that cannot renew its heartbeat for half a TTL stops its
//! agents itself, before any other node would take them; and a node that still ran one
//! anyway (paused past that) finds its saves refused (see `store`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::queues::StreamQueues;
use super::{Buckets, ClusterConfig, DeployRecord, forward, module_bytes, store::KvStore};
use crate::hosting::config::AgentPolicy;
use crate::hosting::config::AgentSettings;
use crate::hosting::manifest::{Manifest, ModuleSource};
use crate::runtime::engine::AgentModule;
use crate::runtime::host::{Host, Kept};

/// Agents one round gives back: the others see them free a round later.
const RELEASES_PER_ROUND: usize = 4;

/// A manifest agent, as placement needs it.
struct Agent {
    id: String,
    settings: AgentSettings,
    policy: AgentPolicy,
    module: ModuleSource,
    /// Only nodes with this label run it.
    label: Option<String>,
}

/// One lease as last seen in the bucket.
#[derive(Clone)]
struct Lease {
    /// `None`: given back.
    owner: Option<String>,
    revision: u64,
}

/// What the watches have seen.
#[derive(Default)]
struct Seen {
    /// Node → when its heartbeat was last seen to change.
    nodes: HashMap<String, Instant>,
    leases: HashMap<String, Lease>,
    /// Agent id → the module deployed to it through the API.
    deploys: HashMap<String, String>,
}

/// An agent running here.
struct Owned {
    /// The lease revision this node holds it by.
    revision: u64,
    /// The module it runs.
    module: String,
    /// Pinned by label: outside the fair share.
    pinned: bool,
    forwarding: JoinHandle<()>,
}

/// The placement loop, to be stopped when the node leaves.
pub(super) struct Handle {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops the loop, which hands this node's agents over, and waits for it.
    pub async fn leave(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

pub(super) fn start(host: Arc<Host>, manifest: &Manifest, client: async_nats::Client, buckets: Arc<Buckets>, config: &ClusterConfig) -> Handle {
    let agents = manifest
        .agents
        .iter()
        .map(|a| Agent { id: a.id.clone(), settings: a.settings.clone(), policy: a.policy.clone(), module: a.module.clone(), label: a.node_label.clone() })
        .filter(|a| a.label.as_ref().is_none_or(|l| config.labels.contains(l)))
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watches = vec![
        tokio::spawn(watch(buckets.nodes.clone(), seen.clone(), |seen, entry| {
            match entry.operation {
                kv::Operation::Put => seen.nodes.insert(entry.key, Instant::now()),
                _ => seen.nodes.remove(&entry.key),
            };
        })),
        tokio::spawn(watch(buckets.leases.clone(), seen.clone(), |seen, entry| {
            let owner = (entry.operation == kv::Operation::Put).then(|| String::from_utf8_lossy(&entry.value).into_owned());
            seen.leases.insert(entry.key, Lease { owner, revision: entry.revision });
        })),
        tokio::spawn(watch(buckets.deploys.clone(), seen.clone(), |seen, entry| {
            match serde_json::from_slice::<DeployRecord>(&entry.value) {
                Ok(record) if entry.operation == kv::Operation::Put => seen.deploys.insert(entry.key, record.module),
                _ => seen.deploys.remove(&entry.key),
            };
        })),
    ];
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let beat = Arc::new(Beat::default());
    let beating = tokio::spawn(heartbeat(buckets.nodes.clone(), config.node.clone(), config.lease_ttl / 5, beat.clone()));
    let node = Node {
        host,
        client,
        buckets,
        name: config.node.clone(),
        ttl: config.lease_ttl,
        agents,
        seen,
        owned: HashMap::new(),
        modules: HashMap::new(),
        joined: Instant::now(),
        beat,
        write_timeout: config.lease_ttl / 5,
    };
    let task = tokio::spawn(async move {
        node.run(stopped, beating).await;
        for watch in watches {
            watch.abort();
        }
    });
    Handle { stop, task }
}

/// Follows a bucket from its current values on, again after any break.
async fn watch(bucket: kv::Store, seen: Arc<Mutex<Seen>>, apply: fn(&mut Seen, kv::Entry)) {
    loop {
        if let Ok(mut entries) = bucket.watch_with_history(">").await {
            while let Some(Ok(entry)) = entries.next().await {
                apply(&mut seen.lock().unwrap_or_else(|p| p.into_inner()), entry);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The heartbeat's state, shared with the placement loop.
#[derive(Default)]
struct Beat {
    /// When it was last stored.
    stored: Mutex<Option<Instant>>,
    /// Agents running here, for the heartbeat's value.
    agents: std::sync::atomic::AtomicUsize,
}

/// Stores this node's heartbeat every `every`, in a task of its own so that a busy
/// placement round (a compile, say) never delays it.
async fn heartbeat(nodes: kv::Store, name: String, every: Duration, beat: Arc<Beat>) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let value = serde_json::json!({ "agents": beat.agents.load(std::sync::atomic::Ordering::Relaxed) }).to_string();
        match tokio::time::timeout(every, nodes.put(&name, value.into())).await {
            Ok(Ok(_)) => *beat.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now()),
            Ok(Err(e)) => tracing::warn!("cluster: cannot store this node's heartbeat: {e}"),
            Err(_) => tracing::warn!("cluster: storing this node's heartbeat took over {} ms", every.as_millis()),
        }
    }
}

/// This node's side of placement.
struct Node {
    host: Arc<Host>,
    client: async_nats::Client,
    buckets: Arc<Buckets>,
    name: String,
    ttl: Duration,
    agents: Vec<Agent>,
    seen: Arc<Mutex<Seen>>,
    owned: HashMap<String, Owned>,
    /// Manifest modules, loaded once.
    modules: HashMap<ModuleSource, AgentModule>,
    joined: Instant,
    beat: Arc<Beat>,
    /// How long a KV write may take before the round gives up on it.
    write_timeout: Duration,
}

impl Node {
    async fn run(mut self, mut stop: tokio::sync::oneshot::Receiver<()>, beating: JoinHandle<()>) {
        let mut rounds = tokio::time::interval(self.ttl / 5);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => self.round().await,
                _ = &mut stop => break,
            }
        }
        beating.abort();
        self.leave().await;
    }

    /// Whether this node's heartbeat is fresh enough for it to run agents: stored within
    /// half a TTL, so the others, who wait a whole TTL, have not taken its agents.
    fn fresh(&self) -> bool {
        self.beat.stored.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|at| at.elapsed() <= self.ttl / 2)
    }

    async fn round(&mut self) {
        self.beat.agents.store(self.owned.len(), std::sync::atomic::Ordering::Relaxed);
        if !self.fresh() {
            // The others will take these agents once the heartbeat is a TTL old: they
            // must be gone from here before that.
            if !self.owned.is_empty() {
                tracing::warn!("cluster: no heartbeat stored for half a lease TTL; stopping this node's {} agents until NATS is back", self.owned.len());
                let ids: Vec<String> = self.owned.keys().cloned().collect();
                for id in ids {
                    self.drop_agent(&id, "this node lost NATS").await;
                }
            }
            return;
        }
        let (live, leases, deploys) = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let live: HashSet<String> = seen.nodes.iter().filter(|(_, at)| at.elapsed() < self.ttl).map(|(n, _)| n.clone()).chain([self.name.clone()]).collect();
            (live, seen.leases.clone(), seen.deploys.clone())
        };
        self.notice_losses(&leases).await;
        self.follow_deploys(&deploys).await;
        // Agents pinned by label go to the nodes with it, outside the share.
        let fair = self.agents.iter().filter(|a| a.label.is_none()).count().div_ceil(live.len().max(1));
        self.give_back(fair, &leases).await;
        self.take(fair, &live, &leases, &deploys).await;
    }

    /// Agents whose lease another node now holds: stop them here at once.
    async fn notice_losses(&mut self, leases: &HashMap<String, Lease>) {
        let lost: Vec<String> = self
            .owned
            .iter()
            .filter(|(id, owned)| leases.get(*id).is_some_and(|l| l.revision > owned.revision && l.owner.as_deref() != Some(&self.name)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.drop_agent(&id, "another node took its lease").await;
        }
    }

    /// Runs the version deployed through any node's API on the agents here.
    async fn follow_deploys(&mut self, deploys: &HashMap<String, String>) {
        let changed: Vec<(String, String)> = self
            .owned
            .iter()
            .filter_map(|(id, owned)| deploys.get(id).filter(|d| **d != owned.module).map(|d| (id.clone(), d.clone())))
            .collect();
        for (id, digest) in changed {
            match self.deployed_module(&digest).await {
                Ok(module) => {
                    if let Some(owned) = self.owned.get_mut(&id) {
                        owned.module = digest.clone();
                    }
                    // The node whose API took the deploy may have swapped it in already.
                    if self.host.agent(&id).is_some_and(|a| a.module_digest != digest) {
                        let _ = self.host.deploy(&id, module);
                        tracing::info!(agent = id, "cluster: running sha256:{digest}, deployed through the cluster");
                    }
                }
                Err(e) => tracing::error!(agent = id, "cluster: cannot run the deployed version sha256:{digest}: {e:#}"),
            }
        }
    }

    /// Agents running here that count against the fair share: those not pinned by label.
    fn shared(&self) -> Vec<String> {
        self.owned.iter().filter(|(_, o)| !o.pinned).map(|(id, _)| id.clone()).collect()
    }

    /// Gives back agents over this node's fair share, a few per round.
    async fn give_back(&mut self, fair: usize, leases: &HashMap<String, Lease>) {
        let shared = self.shared();
        let over = shared.len().saturating_sub(fair).min(RELEASES_PER_ROUND);
        let ids: Vec<String> = shared.into_iter().take(over).collect();
        for id in ids {
            let revision = self.owned.get(&id).map(|o| o.revision);
            self.drop_agent(&id, "spreading agents over the nodes").await;
            if let Some(revision) = revision.filter(|r| leases.get(&id).is_some_and(|l| l.revision == *r)) {
                let _ = tokio::time::timeout(self.write_timeout, self.buckets.leases.delete_expect_revision(&id, Some(revision))).await;
            }
        }
    }

    /// Takes free agents, and those of nodes not heard from for a TTL, up to the fair
    /// share; agents pinned to one of its labels, and its own leases, whatever the share.
    async fn take(&mut self, fair: usize, live: &HashSet<String>, leases: &HashMap<String, Lease>, deploys: &HashMap<String, String>) {
        // Starting at a different agent on each node keeps them from all trying the same.
        let start = self.name.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into())) % self.agents.len().max(1);
        let order: Vec<usize> = (0..self.agents.len()).map(|i| (start + i) % self.agents.len()).collect();
        // A node that just joined has not yet seen whose heartbeats are fresh.
        let settled = self.joined.elapsed() >= self.ttl;
        let mut shared = self.shared().len();
        for index in order {
            let id = self.agents[index].id.clone();
            if self.owned.contains_key(&id) {
                continue;
            }
            let lease = leases.get(&id);
            let mine = lease.is_some_and(|l| l.owner.as_deref() == Some(&self.name));
            let free = match lease {
                None => true,
                Some(Lease { owner: None, .. }) => true,
                Some(Lease { owner: Some(owner), .. }) => settled && !live.contains(owner),
            };
            let pinned = self.agents[index].label.is_some();
            if !(mine || (free && (pinned || shared < fair))) {
                continue;
            }
            if !self.fresh() {
                break;
            }
            let value = bytes::Bytes::from(self.name.clone());
            let taken = match lease {
                None => tokio::time::timeout(self.write_timeout, self.buckets.leases.create(&id, value)).await.map(|r| r.map_err(|e| e.to_string())),
                Some(l) => tokio::time::timeout(self.write_timeout, self.buckets.leases.update(&id, value, l.revision)).await.map(|r| r.map_err(|e| e.to_string())),
            };
            // Lost the race, or NATS is slow: the watch shows who has it next round.
            let Ok(Ok(revision)) = taken else { continue };
            if !pinned {
                shared += 1;
            }
            if let Err(e) = self.run_agent(index, revision, deploys.get(&id)).await {
                tracing::error!(agent = id, "cluster: cannot run the agent here: {e:#}; giving its lease back");
                let _ = tokio::time::timeout(self.write_timeout, self.buckets.leases.delete_expect_revision(&id, Some(revision))).await;
            }
        }
    }

    /// Starts agent `index` here, holding its lease at `revision`.
    async fn run_agent(&mut self, index: usize, revision: u64, deployed: Option<&String>) -> anyhow::Result<()> {
        let agent = &self.agents[index];
        let id = agent.id.clone();
        let module = match deployed {
            Some(digest) => self.deployed_module(digest).await?,
            None => self.manifest_module(index).await?,
        };
        let digest = module.digest.clone();
        let store = KvStore::open(self.buckets.stores.clone(), &id, tokio::runtime::Handle::current()).await?;
        let subscription = self.client.subscribe(forward::subject(&id)).await?;
        let agent = &self.agents[index];
        let queues = StreamQueues::new(self.buckets.queues.clone(), self.buckets.js.clone(), &id, agent.policy.limits.queue_bytes as u64, tokio::runtime::Handle::current());
        let kept = Kept { store: Box::new(store), queues: Arc::new(queues) };
        self.host.spawn_kept(&id, agent.settings.clone(), agent.policy.clone(), module, Some(kept))?;
        let forwarding = tokio::spawn(forward::serve(self.host.clone(), self.client.clone(), id.clone(), subscription));
        tracing::info!(agent = id, "cluster: agent {id} runs on node {} (lease revision {revision})", self.name);
        let pinned = self.agents[index].label.is_some();
        self.owned.insert(id, Owned { revision, module: digest, pinned, forwarding });
        Ok(())
    }

    async fn manifest_module(&mut self, index: usize) -> anyhow::Result<AgentModule> {
        let source = &self.agents[index].module;
        if let Some(module) = self.modules.get(source) {
            return Ok(module.clone());
        }
        let module = match source {
            ModuleSource::Path(path) => self.host.runtime().load_file(path)?,
            // The cluster's desired state names modules by digest, kept in the object store.
            ModuleSource::Digest(digest) => self.deployed_module(digest).await?,
        };
        let source = source.clone();
        self.modules.insert(source, module.clone());
        Ok(module)
    }

    /// A module by digest (deployed through the API, or named so by the desired state):
    /// from this node's cache, else from the object store.
    async fn deployed_module(&self, digest: &str) -> anyhow::Result<AgentModule> {
        if let Ok(module) = self.host.runtime().load_cached(digest) {
            return Ok(module);
        }
        let bytes = module_bytes(&self.buckets, digest).await?;
        Ok(self.host.compile(bytes).await?)
    }

    /// Stops agent `id` here; its lease stays as it is.
    async fn drop_agent(&mut self, id: &str, why: &str) {
        let Some(owned) = self.owned.remove(id) else { return };
        owned.forwarding.abort();
        self.host.remove_agent(id).await;
        tracing::info!(agent = id, "cluster: agent {id} left node {}: {why}", self.name);
    }

    /// Gives every agent back and the heartbeat up, so that the others take them now.
    async fn leave(&mut self) {
        let owned: Vec<(String, u64)> = self.owned.iter().map(|(id, o)| (id.clone(), o.revision)).collect();
        for (id, revision) in owned {
            self.drop_agent(&id, "the node is shutting down").await;
            let _ = tokio::time::timeout(self.write_timeout, self.buckets.leases.delete_expect_revision(&id, Some(revision))).await;
        }
        let _ = tokio::time::timeout(self.write_timeout, self.buckets.nodes.delete(&self.name)).await;
    }
}
