//! How a tag's task waits for another thread (the pause gate opening, a range lock granted,
//! a forwarded mirror outcome) without blocking the queue's ring.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

use crate::mirror::link::Outcome;

/// What tasks of this queue wait for from other threads. Gate and range-lock waiters are
/// few and rare: all are woken when the doorbell rings and each re-checks its condition. A
/// forwarded mirror outcome wakes only the tag it is for.
#[derive(Default)]
pub(super) struct Waiters {
    wakers: RefCell<Vec<Waker>>,
    /// Per tag: the forwarded mirror outcome delivered, until its task takes it, and the
    /// task's waker while it waits for one.
    outcomes: RefCell<Vec<(Option<Outcome>, Option<Waker>)>>,
}

impl Waiters {
    pub(super) fn new(depth: u16) -> Waiters {
        let p = Waiters::default();
        p.outcomes
            .borrow_mut()
            .resize_with(usize::from(depth), || (None, None));
        p
    }

    pub(super) fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// A forwarded operation's outcome for `tag` arrived: wakes that tag's task only.
    pub(super) fn deliver(&self, tag: u16, outcome: Outcome) {
        if let Some(slot) = self.outcomes.borrow_mut().get_mut(usize::from(tag)) {
            slot.0 = Some(outcome);
            if let Some(w) = slot.1.take() {
                w.wake();
            }
        }
    }

    /// Forgets a stale outcome before `tag` forwards a new operation.
    pub(super) fn clear(&self, tag: u16) {
        if let Some(slot) = self.outcomes.borrow_mut().get_mut(usize::from(tag)) {
            *slot = (None, None);
        }
    }

    /// Waits for the outcome of the operation `tag` forwarded.
    pub(super) async fn outcome(&self, tag: u16) -> Outcome {
        poll_fn(|cx| {
            let mut slots = self.outcomes.borrow_mut();
            let Some(slot) = slots.get_mut(usize::from(tag)) else {
                return Poll::Ready(Outcome::Failed);
            };
            match slot.0.take() {
                Some(o) => Poll::Ready(o),
                None => {
                    slot.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// Waits until another thread makes `ready` true; woken by the queue's doorbell (or, for a
/// range lock released on this queue, by the releasing task directly).
pub(super) async fn wait_until(parked: &Waiters, mut ready: impl FnMut() -> bool) {
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
