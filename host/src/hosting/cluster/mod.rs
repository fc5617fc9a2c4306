//! Cluster mode: `tether serve --cluster nats://…`. Nodes given the same manifest share
//! their agents through NATS JetStream:
//! - each agent has one owner at a time, by a lease in KV taken with compare-and-set on
//!   its revision, and moves when its owner's heartbeat stops ([`placement`]);
//! - its `server.save` value lives in KV, written with compare-and-set so that a node
//!   that lost the agent cannot overwrite the new owner's value ([`store`]);
//! - a request for it reaches any node and is forwarded to its owner over NATS
//!   request/reply ([`forward`]);
//! - a deploy through any node is kept in KV and the object store, and the owner runs it;
//! - the tenants and agents themselves (the desired state) are kept in KV, so that a node
//!   joins with nothing but its own `[host]` and `[manage]` settings ([`desired`]).
//!
//! See docs/cluster.md for the topology and what a failure does.

mod desired;
mod forward;
mod placement;
mod queues;
mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use tokio::io::AsyncReadExt;

use crate::hosting::manifest::Manifest;
use crate::runtime::host::Host;

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The NATS server(s), `nats://host:port`, comma-separated.
    pub url: String,
    /// This node's name, unique in the cluster (KV keys: letters, digits, `-`, `_`).
    pub node: String,
    /// How long a node's heartbeat may be missing before its agents move; a node that
    /// cannot renew its own for half of this stops its agents first.
    pub lease_ttl: Duration,
    /// Copies JetStream keeps of leases, stores and modules (1 with one NATS server; 3 on
    /// a three-server NATS cluster).
    pub replicas: usize,
    /// This node's labels: agents with a `node_label` run only on nodes that have it.
    pub labels: Vec<String>,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {url}: {source}")]
    Connect { url: String, source: async_nats::ConnectError },
    #[error("cannot open the JetStream {what} bucket or stream (is JetStream enabled on the server, `nats-server -js`?): {reason}")]
    Bucket { what: &'static str, reason: String },
    #[error("node name {0:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'")]
    NodeName(String),
    #[error("the lease TTL must be at least 1 s")]
    Ttl,
    #[error("{0}")]
    Desired(String),
}

/// The JetStream buckets a cluster keeps.
pub(crate) struct Buckets {
    /// Node name → its heartbeat.
    nodes: kv::Store,
    /// Agent id → the node that owns it.
    leases: kv::Store,
    /// Agent id → its `server.save` value.
    stores: kv::Store,
    /// Agent id → the module deployed through the API ([`DeployRecord`]).
    deploys: kv::Store,
    /// Module bytes by SHA-256.
    modules: object_store::ObjectStore,
    /// Every agent's durable queues ([`queues`]).
    queues: jetstream::stream::Stream,
    js: jetstream::Context,
    /// The cluster's tenants and agents ([`desired`]).
    desired: kv::Store,
}

/// A deploy through the management API, kept in the deploys bucket.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeployRecord {
    module: String,
    by: String,
}

/// A node in a cluster: the placement loop and the forwarding of requests.
pub struct Cluster {
    node: String,
    client: async_nats::Client,
    buckets: Arc<Buckets>,
    placement: tokio::sync::Mutex<Option<placement::Handle>>,
    /// The watch on the desired state, for the log.
    watching: tokio::task::JoinHandle<()>,
}

/// A node connected to the cluster's NATS, before it joins: where it learns the cluster's
/// desired state.
pub struct Connection {
    config: ClusterConfig,
    client: async_nats::Client,
    buckets: Arc<Buckets>,
    /// The desired state this node runs, once read.
    running: Option<String>,
}

impl Connection {
    /// The manifest this node runs: its own file's `[host]` and `[manage]`, with the
    /// cluster's tenants and agents. A file that has tenants or agents makes them (and its
    /// `[host.limits]`) the cluster's, its modules put in the object store; a file without
    /// them takes the cluster's (docs/cluster.md, "Desired state").
    pub async fn manifest(&mut self, path: &Path) -> Result<Manifest, ClusterError> {
        let (manifest, running) = desired::manifest(&self.buckets, path).await?;
        self.running = Some(running);
        Ok(manifest)
    }

    /// Joins with `host`, which serves `manifest`'s agents that this node comes to own; no
    /// agent runs here before it has its lease.
    pub fn join(self, host: Arc<Host>, manifest: &Manifest) -> Cluster {
        let Connection { config, client, buckets, running } = self;
        let forwarder = forward::Forwarder::new(client.clone(), manifest);
        host.set_forward(Arc::new(forwarder));
        host.set_gateways(client.clone());
        let placement = placement::start(host, manifest, client.clone(), buckets.clone(), &config);
        let watching = tokio::spawn(desired::notice_changes(buckets.clone(), running.unwrap_or_default()));
        Cluster { node: config.node, client, buckets, placement: tokio::sync::Mutex::new(Some(placement)), watching }
    }
}

