//! The daemon's one poison-tolerant mutex helper.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, taking over a poisoned one: a panicked holder must not stop the daemon
/// from answering (every guarded value here stays consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
