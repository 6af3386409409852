//! One connection to the target, driven on the io_uring of the thread that owns it (a queue
//! thread; a test's ring in the unit tests). No helper thread, no channel, no copy: a request
//! is a frame (its 28-byte header and a pointer to the tag's own buffer) in the backlog; the
//! connection's sender task sends the backlog with one `sendmsg` at a time (so sends never
//! interleave on the socket; whatever queued meanwhile goes out together in the next one) and
//! resumes a short send; its receiver task keeps one `recv` in flight, takes every 16-byte
//! reply that arrived, and wakes exactly the task each one answers; its ticker checks the
//! oldest request against the mirror timeout every [`TICK`] while any is waiting.
//!
//! The buffer rule: a request's future resolves only when its reply (or failure) is in AND
//! its frame has left the sender (sent, or dropped unsent after a failure), so the caller may
//! hand its buffer back to the kernel as soon as the future resolves, and never before. The
//! futures are awaited to the end, never raced or dropped.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use nbd_proxy::proto::{
    cmd_flags, tx_flags, Command, RequestHeader, SimpleReply, REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN,
};

use crate::mirror::link::{LegOp, Mirror, Outcome};

/// Largest number of requests, and of payload bytes, one `sendmsg` carries.
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 4 << 20;
/// Replies are 16 bytes: one receive takes up to 1024 of them.
const RECV_BUF: usize = 16 << 10;
/// How often the oldest waiting request is checked against the mirror timeout.
pub const TICK: Duration = Duration::from_millis(100);
/// Zeroes written out for WRITE_ZEROES on a target without it (bss: costs no memory until
/// sent).
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A request waiting in the backlog.
struct Frame {
    cookie: u64,
    header: [u8; REQUEST_HEADER_LEN],
    data: *const u8,
    len: usize,
}

/// Where one request stands.
struct Slot {
    /// The sender is done with its frame (sent, or dropped after a failure).
    sent: bool,
    outcome: Option<Outcome>,
    waker: Option<Waker>,
    since: Instant,
}

pub struct RingConn {
    mirror: Arc<Mirror>,
    conn: usize,
    fd: i32,
    next_cookie: Cell<u64>,
    backlog: RefCell<VecDeque<Frame>>,
    slots: RefCell<HashMap<u64, Slot>>,
    sender: RefCell<Option<Waker>>,
    ticker: RefCell<Option<Waker>>,
    /// The receiver has ended (failure, or the clean stop closed the socket): every request
    /// is answered Failed from now on.
    dead: Cell<bool>,
}

fn wake(slot: &RefCell<Option<Waker>>) {
    if let Some(w) = slot.borrow_mut().take() {
        w.wake();
    }
}

