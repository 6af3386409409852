//! Request counters. Each queue thread owns one cache-line-aligned block and is its only
//! writer, so counting costs no shared-cache-line traffic; readers sum the blocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::datapath::request::Request;

/// Counters of one queue; written by its thread only.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    discard_bytes: AtomicU64,
    write_zeroes: AtomicU64,
    write_zeroes_bytes: AtomicU64,
    errors: AtomicU64,
    /// Requests handed to a leg; minus `completed`, the requests being served.
    started: AtomicU64,
    completed: AtomicU64,
    /// Requests waiting at a closed gate (a gauge).
    parked: AtomicU64,
    /// Write-like requests being served local-only (a gauge): a mirror starting waits for
    /// these to finish (they mark themselves out of sync).
    local_only: AtomicU64,
    /// Mirrored writes that waited for the activity log to reach the disk, and the writes of
    /// the log this queue issued for them (fewer: tags waiting together share one).
    log_waits: AtomicU64,
    log_writes: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    // Single writer: a load and a store are enough, and cheaper than a locked add.
    c.store(c.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

impl QueueCounters {
    /// Counts a completed request; `ok` is false when the guest got an error.
    pub fn record(&self, req: &Request, ok: bool) {
        if !ok {
            bump(&self.errors, 1);
            return;
        }
        match *req {
            Request::Read { len, .. } => {
                bump(&self.reads, 1);
                bump(&self.read_bytes, u64::from(len));
            }
            Request::Write { len, fua, .. } => {
                bump(&self.writes, 1);
                bump(&self.write_bytes, u64::from(len));
                if fua {
                    bump(&self.fua_writes, 1);
                }
            }
            Request::Flush => bump(&self.flushes, 1),
            Request::Discard { len, .. } => {
                bump(&self.discards, 1);
                bump(&self.discard_bytes, u64::from(len));
            }
            Request::WriteZeroes { len, .. } => {
                bump(&self.write_zeroes, 1);
                bump(&self.write_zeroes_bytes, u64::from(len));
            }
        }
    }

    pub fn record_error(&self) {
        bump(&self.errors, 1);
    }

    pub fn count_log_wait(&self) {
        bump(&self.log_waits, 1);
    }

    pub fn count_log_write(&self) {
        bump(&self.log_writes, 1);
    }

    /// Counts a request as started unless `blocked` (looked at after the count) says it must
    /// wait; then the count is taken back and None returned. The order (count, then look) is
    /// the pause handshake (see `device/lifecycle.rs`): the count is a SeqCst store ordered
    /// before the caller's look at the gate. The request is completed when the returned
    /// guard drops, so a start can never be left unpaired.
    pub fn try_start(&self, blocked: impl FnOnce() -> bool) -> Option<InFlight<'_>> {
        let v = self.started.load(Ordering::Relaxed);
        self.started.store(v + 1, Ordering::SeqCst);
        if blocked() {
            let v = self.started.load(Ordering::Relaxed);
            self.started.store(v - 1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight { counters: self })
    }

    /// Requests of this queue being served now (this one included, for a caller that has
    /// started one). Exact on the queue's own thread, the only writer; from another thread,
    /// completed is read before started, so a request between the two loads is counted as
    /// in flight, never missed.
    pub fn in_flight(&self) -> u64 {
        let completed = self.completed.load(Ordering::SeqCst);
        let started = self.started.load(Ordering::SeqCst);
        started.saturating_sub(completed)
    }

    fn complete(&self) {
        let v = self.completed.load(Ordering::Relaxed);
        self.completed.store(v + 1, Ordering::SeqCst);
    }

    /// SeqCst, and before the caller looks at the mirror slot (see `Mirroring::start`).
    pub fn local_only_begin(&self) {
        let v = self.local_only.load(Ordering::Relaxed);
        self.local_only.store(v + 1, Ordering::SeqCst);
    }

    pub fn local_only_end(&self) {
        let v = self.local_only.load(Ordering::Relaxed);
        self.local_only.store(v.saturating_sub(1), Ordering::SeqCst);
    }

    pub fn set_parked(&self, delta: i64) {
        let v = self.parked.load(Ordering::Relaxed);
        self.parked
            .store(v.saturating_add_signed(delta), Ordering::Relaxed);
    }
}

/// A request counted as started (and so waited for by a pause) until this guard drops, which
/// counts it completed: every path out of a request, early returns and unwinding included,
/// completes it exactly once (as Cloud Hypervisor's block device counts active requests).
#[must_use = "dropping the guard completes the request at once"]
pub struct InFlight<'a> {
    counters: &'a QueueCounters,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counters.complete();
    }
}

