//! The cluster's desired state: the tenants and agents of a manifest (with its
//! `[host.limits]`, the agents' defaults), kept as TOML text under one KV key. A node whose
//! manifest has tenants or agents makes them the cluster's, putting each module file in the
//! object store by its SHA-256 and naming it by digest in the text; a node whose manifest
//! has neither runs the cluster's. Either way a node's own `[host]` (addresses,
//! directories) and `[manage]` stay its own.
//!
//! A node reads the desired state when it starts. One that is running when another node
//! puts a new one keeps what it has, and says so in its log, until it is restarted.

use std::path::Path;

use futures_util::StreamExt;
use sha2::Digest;

use super::{Buckets, ClusterError};
use crate::hosting::manifest::Manifest;

/// The key of the desired state in the `tether_desired` bucket.
const KEY: &str = "manifest";

/// The tables of a manifest that are the cluster's rather than the node's.
const CLUSTER_TABLES: [&str; 2] = ["tenant", "agent"];

fn failed(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Desired(format!("{what}: {e}"))
}

/// The manifest a node with the file at `path` runs: see the module's doc.
/// With the manifest, the desired state's text it was made from.
pub(super) async fn manifest(buckets: &Buckets, path: &Path) -> Result<(Manifest, String), ClusterError> {
    let text = std::fs::read_to_string(path).map_err(|e| failed(&format!("cannot read {}", path.display()), e))?;
    let mut local: toml::Table = toml::from_str(&text).map_err(|e| failed(&format!("{} is not TOML", path.display()), e.message()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    // Checked as a manifest of its own first, so its errors name its lines.
    Manifest::load(path).map_err(|e| failed("the manifest", e))?;
    let desired = if CLUSTER_TABLES.iter().any(|t| local.contains_key(*t)) {
        publish(buckets, &local, base).await?
    } else {
        let entry = buckets.desired.entry(KEY).await.map_err(|e| failed("cannot read the cluster's desired state", e))?;
        let entry = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put).ok_or_else(|| {
            ClusterError::Desired(format!("{} has no tenants or agents, and the cluster has none yet: start one node with a manifest that has them", path.display()))
        })?;
        String::from_utf8(entry.value.to_vec()).map_err(|e| failed("the cluster's desired state", e))?
    };
    // The node's own settings, the cluster's tenants, agents and agent limits.
    let running = desired.clone();
    let mut desired: toml::Table = toml::from_str(&desired).map_err(|e| failed("the cluster's desired state is not TOML", e.message()))?;
    for table in CLUSTER_TABLES {
        local.remove(table);
        if let Some(value) = desired.remove(table) {
            local.insert(table.to_owned(), value);
        }
    }
    if let Some(limits) = desired.get("host").and_then(|h| h.get("limits")).cloned()
        && let Some(toml::Value::Table(host)) = local.get_mut("host")
    {
        host.insert("limits".to_owned(), limits);
    }
    let composed = toml::to_string(&local).map_err(|e| failed("cannot write the composed manifest", e))?;
    let manifest = Manifest::parse(&composed, base).map_err(|(line, message)| failed("the cluster's desired state with this node's settings", format!("line {line}: {message}")))?;
    Ok((manifest, running))
}

/// Makes the tenants, agents and `[host.limits]` of `local` the cluster's: module files
/// into the object store, named by digest. The text kept, which is what this node runs.
async fn publish(buckets: &Buckets, local: &toml::Table, base: &Path) -> Result<String, ClusterError> {
    let mut desired = toml::Table::new();
    if let Some(limits) = local.get("host").and_then(|h| h.get("limits")) {
        let mut host = toml::Table::new();
        host.insert("limits".to_owned(), limits.clone());
        desired.insert("host".to_owned(), toml::Value::Table(host));
    }
    for table in CLUSTER_TABLES {
        if let Some(value) = local.get(table) {
            desired.insert(table.to_owned(), value.clone());
        }
    }
    if let Some(toml::Value::Array(agents)) = desired.get_mut("agent") {
        for agent in agents.iter_mut().filter_map(toml::Value::as_table_mut) {
            let Some(toml::Value::String(module)) = agent.get("module") else { continue };
            if module.starts_with("sha256:") {
                continue;
            }
            let file = base.join(module.as_str());
            let bytes = std::fs::read(&file).map_err(|e| failed(&format!("cannot read module {}", file.display()), e))?;
            let digest = hex::encode(sha2::Sha256::digest(&bytes));
            if buckets.modules.info(&digest).await.is_err() {
                let mut reader = bytes.as_slice();
                buckets.modules.put(digest.as_str(), &mut reader).await.map_err(|e| failed("cannot put a module in the object store", e))?;
            }
            agent.insert("module".to_owned(), toml::Value::String(format!("sha256:{digest}")));
        }
    }
    let text = toml::to_string(&desired).map_err(|e| failed("cannot write the desired state", e))?;
    let current = buckets.desired.get(KEY).await.map_err(|e| failed("cannot read the cluster's desired state", e))?;
    if current.as_deref() != Some(text.as_bytes()) {
        buckets.desired.put(KEY, text.clone().into()).await.map_err(|e| failed("cannot keep the desired state", e))?;
        tracing::info!("the cluster's tenants and agents are now this manifest's");
    }
    Ok(text)
}

/// Says in the log when another node puts a new desired state, until `buckets` go.
pub(super) async fn notice_changes(buckets: std::sync::Arc<Buckets>, running: String) {
    let Ok(mut changes) = buckets.desired.watch(KEY).await else { return };
    while let Some(Ok(entry)) = changes.next().await {
        if entry.value.as_ref() != running.as_bytes() {
            tracing::warn!("the cluster's tenants and agents changed (revision {}); this node runs the ones it started with until it is restarted", entry.revision);
        }
    }
}
