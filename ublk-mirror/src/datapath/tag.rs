//! What one tag's task borrows from its queue, and how it waits for another thread (the pause
//! gate opening, a range lock granted, a mirror outcome) without blocking the queue's ring.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

use crate::datapath::io_path::IoPath;
use crate::datapath::local_leg::LocalLeg;
use crate::datapath::stats::QueueCounters;
use crate::mirror::link::Outcome;

/// Tasks of this queue waiting for something another thread does (the pause gate opening, a
/// range lock granted, a mirror outcome); all are woken when the queue's doorbell rings and
/// each re-checks its own condition.
#[derive(Default)]
pub(super) struct Parked {
    pub(super) wakers: RefCell<Vec<Waker>>,
    /// The mirror outcome delivered for each tag, until its task takes it.
    pub(super) outcomes: RefCell<Vec<Option<Outcome>>>,
}

impl Parked {
    pub(super) fn wake_all(&self) {
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// Waits until another thread makes `ready` true; woken by the queue's doorbell.
pub(super) async fn wait_until(parked: &Parked, mut ready: impl FnMut() -> bool) {
    poll_fn(|cx| {
        if ready() {
            Poll::Ready(())
        } else {
            parked.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// What a tag's task uses, borrowed from its queue.
pub(super) struct TagContext<'a> {
    pub(super) qid: u16,
    pub(super) io: &'a IoPath,
    pub(super) counters: &'a QueueCounters,
    pub(super) parked: &'a Parked,
    pub(super) leg: &'a LocalLeg,
    pub(super) dev_size: u64,
    pub(super) max_io: u32,
}
