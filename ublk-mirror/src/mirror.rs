//! The mirror leg: one NBD connection to the migration target, shared by every queue.
//!
//! Design (multi-queue, one connection): the socket is owned by two threads, a sender and a
//! receiver. A queue hands an operation to the sender through a lock-free channel and later
//! finds the outcome in its own lock-free mailbox, woken by its doorbell eventfd, so a queue's
//! I/O path takes no lock to use the mirror. The sender writes requests in the order queues
//! hand them over; the receiver matches replies by cookie, in any order.
//!
//! Failure (an NBD error reply, EOF, a socket error, or a request older than the mirror
//! timeout) is final for this connection: `nbd_mirror_failed` is set, the socket is shut down,
//! every operation waiting on the target completes as `Failed` (the guest gets the local
//! result and the range is marked out of sync), and later writes go local-only.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::shared::lock;
use crossbeam_queue::SegQueue;
use nbd_proxy::address::Stream;
use nbd_proxy::client::Export;
use nbd_proxy::proto::{cmd_flags, tx_flags, Command, RequestHeader, SimpleReply};

/// What a queue asks of the target.
#[derive(Debug)]
pub enum MirrorOp {
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    /// Discards are sent as zeroes too: the local leg reads back zeros after a discard.
    WriteZeroes {
        offset: u64,
        len: u32,
    },
}

/// How the mirror leg of one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The target does not have this request: the caller marks its range out of sync.
    Failed,
}

/// Per-queue doorbells and completion mailboxes.
pub struct Mailboxes {
    doorbells: Vec<RawFd>,
    boxes: Vec<SegQueue<(u16, Outcome)>>,
}

impl Mailboxes {
    pub fn new(doorbells: Vec<RawFd>) -> Mailboxes {
        let boxes = doorbells.iter().map(|_| SegQueue::new()).collect();
        Mailboxes { doorbells, boxes }
    }

    pub fn ring(&self, qid: u16) {
        let one = 1u64.to_ne_bytes();
        if let Some(&fd) = self.doorbells.get(usize::from(qid)) {
            // SAFETY: writes 8 bytes from a live buffer to an eventfd that lives as long as
            // the daemon. A full counter (EAGAIN) already means "ring".
            let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        }
    }

    pub fn ring_all(&self) {
        for q in 0..self.doorbells.len() {
            self.ring(q as u16);
        }
    }

    fn deliver(&self, qid: u16, tag: u16, outcome: Outcome) {
        if let Some(b) = self.boxes.get(usize::from(qid)) {
            b.push((tag, outcome));
            self.ring(qid);
        }
    }

