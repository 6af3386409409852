//! What one tag's task borrows from its queue.

use crate::datapath::io_path::IoPath;
use crate::datapath::local_leg::LocalLeg;
use crate::datapath::log_sync::LogSync;
use crate::datapath::mirror_leg::QueueMirror;
use crate::datapath::stats::QueueCounters;
use crate::datapath::waiters::Waiters;

/// What a tag's task uses, borrowed from its queue.
pub(super) struct TagContext<'a> {
    pub(super) qid: u16,
    pub(super) io: &'a IoPath,
    pub(super) counters: &'a QueueCounters,
    pub(super) parked: &'a Waiters,
    pub(super) leg: &'a LocalLeg,
    pub(super) mirror: &'a QueueMirror,
    pub(super) log: &'a LogSync,
    pub(super) dev_size: u64,
    pub(super) max_io: u32,
}