impl Cluster {
    /// Connects to the cluster's NATS at `config.url` and opens its buckets.
    pub async fn connect(config: ClusterConfig) -> Result<Connection, ClusterError> {
        crate::hosting::config::check_agent_id(&config.node).map_err(|_| ClusterError::NodeName(config.node.clone()))?;
        if config.lease_ttl < Duration::from_secs(1) {
            return Err(ClusterError::Ttl);
        }
        let client = async_nats::ConnectOptions::new()
            .name(format!("tether {}", config.node))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(config.url.as_str())
            .await
            .map_err(|source| ClusterError::Connect { url: config.url.clone(), source })?;
        let js = jetstream::new(client.clone());
        let buckets = Arc::new(Buckets {
            // A node gone for an hour drops out of the list that the API asks.
            nodes: bucket(&js, "tether_nodes", config.replicas, Duration::from_secs(3600)).await?,
            leases: bucket(&js, "tether_leases", config.replicas, Duration::ZERO).await?,
            stores: bucket(&js, "tether_stores", config.replicas, Duration::ZERO).await?,
            deploys: bucket(&js, "tether_deploys", config.replicas, Duration::ZERO).await?,
            modules: objects(&js, "tether_modules", config.replicas).await?,
            queues: queues::stream(&js, config.replicas).await.map_err(|reason| ClusterError::Bucket { what: queues::STREAM, reason })?,
            desired: bucket(&js, "tether_desired", config.replicas, Duration::ZERO).await?,
            js,
        });
        Ok(Connection { config, client, buckets, running: None })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster's NATS connection.
    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The node that holds agent `id`'s lease, if any.
    pub(crate) async fn owner_of(&self, id: &str) -> Option<String> {
        let entry = self.buckets.leases.entry(id).await.ok()??;
        (entry.operation == kv::Operation::Put).then(|| String::from_utf8_lossy(&entry.value).into_owned())
    }

    /// The nodes with a heartbeat in the bucket (a node that died lately among them, until
    /// its entry is replaced or removed).
    pub(crate) async fn nodes(&self) -> Vec<String> {
        use futures_util::StreamExt;
        match self.buckets.nodes.keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(_) => vec![self.node.clone()],
        }
    }

    /// Keeps `bytes` (a module that compiled, `digest`) as agent `id`'s version in the
    /// cluster: the node that owns the agent runs it, now and after any move.
    pub async fn publish_deploy(&self, id: &str, digest: &str, bytes: &[u8], by: &str) -> anyhow::Result<()> {
        publish_deploy(&self.buckets, id, digest, bytes, by).await
    }

    /// Hands this node's agents over and leaves: each is stopped and its lease given up
    /// at once, so other nodes take it without waiting for the heartbeat to expire.
    pub async fn leave(&self) {
        self.watching.abort();
        if let Some(placement) = self.placement.lock().await.take() {
            placement.leave().await;
        }
    }
}

async fn publish_deploy(buckets: &Buckets, id: &str, digest: &str, bytes: &[u8], by: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    if buckets.modules.info(digest).await.is_err() {
        let mut reader = bytes;
        buckets.modules.put(digest, &mut reader).await.map_err(|e| anyhow::anyhow!("{e}")).context("cannot keep the module in the object store")?;
    }
    let record = serde_json::to_vec(&DeployRecord { module: digest.to_owned(), by: by.to_owned() })?;
    buckets.deploys.put(id, record.into()).await.map_err(|e| anyhow::anyhow!("{e}")).context("cannot record the deploy in KV")?;
    Ok(())
}

/// The bytes of module `digest` from the object store.
async fn module_bytes(buckets: &Buckets, digest: &str) -> anyhow::Result<Vec<u8>> {
    let mut object = buckets.modules.get(digest).await.map_err(|e| anyhow::anyhow!("module {digest} is not in the object store: {e}"))?;
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await?;
    Ok(bytes)
}

/// `max_age`: how long an entry lives without being written again (zero: for ever).
async fn bucket(js: &jetstream::Context, name: &'static str, replicas: usize, max_age: Duration) -> Result<kv::Store, ClusterError> {
    // The stream a KV bucket is, made as `create_key_value` makes it: that function first
    // asks for the account's limits, and async-nats 0.51 cannot read nats-server 2.9's
    // answer. Creating a stream that exists with the same settings is a no-op.
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas.max(1),
        discard: jetstream::stream::DiscardPolicy::New,
        max_age,
        ..Default::default()
    };
    let failed = |e: &dyn std::fmt::Display| ClusterError::Bucket { what: name, reason: e.to_string() };
    js.create_stream(config).await.map_err(|e| failed(&e))?;
    js.get_key_value(name).await.map_err(|e| failed(&e))
}

async fn objects(js: &jetstream::Context, name: &'static str, replicas: usize) -> Result<object_store::ObjectStore, ClusterError> {
    let config = object_store::Config { bucket: name.to_owned(), num_replicas: replicas.max(1), storage: jetstream::stream::StorageType::File, ..Default::default() };
    match js.create_object_store(config).await {
        Ok(store) => Ok(store),
        Err(made) => js.get_object_store(name).await.map_err(|e| ClusterError::Bucket { what: name, reason: format!("{made}; {e}") }),
    }
}
