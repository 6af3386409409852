//! One ublk queue: a thread with one io_uring, one async task per tag.
//!
//! The life of a request, all on this thread and this ring:
//!
//! 1. the tag's task waits in FETCH (or COMMIT_AND_FETCH) until the kernel hands it a request;
//! 2. [`Request::parse`] turns the io descriptor into a typed request, refusing bad ones before
//!    any I/O;
//! 3. [`serve`] issues the request to the legs and awaits them. Today there is one leg, the
//!    local image; the mirror leg joins it for write-like requests, issued concurrently on the
//!    same ring, and the request completes when both have;
//! 4. the result is committed together with the fetch of the next request, so every tag is
//!    completed exactly once on every path: an error is a negative errno, never a lost tag.

use std::rc::Rc;
use std::sync::mpsc::Sender;

use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};

use crate::local_leg::LocalLeg;
use crate::request::Request;
use crate::stats::{QueueCounters, Stats};
use crate::StopReason;

/// What every queue thread needs from the daemon; cheap to clone into each thread.
#[derive(Clone)]
pub struct QueueContext {
    pub stats: Stats,
    pub stop: Sender<StopReason>,
}

/// The queue thread's body: serve `qid` until the device stops.
pub fn run_queue(qid: u16, dev: &UblkDev, ctx: &QueueContext) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: cannot set up: {e}");
            let _ = ctx.stop.send(StopReason::QueueFailed(qid));
            return;
        }
    };
    let leg = Rc::new(LocalLeg::new());
    let exe = Rc::new(smol::LocalExecutor::new());
    let dev_size = dev.tgt.dev_size;
    let max_io = dev.dev_info.max_io_buf_bytes;

    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let (queue, leg, ctx) = (queue.clone(), leg.clone(), ctx.clone());
            exe.spawn(async move {
                let counters = ctx.stats.queue(usize::from(qid));
                match serve_tag(&queue, &leg, counters, tag, dev_size, max_io).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => {
                        log::error!("queue {qid} tag {tag}: stopped serving: {e}");
                        let _ = ctx.stop.send(StopReason::QueueFailed(qid));
                    }
                }
            })
        })
        .collect();

    let driver = exe.clone();
    smol::block_on(exe.run(async {
        let run_ready_tasks = || while driver.try_tick() {};
        let all_done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(20), run_ready_tasks, all_done).await
        {
            log::error!("queue {qid}: event loop failed: {e}");
            let _ = ctx.stop.send(StopReason::QueueFailed(qid));
        }
    }));
    // Whoever stopped the device (us, or STOP_DEV from another process such as `ublk-mirror
    // delete --force`), the daemon must follow: it holds the char device until it exits.
    log::debug!("queue {qid}: stopped");
    let _ = ctx.stop.send(StopReason::QueueStopped(qid));
}

/// One tag's loop. Returns `Err(QueueIsDown)` when the device stops, which is the normal end.
async fn serve_tag(
    queue: &UblkQueue<'_>,
    leg: &LocalLeg,
    counters: &QueueCounters,
    tag: u16,
    dev_size: u64,
    max_io: u32,
) -> Result<(), UblkError> {
    // The buffer is owned by this task and outlives every I/O it is lent to: each leg's
    // operation is awaited before the next commit, and the task ends only when the queue is down.
    let mut buf = IoBuf::<u8>::new(max_io as usize);
    queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = queue.get_iod(tag);
        let parsed = Request::parse(
            iod.op_flags,
            iod.start_sector,
            iod.nr_sectors,
            dev_size,
            max_io,
        );
        let result = match parsed {
            Ok(req) => {
                let res = serve(leg, req, buf.as_mut_slice()).await;
                counters.record(&req, res.is_ok());
                res.unwrap_or_else(|e| {
                    log::error!("tag {tag}: {req:?}: {e}");
                    -e.errno()
                })
            }
            Err(e) => {
                log::warn!("tag {tag}: refused: {e}");
                counters.record_error();
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
