//! The fds the orchestrator passed (`pass-fd`), by name, until a mirror takes one or
//! `close-fd` closes it.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use crate::lock::lock;

/// An fd passed by the orchestrator.
#[derive(Debug)]
pub struct StoredFd {
    pub fd: OwnedFd,
    pub nbd: Option<control::protocol::NegotiatedNbd>,
}

/// The stored fds, by name.
#[derive(Debug, Default)]
pub struct FdStore {
    fds: Mutex<BTreeMap<String, StoredFd>>,
}

impl FdStore {
    /// The table, for a command that reads or changes several entries at once.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, StoredFd>> {
        lock(&self.fds)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Takes the fd `name` out of the store (a mirror uses it, or it is closed).
    pub fn take(&self, name: &str) -> Option<StoredFd> {
        self.lock().remove(name)
    }
}
