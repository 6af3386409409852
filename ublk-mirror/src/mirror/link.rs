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
//! result and the range is marked out of sync), later writes go local-only, and the owner's
//! `on_failure` runs once (the daemon then empties the activity log as those writes end).

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::lock::lock;
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

impl MirrorOp {
    /// Bytes of the device the operation covers (0 for a flush).
    pub fn len(&self) -> u64 {
        match self {
            MirrorOp::Write { data, .. } => data.len() as u64,
            MirrorOp::Flush => 0,
            MirrorOp::WriteZeroes { len, .. } => u64::from(*len),
        }
    }
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
        if let Some(&fd) = self.doorbells.get(usize::from(qid)) {
            crate::doorbell::ring(fd);
        }
    }

    pub fn ring_all(&self) {
        for q in 0..self.doorbells.len() {
            self.ring(q as u16);
        }
    }

    fn deliver(&self, qid: u16, tag: u16, outcome: Outcome) {
        self.post(qid, tag, outcome);
        self.ring(qid);
    }

    /// Delivers without ringing: the caller rings the queue once for a batch.
    fn post(&self, qid: u16, tag: u16, outcome: Outcome) {
        if let Some(b) = self.boxes.get(usize::from(qid)) {
            b.push((tag, outcome));
        }
    }

    pub fn queues(&self) -> usize {
        self.doorbells.len()
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
    /// Run once, on the thread that failed the mirror, after every waiting operation was
    /// failed back; not on a clean stop.
    on_failure: Box<dyn Fn() + Send + Sync>,
}