/// Waits until `ready()`; whoever makes it true wakes the waker left in `slot`.
async fn park(slot: &RefCell<Option<Waker>>, ready: impl Fn() -> bool) {
    poll_fn(|cx| {
        if ready() {
            Poll::Ready(())
        } else {
            *slot.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

impl Slot {
    /// Wakes the request's task once both halves are in: the reply and the sender's release
    /// of the frame (the buffer rule).
    fn wake_if_done(&mut self) {
        if self.sent && self.outcome.is_some() {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

impl RingConn {
    /// Drives connection `conn` of `mirror` on this thread's ring: its sender, receiver and
    /// ticker become tasks of `exe` (which must be the executor of this thread's ring).
    pub fn start(mirror: Arc<Mirror>, conn: usize, exe: &smol::LocalExecutor<'_>) -> Rc<RingConn> {
        let fd = mirror.connections().get(conn).map_or(-1, |c| c.raw_fd());
        let rc = Rc::new(RingConn {
            mirror,
            conn,
            fd,
            next_cookie: Cell::new(1),
            backlog: RefCell::new(VecDeque::new()),
            slots: RefCell::new(HashMap::new()),
            sender: RefCell::new(None),
            ticker: RefCell::new(None),
            dead: Cell::new(fd < 0),
        });
        exe.spawn(rc.clone().send_loop()).detach();
        exe.spawn(rc.clone().recv_loop()).detach();
        exe.spawn(rc.clone().tick_loop()).detach();
        rc
    }

    /// The mirror this connection belongs to.
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    fn name(&self) -> &str {
        self.mirror
            .connections()
            .get(self.conn)
            .map_or("?", |c| c.name.as_str())
    }

    /// Carries out `op` on the target: Done once the target answered every NBD request it
    /// takes (a FUA write on a target without FUA is a WRITE, answered, then a FLUSH: a
    /// FLUSH sent alongside could be served before the write).
    pub async fn run(&self, op: LegOp<'_>) -> Outcome {
        let export = &self.mirror.export;
        let outcome = match op {
            LegOp::Write { offset, data, fua } => {
                let native = fua && export.has(tx_flags::SEND_FUA);
                let written = self.write(offset, data, native).await;
                if written == Outcome::Done && fua && !native {
                    self.flush().await
                } else {
                    written
                }
            }
            LegOp::Flush => self.flush().await,
            LegOp::WriteZeroes { offset, len } => self.write_zeroes(offset, len).await,
        };
        if outcome == Outcome::Done {
            self.mirror.count_done(op.len());
        }
        outcome
    }

    /// The largest payload the export takes in one request.
    fn max_payload(&self) -> usize {
        match self.mirror.export.block_size.maximum {
            0 => ZEROS.len(),
            max => max as usize,
        }
    }

    /// A WRITE, in pieces of at most the export's maximum block size (one piece but for
    /// copy chunks larger than that), the last with FUA if `fua`.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Outcome {
        let max = self.max_payload();
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(max);
            let last = done + n == data.len();
            let flags = if fua && last { cmd_flags::FUA } else { 0 };
            let piece = &data[done..done + n];
            let o = self
                .request(Command::Write, flags, offset + done as u64, piece)
                .await;
            if o != Outcome::Done {
                return o;
            }
            done += n;
        }
        Outcome::Done
    }

    /// A FLUSH, unless the export does not take one (mirrored with `allow_no_flush`): then
    /// nothing is sent and the request completes with its local flush alone, so a command
    /// the export did not offer never reaches it.
    async fn flush(&self) -> Outcome {
        if !self.mirror.export.has(tx_flags::SEND_FLUSH) {
            return Outcome::Done;
        }
        self.request(Command::Flush, 0, 0, &[]).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32) -> Outcome {
        if self.mirror.export.has(tx_flags::SEND_WRITE_ZEROES) {
            return self.submit(Command::WriteZeroes, 0, offset, &[], len).await;
        }
        let step = ZEROS.len().min(self.max_payload()) as u64;
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(step) as usize;
            let o = self
                .request(Command::Write, 0, offset + done, &ZEROS[..n])
                .await;
            if o != Outcome::Done {
                return o;
            }
            done += n as u64;
        }
        Outcome::Done
    }

    async fn request(&self, command: Command, flags: u16, offset: u64, data: &[u8]) -> Outcome {
        // Data requests are bounded by the io buffer (a u32) or ZEROS.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.submit(command, flags, offset, data, len).await
    }

    /// One NBD request: queued for the sender, resolved when answered and sent (the buffer
    /// rule, see the module doc).
    async fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        data: &[u8],
        length: u32,
    ) -> Outcome {
        if self.dead.get() {
            return Outcome::Failed;
        }
        let cookie = self.next_cookie.get();
        self.next_cookie.set(cookie.wrapping_add(1).max(1));
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        let was_idle = {
            let mut slots = self.slots.borrow_mut();
            let idle = slots.is_empty();
            slots.insert(
                cookie,
                Slot {
                    sent: false,
                    outcome: None,
                    waker: None,
                    since: Instant::now(),
                },
            );
            idle
        };
        self.backlog.borrow_mut().push_back(Frame {
            cookie,
            header,
            data: data.as_ptr(),
            len: data.len(),
        });
        wake(&self.sender);
        if was_idle {
            wake(&self.ticker);
        }
        poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(&cookie) else {
                return Poll::Ready(Outcome::Failed);
            };
            match slot.outcome {
                Some(o) if slot.sent => {
                    slots.remove(&cookie);
                    Poll::Ready(o)
                }
                _ => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The sender has let go of `cookie`'s frame.
    fn mark_sent(&self, cookie: u64) {
        if let Some(slot) = self.slots.borrow_mut().get_mut(&cookie) {
            slot.sent = true;
            slot.wake_if_done();
        }
    }

    /// `cookie` is answered; false if no request waits for that cookie.
    fn answer(&self, cookie: u64, outcome: Outcome) -> bool {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(&cookie) {
            Some(slot) if slot.outcome.is_none() => {
                slot.outcome = Some(outcome);
                slot.wake_if_done();
                true
            }
            _ => false,
        }
    }

    /// The receiver ended: every request not answered yet is Failed.
    fn fail_all(&self) {
        self.dead.set(true);
        for slot in self.slots.borrow_mut().values_mut() {
            slot.outcome.get_or_insert(Outcome::Failed);
            slot.wake_if_done();
        }
        wake(&self.sender);
        wake(&self.ticker);
    }

    async fn send_loop(self: Rc<Self>) {
        let mut batch: Vec<Frame> = Vec::with_capacity(SEND_BATCH);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * SEND_BATCH);
        loop {
            park(&self.sender, || {
                self.dead.get() || !self.backlog.borrow().is_empty()
            })
            .await;
            self.take_batch(&mut batch);
            if batch.is_empty() {
                // Dead and nothing left to let go of.
                return;
            }
            if !self.dead.get() && !self.mirror.failed() {
                iov.clear();
                for f in &batch {
                    iov.push(libc::iovec {
                        iov_base: f.header.as_ptr() as *mut libc::c_void,
                        iov_len: f.header.len(),
                    });
                    if f.len > 0 {
                        iov.push(libc::iovec {
                            iov_base: f.data as *mut libc::c_void,
                            iov_len: f.len,
                        });
                    }
                }
                if let Err(why) = self.send_all(&mut iov).await {
                    if !self.mirror.stopped() {
                        self.mirror.fail(format!(
                            "sending to the target on connection {:?}: {why}",
                            self.name()
                        ));
                    }
                }
            }
            for f in batch.drain(..) {
                self.mark_sent(f.cookie);
            }
        }
    }

    fn take_batch(&self, batch: &mut Vec<Frame>) {
        let mut backlog = self.backlog.borrow_mut();
        let mut bytes = 0usize;
        while batch.len() < SEND_BATCH && bytes < SEND_BATCH_BYTES {
            let Some(f) = backlog.pop_front() else { break };
            bytes += f.len;
            batch.push(f);
        }
    }

    /// Sends every byte `iov` points at, resuming short sends.
    async fn send_all(&self, iov: &mut [libc::iovec]) -> Result<(), String> {
        let mut first = 0usize;
        let mut retries = 0;
        while first < iov.len() {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = iov.len() - first;
            // The msghdr, the iovecs and the memory they point at live until this send's
            // completion is reaped: msg and iov here, headers in the batch, data in the
            // requesting tasks' buffers (the buffer rule).
            let sqe = opcode::SendMsg::new(types::Fd(self.fd), &msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            let res = submit_sqe(sqe).await;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                retries += 1;
                if retries < 8 {
                    continue;
                }
            }
            if res < 0 {
                return Err(std::io::Error::from_raw_os_error(-res).to_string());
            }
            if res == 0 {
                return Err("the socket took nothing".into());
            }
            first = advance(iov, first, res as usize);
        }
        Ok(())
    }

    async fn recv_loop(self: Rc<Self>) {
        // Freed below only once the loop has ended, which it does only between receives
        // (after one's completion was reaped). If instead this task is dropped with a receive
        // in flight (the thread's ring torn down at exit), the buffer stays leaked, so the
        // kernel never writes into freed memory.
        let raw: *mut [u8] = Box::into_raw(vec![0u8; RECV_BUF].into_boxed_slice());
        // SAFETY: raw is a live allocation nothing else refers to until it is freed below.
        let buf: &mut [u8] = unsafe { &mut *raw };
        let mut have = 0usize;
        let why = loop {
            if self.dead.get() {
                break None;
            }
            let rest = &mut buf[have..];
            let sqe =
                opcode::Recv::new(types::Fd(self.fd), rest.as_mut_ptr(), rest.len() as u32).build();
            let res = submit_sqe(sqe).await;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                continue;
            }
            if res == 0 {
                break Some("the target closed the connection".to_string());
            }
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                break Some(format!("reading from the target: {e}"));
            }
            have += res as usize;
            match self.take_replies(&buf[..have]) {
                Ok(used) => {
                    buf.copy_within(used..have, 0);
                    have -= used;
                }
                Err(why) => break Some(why),
            }
        };
        // SAFETY: every break above comes before a receive is submitted or after its
        // completion was reaped, so the kernel holds no pointer into the buffer, and `buf` is
        // not used again.
        drop(unsafe { Box::from_raw(raw) });
        if let Some(why) = why {
            if !self.mirror.stopped() {
                self.mirror
                    .fail(format!("connection {:?}: {why}", self.name()));
            }
        }
        self.fail_all();
    }

    /// Answers the requests the complete replies in `bytes` are for; returns the bytes used.
    /// Err: a reply breaks the protocol or reports an error, and the mirror must fail.
    fn take_replies(&self, bytes: &[u8]) -> Result<usize, String> {
        let mut used = 0usize;
        while bytes.len() - used >= SIMPLE_REPLY_LEN {
            let mut raw = [0u8; SIMPLE_REPLY_LEN];
            raw.copy_from_slice(&bytes[used..used + SIMPLE_REPLY_LEN]);
            used += SIMPLE_REPLY_LEN;
            let reply =
                SimpleReply::decode(&raw).map_err(|e| format!("target sent a bad reply: {e}"))?;
            let outcome = if reply.error == 0 {
                Outcome::Done
            } else {
                Outcome::Failed
            };
            if !self.answer(reply.cookie, outcome) {
                return Err(format!(
                    "target replied to unknown cookie {:#x}",
                    reply.cookie
                ));
            }
            if reply.error != 0 {
                return Err(format!("target answered NBD error {}", reply.error));
            }
        }
        Ok(used)
    }

    async fn tick_loop(self: Rc<Self>) {
        let Some(limit) = self.mirror.timeout else {
            return;
        };
        let tick = types::Timespec::from(TICK);
        loop {
            park(&self.ticker, || {
                self.dead.get() || !self.slots.borrow().is_empty()
            })
            .await;
            if self.dead.get() {
                return;
            }
            // -ETIME is the normal end of a timeout.
            let _ = submit_sqe(opcode::Timeout::new(&tick).build()).await;
            let oldest = self
                .slots
                .borrow()
                .values()
                .filter(|s| s.outcome.is_none())
                .map(|s| s.since)
                .min();
            if let Some(since) = oldest.filter(|s| s.elapsed() > limit) {
                self.mirror.fail(format!(
                    "a request waited {:.1} s for the target on connection {:?} (mirror \
                     timeout {} s)",
                    since.elapsed().as_secs_f64(),
                    self.name(),
                    limit.as_secs_f64()
                ));
            }
        }
    }
}

/// Moves past `n` sent bytes of `iov[first..]`; returns the new first unsent entry.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while first < iov.len() {
        let len = iov[first].iov_len;
        if n >= len {
            n -= len;
            first += 1;
        } else {
            // SAFETY: n < len, so the new base stays inside the same buffer.
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n) }.cast();
            iov[first].iov_len = len - n;
            break;
        }
    }
    first
}

/// Submits one SQE on this thread's ring and waits for its result (a negative errno on error).
async fn submit_sqe(sqe: squeue::Entry) -> i32 {
    ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .unwrap_or(-libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn a_short_send_resumes_at_the_first_unsent_byte() {
        let (a, b) = ([1u8; 28], [2u8; 100]);
        let mut iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: 28,
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: 100,
            },
        ];
        assert_eq!(advance(&mut iov, 0, 10), 0);
        assert_eq!(iov[0].iov_len, 18);
        assert_eq!(advance(&mut iov, 0, 18 + 50), 1);
        assert_eq!(iov[1].iov_len, 50);
        assert_eq!(iov[1].iov_base as usize, b.as_ptr() as usize + 50);
        assert_eq!(advance(&mut iov, 1, 50), 2);
    }
}
