//! Orders overlapping write-like requests across all queues, in arrival order, while a mirror
//! is attached: two overlapping writes must reach both legs in the same order, or the legs
//! diverge silently. Disjoint requests never wait for each other.
//!
//! Design, for a cheap common case (nothing overlaps):
//! - The disk is cut into 1 MiB regions, spread over 64 shards (region % 64); each shard is a
//!   short list of the requests touching its regions, in arrival order, behind its own mutex.
//!   Two queues writing different megabytes therefore take different mutexes, and a mutex is
//!   held for a few instructions per acquire and release, never across I/O.
//! - A request that spans several shards locks all of them in ascending order and joins each
//!   line before letting go of any (two-phase), so every shard sees overlapping requests in the
//!   same order and two requests can never wait for each other.
//! - A request that overlaps nothing is granted at once and allocates nothing (the lists keep
//!   their capacity). Only a request that must wait gets a counter (one allocation): the number
//!   of shards it still waits in; the release that brings it to 0 reports its queue.
//! - Callers wake whom a release reports: a waiter on the releasing queue directly, another
//!   queue through its doorbell. Reads and unmirrored devices never come here.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::lock::lock;

const SHARDS: usize = 64;
/// log2 of the region size a shard is chosen by.
const REGION_SHIFT: u32 = 20;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    /// Who waits (a queue or copy worker's doorbell number).
    qid: u16,
    /// Still behind an earlier overlapping entry of this shard.
    waiting: bool,
    /// Counted once in `len`: this is the entry in the ticket's lowest shard.
    first: bool,
    /// The ticket's count of shards it waits in (only while `waiting`).
    wait: Option<Arc<AtomicU32>>,
}

impl Entry {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

pub struct RangeLock {
    shards: [Mutex<Vec<Entry>>; SHARDS],
    /// Names tickets (for release); one relaxed increment, never a lock.
    next_id: AtomicU64,
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock {
            shards: std::array::from_fn(|_| Mutex::new(Vec::new())),
            next_id: AtomicU64::new(0),
        }
    }
}

/// A place in line; granted once no earlier overlapping request remains.
pub struct Ticket {
    id: u64,
    /// Bit s: the request touches shard s.
    shards: u64,
    /// None: granted at enqueue.
    wait: Option<Arc<AtomicU32>>,
}

impl Ticket {
    pub fn granted(&self) -> bool {
        self.wait
            .as_ref()
            .is_none_or(|w| w.load(Ordering::Acquire) == 0)
    }
}

/// The set bits of a u64, lowest first: the shards a request touches (the order enqueue locks
/// them in), or the doorbell numbers (queues, copy workers: all below 64, see `IoPath::new`)
/// whose waiters a release made runnable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bits(u64);

impl Iterator for Bits {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        if self.0 == 0 {
            return None;
        }
        let q = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(q as u16)
    }
}

/// The most doorbells a release can report.
pub const MAX_WAITERS: u16 = 64;

/// Bit s set for every shard s that [start, end) touches.
fn shards_of(start: u64, end: u64) -> u64 {
    let first = start >> REGION_SHIFT;
    let last = (end - 1) >> REGION_SHIFT;
    if last - first >= SHARDS as u64 - 1 {
        return u64::MAX;
    }
    (first..=last).fold(0, |m, r| m | 1 << (r % SHARDS as u64))
}