impl Mirror {
    /// Starts the sender and receiver on a socket already in the transmission phase;
    /// `on_failure` runs once if the mirror fails.
    pub fn start(
        name: String,
        wire: Stream,
        export: Export,
        timeout: Option<Duration>,
        mail: Arc<Mailboxes>,
        on_failure: Box<dyn Fn() + Send + Sync>,
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
            on_failure,
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
        (self.on_failure)();
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
        // Everything queued when the sender wakes goes out in one writev: under load one
        // syscall carries many requests instead of two syscalls each.
        let mut batch: Vec<Job> = Vec::with_capacity(SEND_BATCH);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            let mut payload = 0usize;
            while batch.len() < SEND_BATCH && payload < SEND_BATCH_BYTES {
                let Ok(job) = rx.try_recv() else { break };
                if let MirrorOp::Write { data, .. } = &job.op {
                    payload += data.len();
                }
                batch.push(job);
            }
            let stop = batch.iter().any(|j| j.qid == STOP_MARKER);
            let mut headers: Vec<[u8; 28]> = Vec::with_capacity(batch.len() + 1);
            let mut datas: Vec<Option<&[u8]>> = Vec::with_capacity(batch.len() + 1);
            let (mut ops, mut bytes) = (0u64, 0u64);
            for job in batch.iter().filter(|j| j.qid != STOP_MARKER) {
                if !self.takes_io() {
                    self.finish(job.qid, job.tag, Outcome::Failed);
                    continue;
                }
                let frames = self.frames(&job.op, &zeros);
                // One job may need several NBD requests (FUA emulation, zeroes written out);
                // it completes when the last one is answered, so only the last carries it.
                let last = frames.len() - 1;
                let mut pending = lock(&self.pending);
                for (i, (mut h, data)) in frames.into_iter().enumerate() {
                    h.cookie = cookie;
                    cookie = cookie.wrapping_add(1).max(1);
                    let (qid, tag) = if i == last {
                        (job.qid, job.tag)
                    } else {
                        (INTERNAL, 0)
                    };
                    let sent = Instant::now();
                    pending.insert(h.cookie, Pending { qid, tag, sent });
                    headers.push(h.encode());
                    datas.push(data);
                }
                ops += 1;
                bytes += job.op.len();
            }
            if stop {
                let disc = RequestHeader {
                    flags: 0,
                    command: Command::Disc,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                headers.push(disc.encode());
                datas.push(None);
            }
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(headers.len() * 2);
            for (h, d) in headers.iter().zip(&datas) {
                slices.push(IoSlice::new(h));
                if let Some(d) = d {
                    slices.push(IoSlice::new(d));
                }
            }
            if let Err(err) = write_all_vectored(&mut w, &mut slices) {
                if !stop {
                    self.fail(format!("sending to the target: {err}"));
                }
            } else {
                self.ops.fetch_add(ops, Ordering::Relaxed);
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            drop(slices);
            batch.clear();
            if stop {
                return;
            }
        }
    }

    /// The NBD requests (cookie still 0) that carry out one operation on this export.
    fn frames<'a>(
        &self,
        op: &'a MirrorOp,
        zeros: &'a [u8],
    ) -> Vec<(RequestHeader, Option<&'a [u8]>)> {
        let e = &self.export;
        let hdr = |command, flags, offset, length| RequestHeader {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        };
        let mut frames = Vec::with_capacity(2);
        match op {
            MirrorOp::Write { offset, data, fua } => {
                let native_fua = *fua && e.has(tx_flags::SEND_FUA);
                let flags = if native_fua { cmd_flags::FUA } else { 0 };
                frames.push((
                    hdr(Command::Write, flags, *offset, data.len() as u32),
                    Some(&data[..]),
                ));
                if *fua && !native_fua {
                    frames.push((hdr(Command::Flush, 0, 0, 0), None));
                }
            }
            MirrorOp::Flush => frames.push((hdr(Command::Flush, 0, 0, 0), None)),
            MirrorOp::WriteZeroes { offset, len } => {
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
        frames
    }

    fn recv_loop(self: Arc<Self>, mut r: Stream) {
        let tick = Duration::from_millis(100);
        let _ = r.set_read_timeout(Some(tick));
        // Replies are 16 bytes: one read takes every reply that has arrived, and each queue's
        // doorbell rings once per read rather than once per reply.
        let mut buf = vec![0u8; 16 * 1024];
        let mut have = 0usize;
        let mut rung = vec![false; self.mail.queues()];
        let mut last_check = Instant::now();
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
            let mut used = 0usize;
            let mut bad = None;
            while have - used >= 16 {
                match self.complete_reply(&buf[used..used + 16], &mut rung) {
                    Ok(()) => used += 16,
                    Err(why) => {
                        bad = Some(why);
                        break;
                    }
                }
            }
            buf.copy_within(used..have, 0);
            have -= used;
            for (q, r) in rung.iter_mut().enumerate() {
                if std::mem::take(r) {
                    self.mail.ring(q as u16);
                }
            }
            if let Some(why) = bad {
                self.fail(why);
                return;
            }
            if let Some(t) = self.timeout {
                if last_check.elapsed() >= tick {
                    last_check = Instant::now();
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

    /// Completes the request one 16-byte simple reply answers; marks its queue's doorbell to
    /// ring. Err: the reply breaks the protocol or reports an error, and the mirror must fail.
    fn complete_reply(&self, bytes: &[u8], rung: &mut [bool]) -> Result<(), String> {
        let mut raw = [0u8; 16];
        raw.copy_from_slice(bytes);
        let reply =
            SimpleReply::decode(&raw).map_err(|e| format!("target sent a bad reply: {e}"))?;
        let p = lock(&self.pending)
            .remove(&reply.cookie)
            .ok_or_else(|| format!("target replied to unknown cookie {:#x}", reply.cookie))?;
        if reply.error != 0 {
            if p.qid != INTERNAL {
                self.finish(p.qid, p.tag, Outcome::Failed);
            }
            return Err(format!("target answered NBD error {}", reply.error));
        }
        if p.qid != INTERNAL {
            self.jobs.fetch_sub(1, Ordering::SeqCst);
            self.mail.post(p.qid, p.tag, Outcome::Done);
            if let Some(r) = rung.get_mut(usize::from(p.qid)) {
                *r = true;
            }
        }
        Ok(())
    }
}

/// Largest batch of jobs the sender writes in one syscall, and its payload bound.
const SEND_BATCH: usize = 64;
const SEND_BATCH_BYTES: usize = 4 << 20;

/// write_all for a vector of slices (std's write_all_vectored is unstable).
fn write_all_vectored(w: &mut Stream, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A hostile or broken target: whatever it sends, the mirror fails with a reason, every
/// request handed to it comes back Failed, nothing panics, and a silent one is given up on at
/// the timeout.
#[cfg(test)]
mod tests;