/// A point-in-time sum over all queues.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub fua_writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub discard_bytes: u64,
    pub write_zeroes: u64,
    pub write_zeroes_bytes: u64,
    pub errors: u64,
    /// Requests issued to a leg and not yet completed (tapdisk's name).
    pub outstanding: u64,
    /// Requests held by a pause.
    pub parked: u64,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reads={} read_bytes={} writes={} write_bytes={} fua_writes={} flushes={} \
             discards={} discard_bytes={} write_zeroes={} write_zeroes_bytes={} errors={} \
             outstanding={} parked={}",
            self.reads,
            self.read_bytes,
            self.writes,
            self.write_bytes,
            self.fua_writes,
            self.flushes,
            self.discards,
            self.discard_bytes,
            self.write_zeroes,
            self.write_zeroes_bytes,
            self.errors,
            self.outstanding,
            self.parked
        )
    }
}

/// All queues' counters.
#[derive(Debug, Clone)]
pub struct Stats {
    queues: Arc<[QueueCounters]>,
}

impl Stats {
    pub fn new(nr_queues: usize) -> Stats {
        Stats {
            queues: (0..nr_queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    pub fn queue(&self, qid: usize) -> &QueueCounters {
        &self.queues[qid % self.queues.len()]
    }

    /// Over all queues: mirrored writes that waited for the activity log, and the queues'
    /// writes of it.
    pub fn log_waits_and_writes(&self) -> (u64, u64) {
        self.queues.iter().fold((0, 0), |(w, n), q| {
            (
                w + q.log_waits.load(Ordering::Relaxed),
                n + q.log_writes.load(Ordering::Relaxed),
            )
        })
    }

    /// Write-like requests being served local-only, over all queues.
    pub fn local_only(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.local_only.load(Ordering::SeqCst))
            .sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for q in self.queues.iter() {
            let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
            s.reads += get(&q.reads);
            s.read_bytes += get(&q.read_bytes);
            s.writes += get(&q.writes);
            s.write_bytes += get(&q.write_bytes);
            s.fua_writes += get(&q.fua_writes);
            s.flushes += get(&q.flushes);
            s.discards += get(&q.discards);
            s.discard_bytes += get(&q.discard_bytes);
            s.write_zeroes += get(&q.write_zeroes);
            s.write_zeroes_bytes += get(&q.write_zeroes_bytes);
            s.errors += get(&q.errors);
            s.outstanding += q.in_flight();
            s.parked += get(&q.parked);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_queues_and_counts_fua_separately() {
        let stats = Stats::new(2);
        stats.queue(0).record(
            &Request::Write {
                offset: 0,
                len: 4096,
                fua: true,
            },
            true,
        );
        stats.queue(1).record(&Request::Flush, true);
        stats.queue(1).record(
            &Request::Read {
                offset: 0,
                len: 512,
            },
            false,
        );
        let s = stats.snapshot();
        assert_eq!((s.writes, s.write_bytes, s.fua_writes), (1, 4096, 1));
        assert_eq!((s.flushes, s.reads, s.errors), (1, 0, 1));
    }

    #[test]
    fn a_started_request_is_outstanding_until_its_guard_drops_and_a_blocked_one_never_is() {
        let stats = Stats::new(1);
        let q = stats.queue(0);
        assert!(
            q.try_start(|| true).is_none(),
            "blocked: the count is taken back"
        );
        assert_eq!(stats.snapshot().outstanding, 0);
        let a = q.try_start(|| false);
        let b = q.try_start(|| false);
        assert_eq!(stats.snapshot().outstanding, 2);
        drop(a);
        assert_eq!(stats.snapshot().outstanding, 1);
        let early_return = |g: Option<InFlight<'_>>| -> Option<()> {
            let _g = g?;
            None // an early exit still completes
        };
        early_return(b);
        assert_eq!(stats.snapshot().outstanding, 0);
    }
}
