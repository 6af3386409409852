//! One ublk queue: a thread with one io_uring, one async task per tag.
//!
//! The life of a request, all on this thread and this ring:
//!
//! 1. the tag's task waits in FETCH (or COMMIT_AND_FETCH) until the kernel hands it a request;
//! 2. [`Request::parse`] turns the io descriptor into a typed request, refusing bad ones before
//!    any I/O;
//! 3. [`admit`] counts it as started and passes the pause gate, or parks it until unpause;
//! 4. [`fan_out`] (`fanout.rs`) issues the request to the legs and awaits them: reads go to the local image
//!    only; while a mirror is attached, a write-like request takes its place in the range lock
//!    (overlapping writes reach both legs in arrival order), then the local leg (on this ring)
//!    and the mirror leg (handed to the mirror link) run concurrently, and the request completes
//!    when both have. The guest gets the local result; a request the target did not take marks
//!    its range out of sync;
//! 5. the result is committed together with the fetch of the next request, so every tag is
//!    completed exactly once on every path: an error is a negative errno, never a lost tag.

use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

use crate::datapath::fanout::fan_out;
use crate::datapath::io_path::IoPath;
use crate::datapath::local_leg::LocalLeg;
use crate::datapath::log_sync::LogSync;
use crate::datapath::mirror_leg::QueueMirror;
use crate::datapath::request::Request;
use crate::datapath::stats::InFlight;
use crate::datapath::tag::TagContext;
use crate::datapath::waiters::{wait_until, Waiters};
use crate::queue_ring::{init_queue_ring, run_deferred_work, RingMode};
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

/// The queue thread's body: serve `qid` until the device stops.
pub fn run_queue(qid: u16, dev: &UblkDev, ctx: &QueueContext) {
    let queue = match open_queue(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: cannot set up: {e}");
            ctx.stop(StopReason::QueueFailed(qid));
            return;
        }
    };
    let leg = Rc::new(LocalLeg::new(ctx.io.image_fd()));
    let parked = Rc::new(Waiters::new(dev.dev_info.queue_depth));
    let exe = Rc::new(smol::LocalExecutor::new());
    // The mirror's connection tasks and the operations forwarded to this queue own all they
    // use, so they run on an executor of their own ('static, unlike the tag tasks, which
    // borrow the queue), ticked together with the first.
    let mirror_exe: Rc<smol::LocalExecutor<'static>> = Rc::new(smol::LocalExecutor::new());
    let mirror = Rc::new(QueueMirror::new(qid, mirror_exe.clone()));
    let log = Rc::new(LogSync::default());
    let dev_size = dev.tgt.dev_size;
    let max_io = dev.dev_info.max_io_buf_bytes;

    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let (queue, leg, ctx, parked, mirror, log) = (
                queue.clone(),
                leg.clone(),
                ctx.clone(),
                parked.clone(),
                mirror.clone(),
                log.clone(),
            );
            exe.spawn(async move {
                let tag_ctx = TagContext {
                    qid,
                    io: &ctx.io,
                    counters: ctx.io.stats.queue(usize::from(qid)),
                    parked: &parked,
                    leg: &leg,
                    mirror: &mirror,
                    log: &log,
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
    exe.spawn(doorbell(
        ctx.io.clone(),
        qid,
        parked.clone(),
        mirror.clone(),
    ))
    .detach();

    let driver = exe.clone();
    smol::block_on(exe.run(async {
        let run_ready_tasks = || {
            loop {
                let ran_tag_task = driver.try_tick();
                if !mirror_exe.try_tick() && !ran_tag_task {
                    break;
                }
            }
            // Stopping, libublk's loop no longer waits, and so no longer runs the deferred
            // completions the last tasks wait for (`queue_ring.rs`).
            if queue.is_stopping() {
                run_deferred_work();
            }
        };
        let all_done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(20), run_ready_tasks, all_done).await
        {
            log::error!("queue {qid}: event loop failed: {e}");
            ctx.stop(StopReason::QueueFailed(qid));
        }
    }));
    // Tasks still waiting end with the executor: answer what other threads wait for.
    mirror.abandon(ctx.io.mirror());
    // Whoever stopped the device (us, or STOP_DEV from another process such as `ublk-mirror
    // delete --force`), the daemon must follow: it holds the char device until it exits.
    log::debug!("queue {qid}: stopped");
    ctx.stop(StopReason::QueueStopped(qid));
}

/// The queue's ring (`queue_ring.rs`), then libublk's queue on it.
fn open_queue(qid: u16, dev: &UblkDev) -> Result<UblkQueue<'_>, UblkError> {
    let (sq, cq) = (u32::from(dev.tgt.sq_depth), u32::from(dev.tgt.cq_depth));
    if init_queue_ring(sq, cq)? == RingMode::Cooperative {
        log::warn!("queue {qid}: this kernel has no DEFER_TASKRUN io_uring: served without it");
    }
    UblkQueue::new(qid, dev)
}

/// Reads the queue's eventfd on the queue's ring. Each ring: delivers the forwarded mirror
/// outcomes waiting in the queue's mailbox (each wakes its own tag), sends what was forwarded
/// to this queue's connection, and wakes the tasks waiting for the gate or a range lock.
async fn doorbell(io: Arc<IoPath>, qid: u16, parked: Rc<Waiters>, mirror: Rc<QueueMirror>) {
    let fd = io.doorbell(qid);
    // Leaked on purpose: the read may still be in flight when the thread's ring is torn down
    // at exit, and the kernel must never write into freed memory. 8 bytes per queue.
    let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    loop {
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        for (tag, outcome) in io.mail.take(qid) {
            parked.deliver(tag, outcome);
        }
        if let Some(m) = io.mirror() {
            mirror.on_doorbell(&m);
        }
        parked.wake_all();
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            log::error!("queue {qid}: doorbell read failed: errno {}", -res);
            return;
        }
    }
}

/// Counts the request as started and lets it through the gate, or parks it until the gate
/// lets it through. The order (count, then look) is what makes pause safe: see
/// `device/lifecycle.rs`. The request is in flight until the returned guard drops.
async fn admit<'a>(t: &TagContext<'a>, req: &Request) -> InFlight<'a> {
    loop {
        if let Some(in_flight) = t.counters.try_start(|| t.io.gate().blocks(req)) {
            return in_flight;
        }
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
                let in_flight = admit(t, &req).await;
                let res = fan_out(t, tag, req, buf.as_mut_slice()).await;
                t.counters.record(&req, res.is_ok());
                drop(in_flight);
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