    /// The outcomes delivered to queue `qid` since the last call.
    pub fn take(&self, qid: u16) -> Vec<(u16, Outcome)> {
        let mut v = Vec::new();
        if let Some(b) = self.boxes.get(usize::from(qid)) {
            while let Some(x) = b.pop() {
                v.push(x);
            }
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MirrorState {
    /// Published; waiting for writes that started local-only to finish.
    Connecting = 1,
    Active = 2,
    Failed = 3,
    Stopping = 4,
}

impl MirrorState {
    pub fn name(self) -> &'static str {
        match self {
            MirrorState::Connecting => "connecting",
            MirrorState::Active => "active",
            MirrorState::Failed => "failed",
            MirrorState::Stopping => "stopping",
        }
    }
}

/// A job's qid that tells the sender to disconnect.
const STOP_MARKER: u16 = u16::MAX;
/// The qid of NBD requests that are an internal part of a job (FUA emulation, zero writes).
const INTERNAL: u16 = u16::MAX - 1;

struct Job {
    qid: u16,
    tag: u16,
    op: MirrorOp,
}

struct Pending {
    qid: u16,
    tag: u16,
    sent: Instant,
}

pub struct Mirror {
    pub name: String,
    pub export: Export,
    /// None: wait forever (like tapdisk).
    pub timeout: Option<Duration>,
    state: AtomicU8,
    tx: Sender<Job>,
    wire: Stream,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Jobs handed over and not yet answered (includes queued ones).
    jobs: AtomicU64,
    failure: Mutex<Option<(String, SystemTime)>>,
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    mail: Arc<Mailboxes>,
    stopped: AtomicBool,
}

impl Mirror {
    /// Starts the sender and receiver on a socket already in the transmission phase.
    pub fn start(
        name: String,
        wire: Stream,
        export: Export,
        timeout: Option<Duration>,
        mail: Arc<Mailboxes>,
    ) -> std::io::Result<Arc<Mirror>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader = wire.try_clone()?;
        let writer = wire.try_clone()?;
        let m = Arc::new(Mirror {
            name,
            export,
            timeout,
            state: AtomicU8::new(MirrorState::Connecting as u8),
            tx,
            wire,
            pending: Mutex::new(HashMap::new()),
            jobs: AtomicU64::new(0),
            failure: Mutex::new(None),
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            mail,
            stopped: AtomicBool::new(false),
        });
        let (ms, mr) = (m.clone(), m.clone());
        std::thread::Builder::new()
            .name("mirror-send".into())
            .spawn(move || ms.send_loop(rx, writer))?;
        std::thread::Builder::new()
            .name("mirror-recv".into())
            .spawn(move || mr.recv_loop(reader))?;
        Ok(m)
    }

    pub fn state(&self) -> MirrorState {
        match self.state.load(Ordering::SeqCst) {
            1 => MirrorState::Connecting,
            2 => MirrorState::Active,
            3 => MirrorState::Failed,
            _ => MirrorState::Stopping,
        }
    }

    pub fn set_active(&self) {
        let _ = self.state.compare_exchange(
            MirrorState::Connecting as u8,
            MirrorState::Active as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Whether new requests should go to the target.
    pub fn takes_io(&self) -> bool {
        matches!(self.state(), MirrorState::Connecting | MirrorState::Active)
    }

    pub fn failed(&self) -> bool {
        self.state() == MirrorState::Failed
    }

    pub fn failure(&self) -> Option<(String, SystemTime)> {
        lock(&self.failure).clone()
    }

    pub fn in_flight(&self) -> u64 {
        self.jobs.load(Ordering::SeqCst)
    }

    /// Hands an operation to the target for queue `qid`'s tag `tag`; its outcome arrives in the
    /// queue's mailbox. Never blocks.
    pub fn submit(&self, qid: u16, tag: u16, op: MirrorOp) {
        self.jobs.fetch_add(1, Ordering::SeqCst);
        if !self.takes_io() {
            self.finish(qid, tag, Outcome::Failed);
            return;
        }
        if let Err(e) = self.tx.send(Job { qid, tag, op }) {
            let j = e.into_inner();
            self.finish(j.qid, j.tag, Outcome::Failed);
        }
    }

    fn finish(&self, qid: u16, tag: u16, outcome: Outcome) {
        self.jobs.fetch_sub(1, Ordering::SeqCst);
        self.mail.deliver(qid, tag, outcome);
    }

    /// Fails the mirror for good; every waiting operation completes as Failed.
    pub fn fail(&self, reason: String) {
        let prev = self.state.swap(MirrorState::Failed as u8, Ordering::SeqCst);
        if prev == MirrorState::Failed as u8 {
            return;
        }
        if prev == MirrorState::Stopping as u8 && self.stopped.load(Ordering::SeqCst) {
            // A clean stop closing the socket is not a failure.
            self.state.store(prev, Ordering::SeqCst);
            return;
        }
        log::error!(
            "mirror {:?} failed: {reason}; continuing local-only",
            self.name
        );
        *lock(&self.failure) = Some((reason, SystemTime::now()));
        let _ = self.wire.shutdown(Shutdown::Both);
        self.fail_pending();
    }

    fn fail_pending(&self) {
        let drained: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        for p in drained.into_iter().filter(|p| p.qid != INTERNAL) {
            self.finish(p.qid, p.tag, Outcome::Failed);
        }
    }

    /// Clean end: stop taking requests, wait for those in flight (up to `timeout`), disconnect.
    pub fn stop(&self, timeout: Duration) {
        if self.state() != MirrorState::Failed {
            self.state
                .store(MirrorState::Stopping as u8, Ordering::SeqCst);
        }
        let start = Instant::now();
        while self.in_flight() > 0 && start.elapsed() < timeout && !self.failed() {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stopped.store(true, Ordering::SeqCst);
        if !self.failed() {
            // After everything already handed over: the sender says NBD_CMD_DISC and ends.
            let _ = self.tx.send(Job {
                qid: STOP_MARKER,
                tag: 0,
                op: MirrorOp::Flush,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
        let _ = self.wire.shutdown(Shutdown::Both);
        self.fail_pending();
    }

    fn send_loop(self: Arc<Self>, rx: Receiver<Job>, mut w: Stream) {
        let mut cookie: u64 = 1;
        let zeros = vec![0u8; 1 << 20];
        for job in rx {
            if job.qid == STOP_MARKER {
                let disc = RequestHeader {
                    flags: 0,
                    command: Command::Disc,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                let _ = w.write_all(&disc.encode());
                return;
            }
            if !self.takes_io() {
                self.finish(job.qid, job.tag, Outcome::Failed);
                continue;
            }
            let e = &self.export;
            let mut frames: Vec<(RequestHeader, Option<&[u8]>)> = Vec::with_capacity(2);
            let hdr = |command, flags, offset, length| RequestHeader {
                flags,
                command,
                cookie: 0,
                offset,
                length,
            };
            let bytes;
            match &job.op {
                MirrorOp::Write { offset, data, fua } => {
                    bytes = data.len() as u64;
                    let native_fua = *fua && e.has(tx_flags::SEND_FUA);
                    let flags = if native_fua { cmd_flags::FUA } else { 0 };
                    frames.push((
                        hdr(Command::Write, flags, *offset, data.len() as u32),
                        Some(data),
                    ));
                    if *fua && !native_fua {
                        frames.push((hdr(Command::Flush, 0, 0, 0), None));
                    }
                }
                MirrorOp::Flush => {
                    bytes = 0;
                    frames.push((hdr(Command::Flush, 0, 0, 0), None));
                }
                MirrorOp::WriteZeroes { offset, len } => {
                    bytes = u64::from(*len);
                    if e.has(tx_flags::SEND_WRITE_ZEROES) {
                        frames.push((hdr(Command::WriteZeroes, 0, *offset, *len), None));
                    } else {
                        let mut done = 0u64;
                        while done < u64::from(*len) {
                            let n = (u64::from(*len) - done).min(zeros.len() as u64) as u32;
                            frames.push((
                                hdr(Command::Write, 0, offset + done, n),
                                Some(&zeros[..n as usize]),
                            ));
                            done += u64::from(n);
                        }
                    }
                }
            }
            // One job may need several NBD requests (FUA emulation, zeroes written out); the
            // job completes when the last one is answered, so only the last carries its cookie.
            let last = frames.len() - 1;
            let mut failed = false;
            for (i, (mut h, data)) in frames.into_iter().enumerate() {
                h.cookie = cookie;
                cookie = cookie.wrapping_add(1).max(1);
                let (qid, tag) = if i == last {
                    (job.qid, job.tag)
                } else {
                    (INTERNAL, 0)
                };
                lock(&self.pending).insert(
                    h.cookie,
                    Pending {
                        qid,
                        tag,
                        sent: Instant::now(),
                    },
                );
                let sent = w
                    .write_all(&h.encode())
                    .and_then(|()| data.map_or(Ok(()), |d| w.write_all(d)));
                if let Err(err) = sent {
                    self.fail(format!("sending to the target: {err}"));
                    failed = true;
                    break;
                }
            }
            if !failed {
                self.ops.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }

    fn recv_loop(self: Arc<Self>, mut r: Stream) {
        let tick = Duration::from_millis(100);
        let _ = r.set_read_timeout(Some(tick));
        let mut buf = [0u8; 16];
        let mut have = 0usize;
        loop {
            match r.read(&mut buf[have..]) {
                Ok(0) => {
                    if !self.stopped.load(Ordering::SeqCst) {
                        self.fail("the target closed the connection".into());
                    }
                    return;
                }
                Ok(n) => have += n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !self.stopped.load(Ordering::SeqCst) {
                        self.fail(format!("reading from the target: {e}"));
                    }
                    return;
                }
            }
            if self.failed() {
                return;
            }
            if have == buf.len() {
                have = 0;
                let reply = match SimpleReply::decode(&buf) {
                    Ok(rep) => rep,
                    Err(e) => {
                        self.fail(format!("target sent a bad reply: {e}"));
                        return;
                    }
                };
                let p = lock(&self.pending).remove(&reply.cookie);
                let Some(p) = p else {
                    self.fail(format!(
                        "target replied to unknown cookie {:#x}",
                        reply.cookie
                    ));
                    return;
                };
                if reply.error != 0 {
                    self.fail(format!("target answered NBD error {}", reply.error));
                    if p.qid != INTERNAL {
                        self.finish(p.qid, p.tag, Outcome::Failed);
                    }
                    return;
                }
                if p.qid != INTERNAL {
                    self.finish(p.qid, p.tag, Outcome::Done);
                }
            }
            if let Some(t) = self.timeout {
                let oldest = lock(&self.pending).values().map(|p| p.sent).min();
                if let Some(sent) = oldest {
                    if sent.elapsed() > t {
                        self.fail(format!(
                            "a request waited {:.1} s for the target (mirror timeout {} s)",
                            sent.elapsed().as_secs_f64(),
                            t.as_secs_f64()
                        ));
                        return;
                    }
                }
            }
        }
    }
}
