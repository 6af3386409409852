//! Orders overlapping write-like requests across all queues, in arrival order, while a mirror
//! is attached: two overlapping writes must reach both legs in the same order, or the legs
//! diverge silently. Disjoint requests never wait for each other.
//!
//! Cross-queue design: one table behind a mutex, held for a few instructions per acquire and
//! release (never across I/O), and only for write-like requests while a mirror is attached;
//! reads and unmirrored devices never touch it. A waiter is woken through its queue's doorbell.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock::lock;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    qid: u16,
    granted: Arc<AtomicBool>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// In arrival order.
    entries: Vec<Entry>,
}

#[derive(Default)]
pub struct RangeLock {
    table: Mutex<Table>,
}

/// A place in line; granted once no earlier overlapping entry remains.
pub struct Ticket {
    id: u64,
    pub granted: Arc<AtomicBool>,
}

impl RangeLock {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Joins the line for [offset, offset+len) on behalf of queue `qid`.
    pub fn enqueue(&self, offset: u64, len: u64, qid: u16) -> Ticket {
        let mut t = self.table();
        let id = t.next_id;
        t.next_id += 1;
        let end = offset + len.max(1);
        let blocked = t.entries.iter().any(|e| e.start < end && offset < e.end);
        let granted = Arc::new(AtomicBool::new(!blocked));
        t.entries.push(Entry {
            id,
            start: offset,
            end,
            qid,
            granted: granted.clone(),
        });
        Ticket { id, granted }
    }

    /// Leaves the line; returns the queues whose waiters became runnable (to ring them).
    pub fn release(&self, ticket: &Ticket) -> Vec<u16> {
        let mut t = self.table();
        t.entries.retain(|e| e.id != ticket.id);
        let mut woken = Vec::new();
        for i in 0..t.entries.len() {
            let e = &t.entries[i];
            if e.granted.load(Ordering::Acquire) {
                continue;
            }
            let blocked = t.entries[..i]
                .iter()
                .any(|p| p.start < e.end && e.start < p.end);
            if !blocked {
                e.granted.store(true, Ordering::Release);
                if !woken.contains(&e.qid) {
                    woken.push(e.qid);
                }
            }
        }
        woken
    }

    pub fn len(&self) -> usize {
        self.table().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_requests_go_in_arrival_order_disjoint_ones_do_not_wait() {
        let l = RangeLock::default();
        let a = l.enqueue(0, 4096, 0);
        let b = l.enqueue(8192, 4096, 1); // disjoint
        let c = l.enqueue(2048, 4096, 1); // overlaps a
        let d = l.enqueue(4096, 100, 0); // overlaps c (which is waiting): must wait too
        assert!(a.granted.load(Ordering::SeqCst) && b.granted.load(Ordering::SeqCst));
        assert!(!c.granted.load(Ordering::SeqCst) && !d.granted.load(Ordering::SeqCst));
        assert_eq!(l.release(&a), vec![1]);
        assert!(c.granted.load(Ordering::SeqCst));
        assert!(
            !d.granted.load(Ordering::SeqCst),
            "d arrived after c and overlaps it"
        );
        assert_eq!(l.release(&c), vec![0]);
        assert!(d.granted.load(Ordering::SeqCst));
        l.release(&b);
        l.release(&d);
        assert_eq!(l.len(), 0);
    }
}
