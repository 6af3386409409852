//! Writing the activity log on the queue's own ring. A mirrored write to a cold extent must
//! not reach either leg before the extent's log bit is on disk (`mirror/dirty.rs`); that write
//! is a ranged fdatasync of the log's pages, issued here as an io_uring FSYNC so the queue
//! thread goes on serving its other tags meanwhile (the kernel runs it on a worker).
//!
//! Group commit: one write of the log per queue at a time. Tags whose extents turned cold
//! while it was in flight wait for it to end and then share the next one; a tag whose bits a
//! write (of any queue) already covered goes at once.

use std::cell::Cell;

use io_uring::{opcode, types};

use crate::datapath::local_leg::submit;
use crate::datapath::stats::QueueCounters;
use crate::datapath::waiters::{wait_until, Waiters};
use crate::mirror::dirty::DirtyMap;

#[derive(Default)]
pub struct LogSync {
    /// A write of the log is in flight on this ring.
    writing: Cell<bool>,
    /// Writes of the log this ring completed; waiters wait for it to move.
    rounds: Cell<u64>,
    waiters: Waiters,
}

impl LogSync {
    /// Returns once the log is on disk up to change `seq` (from `DirtyMap::al_log`).
    pub async fn durable(&self, dirty: &DirtyMap, seq: u64, counters: &QueueCounters) {
        counters.count_log_wait();
        while !dirty.al_is_durable(seq) {
            if self.writing.replace(true) {
                // Wait for the write in flight to end, then look again.
                let round = self.rounds.get();
                wait_until(&self.waiters, || self.rounds.get() != round).await;
                continue;
            }
            let upto = dirty.al_sync_point();
            if let Some((fd, offset, len)) = dirty.al_sync_range() {
                counters.count_log_write();
                let sqe = opcode::Fsync::new(types::Fd(fd))
                    .offset(offset)
                    .len(len)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                if let Err(errno) = submit(sqe).await {
                    // The write goes on: a host crash could lose these extents, a daemon
                    // crash not (the mapping is shared).
                    log::error!("activity log: writing it to disk failed: errno {errno}");
                }
            }
            dirty.al_synced(upto);
            self.writing.set(false);
            self.rounds.set(self.rounds.get() + 1);
            self.waiters.wake_all();
        }
    }
}
