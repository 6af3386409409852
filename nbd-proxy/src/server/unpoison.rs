//! The server's one lock helper: poison-tolerant locking for every `Mutex`, `RwLock` and
//! `Condvar` wait.
//!
//! A connection thread that panics while holding a lock must not take the whole server down:
//! every value guarded here (the export table, the live connections, a connection's byte
//! budget and writer) is left consistent between statements, so the lock is taken over.

use std::sync::LockResult;

/// A lock (or condvar wait) result, poisoned or not: `m.lock().unpoisoned()`,
/// `cv.wait(g).unpoisoned()`.
pub(crate) trait Unpoisoned<G> {
    fn unpoisoned(self) -> G;
}

impl<G> Unpoisoned<G> for LockResult<G> {
    fn unpoisoned(self) -> G {
        self.unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex, RwLock};

    #[test]
    fn a_poisoned_lock_is_taken_over() {
        let m = Arc::new(Mutex::new(1));
        let rw = Arc::new(RwLock::new(2));
        let (m2, rw2) = (m.clone(), rw.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unpoisoned();
            let _w = rw2.write().unpoisoned();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && rw.is_poisoned());
        assert_eq!(*m.lock().unpoisoned(), 1);
        assert_eq!(*rw.read().unpoisoned(), 2);
        *rw.write().unpoisoned() += 1;
        assert_eq!(*rw.read().unpoisoned(), 3);
    }
}
