//! One ublk queue: a thread with one io_uring, one async task per tag.
//!
//! The life of a request, all on this thread and this ring:
//!
//! 1. the tag's task waits in FETCH (or COMMIT_AND_FETCH) until the kernel hands it a request;
//! 2. [`Request::parse`] turns the io descriptor into a typed request, refusing bad ones before
//!    any I/O;
//! 3. [`admit`] counts it as started and passes the pause gate, or parks it until unpause;
//! 4. [`serve`] issues the request to the legs and awaits them. Today there is one leg, the
//!    local image; the mirror leg joins it for write-like requests, issued concurrently on the
//!    same ring, and the request completes when both have;
//! 5. the result is committed together with the fetch of the next request, so every tag is
//!    completed exactly once on every path: an error is a negative errno, never a lost tag.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

use crate::local_leg::LocalLeg;
use crate::request::Request;
use crate::shared::Shared;
use crate::stats::QueueCounters;
use crate::StopReason;

/// What every queue thread needs from the daemon; cheap to clone into each thread.
#[derive(Clone)]
pub struct QueueContext {
    pub shared: Arc<Shared>,
}

impl QueueContext {
    fn stop(&self, why: StopReason) {
        if let Ok(tx) = self.shared.stop.lock() {
            let _ = tx.send(why);
        }
    }
}

/// Tasks of this queue parked at the pause gate; woken when the doorbell rings.
#[derive(Default)]
struct Parked {
    wakers: RefCell<Vec<Waker>>,
}

impl Parked {
    fn wake_all(&self) {
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// The queue thread's body: serve `qid` until the device stops.
pub fn run_queue(qid: u16, dev: &UblkDev, ctx: &QueueContext) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: cannot set up: {e}");
            ctx.stop(StopReason::QueueFailed(qid));
            return;
        }
    };
    let leg = Rc::new(LocalLeg::new(ctx.shared.image_fd()));
    let parked = Rc::new(Parked::default());
    let exe = Rc::new(smol::LocalExecutor::new());
    let dev_size = dev.tgt.dev_size;
    let max_io = dev.dev_info.max_io_buf_bytes;

    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let (queue, leg, ctx, parked) =
                (queue.clone(), leg.clone(), ctx.clone(), parked.clone());
            exe.spawn(async move {
                let tag_ctx = TagContext {
                    shared: &ctx.shared,
                    counters: ctx.shared.stats.queue(usize::from(qid)),
                    parked: &parked,
                    leg: &leg,
                    dev_size,
                    max_io,
                };
                match serve_tag(&queue, &tag_ctx, tag).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => {
                        log::error!("queue {qid} tag {tag}: stopped serving: {e}");
                        ctx.stop(StopReason::QueueFailed(qid));
                    }
                }
            })
        })
        .collect();
    // Not awaited: it lives as long as the executor and rings parked tasks awake.
    exe.spawn(doorbell(ctx.shared.doorbell(qid), parked.clone()))
        .detach();

    let driver = exe.clone();
    smol::block_on(exe.run(async {
        let run_ready_tasks = || while driver.try_tick() {};
        let all_done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(20), run_ready_tasks, all_done).await
        {
            log::error!("queue {qid}: event loop failed: {e}");
            ctx.stop(StopReason::QueueFailed(qid));
        }
    }));
    // Whoever stopped the device (us, or STOP_DEV from another process such as `ublk-mirror
    // delete --force`), the daemon must follow: it holds the char device until it exits.
    log::debug!("queue {qid}: stopped");
    ctx.stop(StopReason::QueueStopped(qid));
}

/// Reads the queue's eventfd on the queue's ring; each ring wakes every parked task here.
async fn doorbell(fd: std::os::fd::RawFd, parked: Rc<Parked>) {
    // Leaked on purpose: the read may still be in flight when the thread's ring is torn down
    // at exit, and the kernel must never write into freed memory. 8 bytes per queue.
    let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    loop {
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            log::error!(
                "doorbell read failed: errno {}; parked requests wake on the next request",
                -res
            );
            // Wake everyone so nothing is stranded, then stop listening.
            parked.wake_all();
            return;
        }
        parked.wake_all();
    }
}

/// What a tag's task uses, borrowed from its queue.
struct TagContext<'a> {
    shared: &'a Shared,
    counters: &'a QueueCounters,
    parked: &'a Parked,
    leg: &'a LocalLeg,
    dev_size: u64,
    max_io: u32,
}

/// Counts the request as started and lets it through the gate, or parks it until the gate
/// lets it through. The order (count, then look) is what makes pause safe: see `shared.rs`.
async fn admit(t: &TagContext<'_>, req: &Request) {
    loop {
        t.counters.start();
        if !t.shared.gate().blocks(req) {
            return;
        }
        t.counters.unstart();
        t.counters.set_parked(1);
        poll_fn(|cx| {
            if t.shared.gate().blocks(req) {
                t.parked.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        t.counters.set_parked(-1);
    }
}

/// One tag's loop. Returns `Err(QueueIsDown)` when the device stops, which is the normal end.
async fn serve_tag(queue: &UblkQueue<'_>, t: &TagContext<'_>, tag: u16) -> Result<(), UblkError> {
    // The buffer is owned by this task and outlives every I/O it is lent to: each leg's
    // operation is awaited before the next commit, and the task ends only when the queue is down.
    let mut buf = IoBuf::<u8>::new(t.max_io as usize);
    queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = queue.get_iod(tag);
        let parsed = Request::parse(
            iod.op_flags,
            iod.start_sector,
            iod.nr_sectors,
            t.dev_size,
            t.max_io,
        );
        let result = match parsed {
            Ok(req) => {
                admit(t, &req).await;
                let res = serve(t.leg, req, buf.as_mut_slice()).await;
                t.counters.record(&req, res.is_ok());
                t.counters.complete();
                res.unwrap_or_else(|e| {
                    log::error!("tag {tag}: {req:?}: {e}");
                    -e.errno()
                })
            }
            Err(e) => {
                log::warn!("tag {tag}: refused: {e}");
                t.counters.record_error();
                -e.errno()
            }
        };
        queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result)
            .await?;
    }
}

/// Carries out one request; Ok is the value committed to the kernel (bytes for data requests).
async fn serve(
    leg: &LocalLeg,
    req: Request,
    buf: &mut [u8],
) -> Result<i32, crate::error::LegError> {
    match req {
        Request::Read { offset, len } => {
            leg.read(&mut buf[..len as usize], offset).await?;
            Ok(len as i32)
        }
        Request::Write { offset, len, fua } => {
            leg.write(&buf[..len as usize], offset, fua).await?;
            Ok(len as i32)
        }
        Request::Flush => leg.flush().await.map(|()| 0),
        Request::Discard { offset, len } => leg.discard(offset, len).await.map(|()| 0),
        Request::WriteZeroes { offset, len } => leg.write_zeroes(offset, len).await.map(|()| 0),
    }
}
