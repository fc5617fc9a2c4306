//! The `store` capability (imp's `server.save`/`server.load`): one value per agent, capped,
//! kept by a [`Backend`] so that where it lives can change without touching the rest.

mod backend;
mod file;

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::store::{self as wit, StoreError};
use crate::kit::blocking::Blocking;
use crate::kit::log::{Level, Logger};

pub(crate) use backend::Backend;
pub(crate) use file::FileStore;


/// The capability's state in an instance.
pub(crate) struct Store {
    backend: Arc<dyn Backend>,
    /// Largest value, bytes (imp: 64 KiB).
    cap: usize,
    log: Logger,
    blocking: Blocking,
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>, cap: usize, log: Logger, blocking: Blocking) -> Store {
        Store { backend, cap, log, blocking }
    }
}

impl wit::Host for Store {
    fn save(&mut self, data: Vec<u8>) -> Result<(), StoreError> {
        if data.len() > self.cap {
            return Err(StoreError::TooLarge);
        }
        self.blocking.run(|| self.backend.save(&data)).map_err(|e| {
            self.log.write(Level::Error, &format!("store: cannot write {}: {e}", self.backend.location()));
            StoreError::Io
        })
    }

    fn load(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking.run(|| self.backend.load()).map_err(|e| {
            self.log.write(Level::Error, &format!("store: cannot read {}: {e}", self.backend.location()));
            StoreError::Io
        })
    }
}

/// Links the interface, reaching the capability's state through `get`.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut Store) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSelf<Store>>(linker, get)
}
