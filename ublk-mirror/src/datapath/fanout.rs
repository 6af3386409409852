//! The fan-out of one admitted request to its legs. A read goes to the local image only; so
//! does a write-like request while no mirror takes writes ([`unmirrored`]: it marks what the
//! target will lack out of sync). While a mirror takes writes, a write-like request goes to
//! both legs at once ([`mirrored`]). Either way the guest gets the local leg's result.

use std::sync::Arc;

use crate::datapath::error::LegError;
use crate::datapath::io_path::IoPath;
use crate::datapath::local_leg::LocalLeg;
use crate::datapath::request::Request;
use crate::datapath::tag::TagContext;
use crate::datapath::waiters::wait_until;
use crate::mirror::link::{LegOp, Mirror, Outcome};

/// Carries out one request; Ok is the value committed to the kernel (bytes for data
/// requests). Write-like requests go to the mirror too while one takes I/O.
pub(super) async fn fan_out(
    t: &TagContext<'_>,
    tag: u16,
    req: Request,
    buf: &mut [u8],
) -> Result<i32, LegError> {
    if matches!(req, Request::Read { .. }) {
        return serve_local(t.leg, req, buf).await;
    }
    // Counted before looking at the mirror slot: a mirror starting waits for local-only
    // writes to finish, and they see it and mark themselves out of sync (see `Mirroring::start`).
    t.counters.local_only_begin();
    let mirror = t.io.mirror();
    let Some(m) = mirror.as_ref().filter(|m| m.takes_io()) else {
        return unmirrored(t, req, buf, mirror.is_some()).await;
    };
    t.counters.local_only_end();
    mirrored(t, tag, req, buf, m).await
}

/// A write-like request no mirror takes (`attached`: one is attached but failed or
/// stopping), counted as local-only by the caller; ends that count.
async fn unmirrored(
    t: &TagContext<'_>,
    req: Request,
    buf: &mut [u8],
    attached: bool,
) -> Result<i32, LegError> {
    // With a mirror attached but not taking I/O (failed, stopping), or none since one was
    // stopped or a previous daemon's died, the write will differ from the target (a later
    // --resync must copy it): its bits are set before it is issued, so a crash cannot lose
    // them.
    if attached || t.io.tracks_without_mirror() {
        mark_dirty(t.io, &req);
    }
    let res = serve_local(t.leg, req, buf).await;
    // A mirror that appeared meanwhile (`Mirroring::start` waits for us) must see this write.
    if !attached && t.io.has_mirror() {
        mark_dirty(t.io, &req);
    }
    t.counters.local_only_end();
    res
}

/// A write-like request to both legs: its place in the range lock (overlapping writes reach
/// both legs in arrival order), the activity log, then the local leg and the mirror leg at
/// once, both from the tag's own buffer (`datapath/mirror_leg.rs`); done when both are.
async fn mirrored(
    t: &TagContext<'_>,
    tag: u16,
    req: Request,
    buf: &[u8],
    m: &Arc<Mirror>,
) -> Result<i32, LegError> {
    let range = req.range().filter(|_| !t.io.range_lock_disabled);
    let ticket = range.map(|(off, len)| t.io.ranges.enqueue(off, len, t.qid));
    if let Some(ticket) = &ticket {
        wait_until(t.parked, || ticket.granted()).await;
    }
    let Some(op) = leg_op(req, buf) else {
        return serve_local_write(t.leg, req, buf).await;
    };
    // On disk before either leg sees the write: a crash between the legs is then covered.
    // A cold extent's log write runs on this ring (`log_sync.rs`), shared by the tags that
    // wait for it together; the queue's other tags go on meanwhile.
    let logged = req.range();
    if let Some((off, len)) = logged {
        if let Some(seq) = t.io.dirty.al_log(off, len) {
            t.log.durable(&t.io.dirty, seq, t.counters).await;
        }
    }
    // Alone on the queue (QD1), the mirror leg goes first: its send is queued, and its sender
    // task runs while this task yields once, before the local write is, so the ring issues the
    // send first and the target works on the write while this thread writes the image. The
    // other way round, an O_DIRECT write that completes inline (as on a fast disk) ran before
    // the send and the legs ran one after the other: 1.31x the QD1 IOPS in an A/B (issue 13).
    // With others in flight the yield is skipped: there it cost 0.81x at QD32 (sends batch
    // less), and the target is busy anyway.
    let send_first = t.counters.in_flight() <= 1;
    let remote = t.mirror.run(m, t.parked, tag, op);
    let local = async {
        if send_first {
            smol::future::yield_now().await;
        }
        serve_local_write(t.leg, req, buf).await
    };
    let (remote, local) = smol::future::zip(remote, local).await;
    if let Some(ticket) = &ticket {
        for q in t.io.ranges.release(ticket) {
            if q == t.qid {
                // A waiter on this queue: woken here, not through the eventfd.
                t.parked.wake_all();
            } else {
                t.io.mail.ring(q);
            }
        }
    }
    // The legs may differ: the target lacks the write, or it took a write whose local leg
    // failed (the guest sees the error, and reads what the image holds now). Either way a
    // resync must copy the local range over.
    if remote == Outcome::Failed || local.is_err() {
        mark_dirty(t.io, &req);
    }
    if let Some((off, len)) = logged {
        t.io.dirty.al_end(off, len);
    }
    local
}

/// What the target must do for a write-like request (None for a read), borrowing the data
/// from the tag's buffer.
fn leg_op(req: Request, buf: &[u8]) -> Option<LegOp<'_>> {
    Some(match req {
        Request::Write { offset, len, fua } => LegOp::Write {
            offset,
            data: &buf[..len as usize],
            fua,
        },
        Request::Flush => LegOp::Flush,
        Request::Discard { offset, len } | Request::WriteZeroes { offset, len } => {
            LegOp::WriteZeroes { offset, len }
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
async fn serve_local(leg: &LocalLeg, req: Request, buf: &mut [u8]) -> Result<i32, LegError> {
    match req {
        Request::Read { offset, len } => {
            leg.read(&mut buf[..len as usize], offset).await?;
            Ok(len as i32)
        }
        _ => serve_local_write(leg, req, buf).await,
    }
}

/// The local leg of a request that only reads the tag's buffer (all but a read).
async fn serve_local_write(leg: &LocalLeg, req: Request, buf: &[u8]) -> Result<i32, LegError> {
    match req {
        Request::Write { offset, len, fua } => {
            leg.write(&buf[..len as usize], offset, fua).await?;
            Ok(len as i32)
        }
        Request::Flush => leg.flush().await.map(|()| 0),
        Request::Discard { offset, len } => leg.discard(offset, len).await.map(|()| 0),
        Request::WriteZeroes { offset, len } => leg.write_zeroes(offset, len).await.map(|()| 0),
        Request::Read { .. } => Err(LegError::NotAWrite),
    }
}
