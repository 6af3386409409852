//! The io_uring a queue thread runs on, made before libublk's `UblkQueue::new` (which would
//! otherwise make one with COOP_TASKRUN alone and use it as it finds it).
//!
//! Why these flags: a queue thread is the ring's only user (its tags, its mirror connection,
//! its doorbell and its log writes all submit from it), so the ring can be SINGLE_ISSUER, and
//! with DEFER_TASKRUN the completions that need the thread's context (a ublk command handed a
//! new request, a socket ready for the receive, the doorbell's eventfd read) are no longer
//! queued as task work that runs whenever the thread next enters the kernel for anything:
//! they wait until it enters to wait for completions (IORING_ENTER_GETEVENTS) and then run
//! together, in the thread that reaps them (ublksrv's and the kernel selftests' ublk servers
//! set up their queue rings the same way).
//!
//! What that asks of the loop: deferred work runs only on an enter with GETEVENTS, and
//! libublk's loop, once the queue is stopping, submits without waiting (no GETEVENTS), so
//! the aborted commands' completions, and the mirror replies the last requests wait for,
//! would never arrive and the queue thread would never end (the device orphaned). The queue
//! loop therefore calls [`run_deferred_work`] on every turn while stopping.
//!
//! A kernel without these flags (before 6.1) refuses the ring with EINVAL: the queue then
//! gets libublk's own default (COOP_TASKRUN), and says so in the log.

use std::cell::{OnceCell, RefCell};

use io_uring::{squeue, IoUring};
use libublk::UblkError;

/// How the thread's ring was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingMode {
    /// SINGLE_ISSUER + DEFER_TASKRUN.
    Deferred,
    /// COOP_TASKRUN only: the kernel refused the deferred flags.
    Cooperative,
}

/// Makes this thread's queue ring (libublk's thread-local one) with `sq_depth` submission
/// and `cq_depth` completion entries, unless the thread has one already.
pub fn init_queue_ring(sq_depth: u32, cq_depth: u32) -> Result<RingMode, UblkError> {
    let mut mode = RingMode::Deferred;
    libublk::io::ublk_init_task_ring(|cell| {
        if cell.get().is_some() {
            return Ok(());
        }
        let ring = match build(sq_depth, cq_depth, RingMode::Deferred) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                mode = RingMode::Cooperative;
                build(sq_depth, cq_depth, RingMode::Cooperative)
            }
            other => other,
        }
        .map_err(UblkError::IOError)?;
        set(cell, ring)
    })?;
    Ok(mode)
}

fn build(sq_depth: u32, cq_depth: u32, mode: RingMode) -> std::io::Result<IoUring> {
    let mut b = IoUring::<squeue::Entry>::builder();
    b.setup_cqsize(cq_depth).setup_coop_taskrun();
    if mode == RingMode::Deferred {
        b.setup_single_issuer().setup_defer_taskrun();
    }
    b.build(sq_depth)
}

fn set(cell: &OnceCell<RefCell<IoUring>>, ring: IoUring) -> Result<(), UblkError> {
    cell.set(RefCell::new(ring))
        .map_err(|_| UblkError::OtherError(-libc::EEXIST))
}

/// From `linux/io_uring.h` (io-uring keeps its bindings private).
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;

/// Runs the completion work deferred on this thread's ring (posting its completions, for the
/// next reap) without waiting for any: an enter with GETEVENTS and nothing to wait for.
pub fn run_deferred_work() {
    libublk::io::with_task_io_ring_mut(|r| {
        // SAFETY: no submissions and no argument pointer: the kernel reads nothing of ours.
        let res = unsafe {
            r.submitter()
                .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
        };
        if let Err(e) = res {
            log::debug!("running deferred completions: {e}");
        }
    });
}
