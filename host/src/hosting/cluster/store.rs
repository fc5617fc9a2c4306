//! An agent's `server.save` value in JetStream KV. Every write is a compare-and-set on the
//! revision this node last wrote or read, and opening the store writes the value back once:
//! from then on a node that still runs the agent after losing it (a partition, a pause)
//! has its saves refused instead of overwriting the new owner's.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;

use crate::capabilities::store::Backend;

/// How long a save or load waits for JetStream before it fails with an I/O error.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One agent's value in the stores bucket.
pub(super) struct KvStore {
    kv: kv::Store,
    id: String,
    /// The key's revision this node wrote last; 0 when it has none.
    revision: Mutex<u64>,
    io: tokio::runtime::Handle,
}

impl KvStore {
    /// Takes agent `id`'s value over for this node: rewrites it (or nothing, when there
    /// is none) so that the revision it holds is its own.
    pub async fn open(kv: kv::Store, id: &str, io: tokio::runtime::Handle) -> std::io::Result<KvStore> {
        let revision = loop {
            let entry = timed(kv.entry(id)).await?.map_err(other)?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else { break 0 };
            match timed(kv.update(id, entry.value, entry.revision)).await? {
                Ok(revision) => break revision,
                // The old owner wrote in between: read again.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(other(e)),
            }
        };
        Ok(KvStore { kv, id: id.to_owned(), revision: Mutex::new(revision), io })
    }

    /// Runs `f` on the host's I/O runtime and waits for it on this thread, which the
    /// store capability has already handed over to blocking work.
    fn wait<T: Send + 'static>(&self, f: impl Future<Output = std::io::Result<T>> + Send + 'static) -> std::io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| std::io::Error::other("the host is shutting down"))?
    }
}

impl Backend for KvStore {
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        let (kv, id) = (self.kv.clone(), self.id.clone());
        self.wait(async move {
            let entry = timed(kv.entry(id)).await?.map_err(other)?;
            Ok(entry.filter(|e| e.operation == kv::Operation::Put).map(|e| e.value.to_vec()))
        })
    }

    fn save(&self, data: &[u8]) -> std::io::Result<()> {
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let (kv, id, value, last) = (self.kv.clone(), self.id.clone(), bytes::Bytes::copy_from_slice(data), *revision);
        // Acknowledged by JetStream (stored on its replicas) before this returns.
        *revision = self.wait(async move {
            if last == 0 { timed(kv.create(&id, value)).await?.map_err(other) } else { timed(kv.update(&id, value, last)).await?.map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    std::io::Error::other("another node has taken this agent over; the value was not saved")
                } else {
                    other(e)
                }
            }) }
        })?;
        Ok(())
    }

    fn location(&self) -> String {
        format!("JetStream KV tether_stores/{}", self.id)
    }
}

async fn timed<T>(f: impl Future<Output = T>) -> std::io::Result<T> {
    tokio::time::timeout(TIMEOUT, f).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "JetStream did not answer within 5 s"))
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
