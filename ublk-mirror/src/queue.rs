//! One ublk queue: a thread with one io_uring, one async task per tag.
//!
//! The life of a request, all on this thread and this ring:
//!
//! 1. the tag's task waits in FETCH (or COMMIT_AND_FETCH) until the kernel hands it a request;
//! 2. [`Request::parse`] turns the io descriptor into a typed request, refusing bad ones before
//!    any I/O;
//! 3. [`admit`] counts it as started and passes the pause gate, or parks it until unpause;
//! 4. [`serve`] issues the request to the legs and awaits them: reads go to the local image
//!    only; while a mirror is attached, a write-like request takes its place in the range lock
//!    (overlapping writes reach both legs in arrival order), then the local leg (on this ring)
//!    and the mirror leg (handed to the mirror link) run concurrently, and the request completes
//!    when both have. The guest gets the local result; a request the target did not take marks
//!    its range out of sync;
//! 5. the result is committed together with the fetch of the next request, so every tag is
//!    completed exactly once on every path: an error is a negative errno, never a lost tag.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Poll, Waker};

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

use crate::io_path::IoPath;
use crate::local_leg::LocalLeg;
use crate::mirror::{MirrorOp, Outcome};
use crate::request::Request;
use crate::stats::QueueCounters;
use crate::stop::StopReason;

/// What every queue thread needs from the daemon: the data path's handle and where to ask
/// for a stop, never the control plane; cheap to clone into each thread.
#[derive(Clone)]
pub struct QueueContext {
    pub io: Arc<IoPath>,
    pub stop: Sender<StopReason>,
}

impl QueueContext {
    fn stop(&self, why: StopReason) {
        let _ = self.stop.send(why);
    }
}

/// Tasks of this queue waiting for something another thread does (the pause gate opening, a
/// range lock granted, a mirror outcome); all are woken when the queue's doorbell rings and
/// each re-checks its own condition.
#[derive(Default)]
struct Parked {
    wakers: RefCell<Vec<Waker>>,
    /// The mirror outcome delivered for each tag, until its task takes it.
    outcomes: RefCell<Vec<Option<Outcome>>>,
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
    let leg = Rc::new(LocalLeg::new(ctx.io.image_fd()));
    let parked = Rc::new(Parked::default());
    parked
        .outcomes
        .borrow_mut()
        .resize(usize::from(dev.dev_info.queue_depth), None);
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
                    qid,
                    io: &ctx.io,
                    counters: ctx.io.stats.queue(usize::from(qid)),
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
    exe.spawn(doorbell(ctx.io.clone(), qid, parked.clone()))
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

/// Reads the queue's eventfd on the queue's ring; each ring delivers the mirror outcomes
/// waiting in the queue's mailbox and wakes every waiting task here.
async fn doorbell(io: Arc<IoPath>, qid: u16, parked: Rc<Parked>) {
    let fd = io.doorbell(qid);
    // Leaked on purpose: the read may still be in flight when the thread's ring is torn down
    // at exit, and the kernel must never write into freed memory. 8 bytes per queue.
    let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    loop {
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        {
            let mut slots = parked.outcomes.borrow_mut();
            for (tag, outcome) in io.mail.take(qid) {
                if let Some(slot) = slots.get_mut(usize::from(tag)) {
                    *slot = Some(outcome);
                }
            }
        }
        parked.wake_all();
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            log::error!("queue {qid}: doorbell read failed: errno {}", -res);
            return;
        }
    }
}

/// Waits until another thread makes `ready` true; woken by the queue's doorbell.
async fn wait_until(parked: &Parked, mut ready: impl FnMut() -> bool) {
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
struct TagContext<'a> {
    qid: u16,
    io: &'a IoPath,
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
        if !t.io.gate().blocks(req) {
            return;
        }
        t.counters.unstart();
        t.counters.set_parked(1);
        wait_until(t.parked, || !t.io.gate().blocks(req)).await;
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
                let res = serve(t, tag, req, buf.as_mut_slice()).await;
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

/// Carries out one request; Ok is the value committed to the kernel (bytes for data
/// requests). Write-like requests go to the mirror too while one takes I/O.
async fn serve(
    t: &TagContext<'_>,
    tag: u16,
    req: Request,
    buf: &mut [u8],
) -> Result<i32, crate::error::LegError> {
    if matches!(req, Request::Read { .. }) {
        return serve_local(t.leg, req, buf).await;
    }
    // Counted before looking at the mirror slot: a mirror starting waits for local-only
    // writes to finish, and they see it and mark themselves out of sync (see start_mirror).
    t.counters.local_only_begin();
    let mirror = t.io.mirror.load_full();
    let Some(m) = mirror.as_ref().filter(|m| m.takes_io()) else {
        // With a mirror attached but not taking I/O (failed, stopping), or none since one was
        // stopped or a previous daemon's died, the write will differ from the target (a later
        // --resync must copy it): its bits are set before it is issued, so a crash cannot lose
        // them.
        if mirror.is_some() || t.io.tracks_without_mirror() {
            mark_dirty(t.io, &req);
        }
        let res = serve_local(t.leg, req, buf).await;
        // A mirror that appeared meanwhile (start_mirror waits for us) must see this write.
        if mirror.is_none() && t.io.mirror.load().is_some() {
            mark_dirty(t.io, &req);
        }
        t.counters.local_only_end();
        return res;
    };
    t.counters.local_only_end();

    let range = req.range().filter(|_| !t.io.range_lock_disabled);
    let ticket = range.map(|(off, len)| t.io.ranges.enqueue(off, len, t.qid));
    if let Some(ticket) = &ticket {
        wait_until(t.parked, || ticket.granted.load(Ordering::Acquire)).await;
    }
    let Some(op) = mirror_op(req, buf) else {
        return serve_local(t.leg, req, buf).await;
    };
    // On disk before either leg sees the write: a crash between the legs is then covered.
    let logged = req.range();
    if let Some((off, len)) = logged {
        t.io.dirty.al_begin(off, len);
    }
    t.parked.outcomes.borrow_mut()[usize::from(tag)] = None;
    m.submit(t.qid, tag, op);
    let remote = async {
        let mut outcome = None;
        wait_until(t.parked, || {
            outcome = t.parked.outcomes.borrow_mut()[usize::from(tag)].take();
            outcome.is_some()
        })
        .await;
        outcome.unwrap_or(Outcome::Failed)
    };
    let (local, remote) = smol::future::zip(serve_local(t.leg, req, buf), remote).await;
    if let Some(ticket) = &ticket {
        for q in t.io.ranges.release(ticket) {
            t.io.mail.ring(q);
        }
    }
    if remote == Outcome::Failed {
        mark_dirty(t.io, &req);
    }
    if let Some((off, len)) = logged {
        t.io.dirty.al_end(off, len);
    }
    local
}

/// What the target must do for a write-like request (None for a read). The data is copied:
/// the mirror link sends it from another thread.
fn mirror_op(req: Request, buf: &[u8]) -> Option<MirrorOp> {
    Some(match req {
        Request::Write { offset, len, fua } => MirrorOp::Write {
            offset,
            data: buf[..len as usize].to_vec(),
            fua,
        },
        Request::Flush => MirrorOp::Flush,
        Request::Discard { offset, len } | Request::WriteZeroes { offset, len } => {
            MirrorOp::WriteZeroes { offset, len }
        }
        Request::Read { .. } => return None,
    })
}

fn mark_dirty(io: &IoPath, req: &Request) {
    if let Some((off, len)) = req.range() {
        io.dirty.mark(off, len);
    }
}

/// The local leg only.
async fn serve_local(
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