impl RangeLock {
    /// Joins the line for [offset, offset+len) on behalf of doorbell `qid` (< 64).
    pub fn enqueue(&self, offset: u64, len: u64, qid: u16) -> Ticket {
        debug_assert!(qid < MAX_WAITERS);
        let end = offset.saturating_add(len.max(1));
        let mask = shards_of(offset, end);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut held: [Option<MutexGuard<'_, Vec<Entry>>>; SHARDS] = std::array::from_fn(|_| None);
        let mut blocked = 0u64;
        for s in Bits(mask) {
            let list = lock(&self.shards[usize::from(s)]);
            if list.iter().any(|e| e.overlaps(offset, end)) {
                blocked |= 1 << s;
            }
            held[usize::from(s)] = Some(list);
        }
        let wait = (blocked != 0).then(|| Arc::new(AtomicU32::new(blocked.count_ones())));
        let lowest = mask.trailing_zeros();
        for s in Bits(mask) {
            let waiting = blocked & (1 << s) != 0;
            if let Some(list) = held[usize::from(s)].as_mut() {
                list.push(Entry {
                    id,
                    start: offset,
                    end,
                    qid,
                    waiting,
                    first: u32::from(s) == lowest,
                    wait: if waiting { wait.clone() } else { None },
                });
            }
        }
        Ticket {
            id,
            shards: mask,
            wait,
        }
    }

    /// Leaves the line; returns the doorbells whose waiters became runnable (to wake them).
    pub fn release(&self, ticket: &Ticket) -> Bits {
        let mut woken = 0u64;
        for s in Bits(ticket.shards) {
            let mut list = lock(&self.shards[usize::from(s)]);
            let Some(pos) = list.iter().position(|e| e.id == ticket.id) else {
                continue;
            };
            list.remove(pos);
            // Only later entries can have waited for it.
            for i in pos..list.len() {
                let (earlier, rest) = list.split_at_mut(i);
                let e = &mut rest[0];
                if !e.waiting || earlier.iter().any(|p| p.overlaps(e.start, e.end)) {
                    continue;
                }
                e.waiting = false;
                if let Some(w) = e.wait.take() {
                    if w.fetch_sub(1, Ordering::AcqRel) == 1 {
                        woken |= 1 << e.qid;
                    }
                }
            }
        }
        Bits(woken)
    }

    /// Requests holding or waiting for a range.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).iter().filter(|e| e.first).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn overlapping_requests_go_in_arrival_order_disjoint_ones_do_not_wait() {
        let l = RangeLock::default();
        let a = l.enqueue(0, 4096, 0);
        let b = l.enqueue(8192, 4096, 1); // disjoint
        let c = l.enqueue(2048, 4096, 1); // overlaps a
        let d = l.enqueue(4096, 100, 0); // overlaps c (which is waiting): must wait too
        assert!(a.granted() && b.granted());
        assert!(!c.granted() && !d.granted());
        assert_eq!(l.release(&a).collect::<Vec<_>>(), vec![1]);
        assert!(c.granted());
        assert!(!d.granted(), "d arrived after c and overlaps it");
        assert_eq!(l.release(&c).collect::<Vec<_>>(), vec![0]);
        assert!(d.granted());
        l.release(&b);
        l.release(&d);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_request_spanning_shards_waits_in_each_and_never_deadlocks() {
        let l = RangeLock::default();
        // Both span the boundary of shards 0 and 1; b arrives second and must wait for a in
        // both shards (never a in one and b in the other).
        let a = l.enqueue(MIB - 4096, 8192, 0);
        let b = l.enqueue(MIB - 2048, 4096, 1);
        let c = l.enqueue(MIB + 4096, 4096, 0); // shard 1 only, disjoint from both
        assert!(a.granted() && !b.granted() && c.granted());
        assert_eq!(l.len(), 3);
        assert_eq!(l.release(&a).collect::<Vec<_>>(), vec![1]);
        assert!(b.granted());
        assert_eq!(l.release(&c), Bits(0));
        assert_eq!(l.release(&b), Bits(0));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_whole_disk_discard_orders_against_everything() {
        let l = RangeLock::default();
        let w = l.enqueue(70 * MIB, 4096, 2);
        let discard = l.enqueue(0, 1 << 40, 3);
        let after = l.enqueue(5 * MIB, 4096, 4);
        assert!(w.granted() && !discard.granted() && !after.granted());
        assert_eq!(l.release(&w).collect::<Vec<_>>(), vec![3]);
        assert!(discard.granted() && !after.granted());
        assert_eq!(l.release(&discard).collect::<Vec<_>>(), vec![4]);
        assert!(after.granted());
        l.release(&after);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_disjoint_request_is_granted_without_a_counter() {
        let l = RangeLock::default();
        let a = l.enqueue(0, 4096, 0);
        assert!(a.wait.is_none(), "nothing overlapped: no allocation");
        l.release(&a);
    }

    /// Threads on random, often overlapping, ranges (some across shard boundaries): no two
    /// overlapping holders ever at once, and everyone gets through.
    #[test]
    fn overlapping_holders_exclude_each_other_under_contention() {
        use std::sync::atomic::AtomicU8;
        const UNITS: u64 = 64; // 64 KiB units over 4 MiB: 4 shards
        let l = Arc::new(RangeLock::default());
        let owner: Arc<Vec<AtomicU8>> = Arc::new((0..UNITS).map(|_| AtomicU8::new(0)).collect());
        let threads: Vec<_> = (0..4u16)
            .map(|q| {
                let (l, owner) = (l.clone(), owner.clone());
                std::thread::spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(q);
                    for _ in 0..2000 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let first = seed % UNITS;
                        let n = 1 + (seed >> 32) % 20;
                        let last = (first + n).min(UNITS);
                        let t = l.enqueue(first << 16, (last - first) << 16, q);
                        while !t.granted() {
                            std::thread::yield_now();
                        }
                        for u in first..last {
                            let was = owner[u as usize].swap(q as u8 + 1, Ordering::SeqCst);
                            assert_eq!(was, 0, "unit {u} held twice");
                        }
                        for u in first..last {
                            owner[u as usize].store(0, Ordering::SeqCst);
                        }
                        l.release(&t);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a worker panicked");
        }
        assert_eq!(l.len(), 0);
    }
}
