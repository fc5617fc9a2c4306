//! The `store` capability (imp's `server.save`/`server.load`): one value per agent, capped,
//! kept by a [`Backend`] so that where it lives can change without touching the rest.

mod backend;
mod file;

use std::sync::{Arc, Mutex};

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::store::{self as wit, StoreError};
use crate::kit::blocking::Blocking;
use crate::kit::log::{Level, Logger, Quiet};
use crate::policy::rate::{Rate, TokenBucket};

pub(crate) use backend::Backend;
pub(crate) use file::FileStore;

/// One agent's store and what it may do with it; shared by its instances, so a restart
/// does not refill its write credits.
pub(crate) struct Policy {
    backend: Box<dyn Backend>,
    /// Largest value, bytes (imp: 64 KiB).
    cap: usize,
    /// Each save is a file written and flushed to disk: a rate keeps one agent from
    /// taking the disk from the others.
    writes: Mutex<TokenBucket>,
    full: Quiet,
}

impl Policy {
    pub fn new(backend: Box<dyn Backend>, cap: usize, writes: Rate) -> Policy {
        Policy { backend, cap, writes: Mutex::new(TokenBucket::new(writes)), full: Quiet::default() }
    }
}

/// The capability's state in an instance.
pub(crate) struct Store {
    policy: Arc<Policy>,
    log: Logger,
    blocking: Blocking,
}

impl Store {
    pub fn new(policy: Arc<Policy>, log: Logger, blocking: Blocking) -> Store {
        Store { policy, log, blocking }
    }
}

impl wit::Host for Store {
    fn save(&mut self, data: Vec<u8>) -> Result<(), StoreError> {
        let policy = &*self.policy;
        if data.len() > policy.cap {
            return Err(StoreError::TooLarge);
        }
        if !policy.writes.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.log.limit_refused(&policy.full, || "store: save refused: over limits.store_rate".into());
            return Err(StoreError::RateLimited);
        }
        self.blocking.run(|| policy.backend.save(&data)).map_err(|e| {
            self.log.write(Level::Error, &format!("store: cannot write {}: {e}", policy.backend.location()));
            StoreError::Io
        })
    }

    fn load(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        let backend = &self.policy.backend;
        self.blocking.run(|| backend.load()).map_err(|e| {
            self.log.write(Level::Error, &format!("store: cannot read {}: {e}", backend.location()));
            StoreError::Io
        })
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Store) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Store>>(linker, get)
}
