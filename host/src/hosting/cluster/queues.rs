//! An agent's durable queues (the `queue` interface, the Azure client's outbox) in one
//! JetStream stream shared by every agent: entry = message on `tq.<agent>.<queue, hex>`,
//! id = the message's stream sequence (increasing, never reused). An append returns once
//! JetStream has stored the message (on its replicas), so entries survive the node; the
//! agent's next owner finds them.
//!
//! The node keeps an index of the agent's entries (id → queue and size), read from the
//! stream on first use, for the quota and for `entries`, which then fetches the payloads
//! it returns by sequence. The same rules as every backend apply (`queue::backend`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::bindings::queue::{Entry, QueueStats};
use crate::capabilities::queue::{Backend, QueueError, check_append, check_name, room_for};

/// The stream every agent's queues are in.
pub(super) const STREAM: &str = "tether_queues";

/// How long one JetStream call may take before the queue call fails with `io`.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the node knows of one agent's entries.
#[derive(Default)]
struct Index {
    /// Id → queue name and payload bytes.
    entries: BTreeMap<u64, (String, u64)>,
    bytes: u64,
}

/// One agent's queues in the stream.
pub(super) struct StreamQueues {
    stream: stream::Stream,
    js: jetstream::Context,
    agent: String,
    quota: u64,
    /// `None` until first use.
    index: Mutex<Option<Index>>,
    io: tokio::runtime::Handle,
}

/// Makes the stream the queues are in (a no-op when it exists with these settings).
pub(super) async fn stream(js: &jetstream::Context, replicas: usize) -> Result<stream::Stream, String> {
    let config = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["tq.>".to_owned()],
        storage: stream::StorageType::File,
        allow_direct: true,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    js.create_stream(config.clone()).await.map_err(|e| e.to_string())?;
    js.get_stream(STREAM).await.map_err(|e| e.to_string())
}

fn subject(agent: &str, queue: &str) -> String {
    format!("tq.{agent}.{}", hex::encode(queue))
}

fn io(e: impl std::fmt::Display) -> QueueError {
    QueueError::Io(e.to_string().into())
}

async fn timed<T>(f: impl Future<Output = T>) -> Result<T, QueueError> {
    tokio::time::timeout(TIMEOUT, f).await.map_err(|_| io("JetStream did not answer within 5 s"))
}

impl StreamQueues {
    /// Agent `agent`'s queues in `stream`, under `quota` bytes; JetStream is reached on `io`.
    pub fn new(stream: stream::Stream, js: jetstream::Context, agent: &str, quota: u64, io: tokio::runtime::Handle) -> StreamQueues {
        StreamQueues { stream, js, agent: agent.to_owned(), quota, index: Mutex::new(None), io }
    }

    /// Runs `f` on the host's I/O runtime and waits for it on this thread, which the
    /// queue capability has already handed over to blocking work.
    fn wait<T: Send + 'static>(&self, f: impl Future<Output = Result<T, QueueError>> + Send + 'static) -> Result<T, QueueError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| io("the host is shutting down"))?
    }

    /// Runs `op` on the index, reading it from the stream first if needed.
    fn with_index<R>(&self, op: impl FnOnce(&mut Index) -> Result<R, QueueError>) -> Result<R, QueueError> {
        let mut slot = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let (stream, prefix) = (self.stream.clone(), format!("tq.{}.", self.agent));
            *slot = Some(self.wait(read_index(stream, prefix))?);
        }
        match slot.as_mut() {
            Some(index) => op(index),
            None => Err(io("the queue index is missing")),
        }
    }
}

/// Every entry of the agent whose subjects start with `prefix`, by walking the stream's
/// messages on `<prefix>>`.
async fn read_index(stream: stream::Stream, prefix: String) -> Result<Index, QueueError> {
    let mut index = Index::default();
    let mut next = 1;
    loop {
        match timed(stream.direct_get_next_for_subject(format!("{prefix}>"), Some(next))).await? {
            Ok(message) => {
                let name = message.subject.strip_prefix(prefix.as_str()).and_then(|h| hex::decode(h).ok()).and_then(|b| String::from_utf8(b).ok());
                if let Some(name) = name {
                    index.bytes += message.payload.len() as u64;
                    index.entries.insert(message.sequence, (name, message.payload.len() as u64));
                }
                next = message.sequence + 1;
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => return Ok(index),
            Err(e) => return Err(io(e)),
        }
    }
}

impl Backend for StreamQueues {
    fn append(&self, name: &str, payload: &[u8]) -> Result<u64, QueueError> {
        let len = check_append(name, payload, self.quota)?;
        self.with_index(|index| {
            room_for(index.entries.len() as u64, index.bytes, len, self.quota)?;
            let (js, subject, payload) = (self.js.clone(), subject(&self.agent, name), bytes::Bytes::copy_from_slice(payload));
            let id = self.wait(async move {
                let ack = timed(js.publish(subject, payload)).await?.map_err(io)?;
                Ok(timed(ack.into_future()).await?.map_err(io)?.sequence)
            })?;
            index.entries.insert(id, (name.to_owned(), len));
            index.bytes += len;
            Ok(id)
        })
    }

    fn remove(&self, name: &str, id: u64) -> Result<bool, QueueError> {
        check_name(name)?;
        self.with_index(|index| {
            if index.entries.get(&id).is_none_or(|(queue, _)| queue != name) {
                return Ok(false);
            }
            let stream = self.stream.clone();
            self.wait(async move { timed(stream.delete_message(id)).await?.map_err(io) })?;
            if let Some((_, len)) = index.entries.remove(&id) {
                index.bytes -= len;
            }
            Ok(true)
        })
    }

    fn entries(&self, name: &str, after: u64, max: u32) -> Result<Vec<Entry>, QueueError> {
        check_name(name)?;
        let ids: Vec<u64> = self.with_index(|index| {
            Ok(index.entries.range(after.saturating_add(1)..).filter(|(_, (queue, _))| queue == name).map(|(id, _)| *id).take(max as usize).collect())
        })?;
        let stream = self.stream.clone();
        self.wait(async move {
            let mut entries = Vec::with_capacity(ids.len());
            for id in ids {
                let message = timed(stream.direct_get(id)).await?.map_err(io)?;
                entries.push(Entry { id, payload: message.payload.to_vec() });
            }
            Ok(entries)
        })
    }

    fn stats(&self) -> Result<QueueStats, QueueError> {
        self.with_index(|index| Ok(QueueStats { entries: index.entries.len() as u64, bytes: index.bytes, quota: self.quota }))
    }

    // Removals are written as they happen.
    fn settle(&self) -> Result<(), QueueError> {
        Ok(())
    }

    fn unsettled(&self) -> bool {
        false
    }

    fn location(&self) -> String {
        format!("JetStream stream {STREAM}, tq.{}.*", self.agent)
    }
}
