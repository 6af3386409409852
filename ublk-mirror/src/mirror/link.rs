//! The mirror leg's shared half: one mirror to an NBD target over one or more connections,
//! and what every thread sees of it (state, failure, counters, the forwarding inboxes).
//!
//! Design (issue 13): there are no mirror threads. Connection `c` is driven on the io_uring of
//! queue `c` (`ring_conn.rs`): that queue sends its own requests straight from the tags'
//! buffers and receives the replies on its ring, each reply waking exactly the task it
//! answers. With as many connections as queues, every queue owns one and the common path
//! crosses no thread. Anyone without a connection of its own (a queue numbered at or above the
//! number of connections, as with tapdisk's and xapi's single socket on a 2-queue device, and
//! the copy workers) *forwards*: it copies the operation into the owner's inbox and rings the
//! owner's doorbell (one hop); the owner sends it on its ring and the outcome comes back in the
//! forwarder's mailbox, waking only the tag it belongs to. Submitter `s` forwards to connection
//! `s % connections`.
//!
//! Failure (an NBD error reply, EOF, a socket error, or a request older than the mirror
//! timeout, on any connection) is final for the whole mirror: `nbd_mirror_failed` is set, every
//! connection is shut down (which completes every receive and send in flight on the rings),
//! every waiting operation completes as `Failed` (the guest gets the local result and the range
//! is marked out of sync), later writes go local-only, and the owner's `on_failure` runs once.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::SegQueue;
use nbd_proxy::client::Export;
use nbd_proxy::proto::{Command, RequestHeader};

use crate::atomic_state::{u8_state, AtomicState};
use crate::lock::lock;

/// What a submitter asks of the target, owning its data: the form a forwarded operation
/// travels in (the owner's ring sends from it).
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
    /// The same operation, borrowed, as the ring connection takes it.
    pub fn as_leg_op(&self) -> LegOp<'_> {
        match self {
            MirrorOp::Write { offset, data, fua } => LegOp::Write {
                offset: *offset,
                data,
                fua: *fua,
            },
            MirrorOp::Flush => LegOp::Flush,
            MirrorOp::WriteZeroes { offset, len } => LegOp::WriteZeroes {
                offset: *offset,
                len: *len,
            },
        }
    }
}

/// What the target must do for one request, borrowing the data from the tag's own buffer.
#[derive(Debug, Clone, Copy)]
pub enum LegOp<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u32,
    },
}

impl LegOp<'_> {
    /// Bytes of the device the operation covers (0 for a flush).
    pub fn len(&self) -> u64 {
        match self {
            LegOp::Write { data, .. } => data.len() as u64,
            LegOp::Flush => 0,
            LegOp::WriteZeroes { len, .. } => u64::from(*len),
        }
    }

    /// The owned form, for forwarding to another thread (copies the data).
    pub fn to_owned_op(self) -> MirrorOp {
        match self {
            LegOp::Write { offset, data, fua } => MirrorOp::Write {
                offset,
                data: data.to_vec(),
                fua,
            },
            LegOp::Flush => MirrorOp::Flush,
            LegOp::WriteZeroes { offset, len } => MirrorOp::WriteZeroes { offset, len },
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

/// Per-submitter doorbells and mailboxes for forwarded operations' outcomes (and, for every
/// queue, the doorbell that wakes its parked requests and tells an owner that its inbox
/// holds work).
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
        if let Some(b) = self.boxes.get(usize::from(qid)) {
            b.push((tag, outcome));
        }
        self.ring(qid);
    }

    /// The outcomes delivered to `qid` since the last call.
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

u8_state! {
    /// Where an attached mirror is in its life.
    pub enum MirrorState {
        /// Published; waiting for writes that started local-only to finish.
        Connecting = 1 => "connecting",
        Active = 2 => "active",
        Failed = 3 => "failed",
        Stopping = 4 => "stopping",
    }
}

/// An operation forwarded to a connection's owner, and where its outcome goes.
pub struct Forwarded {
    pub reply_to: u16,
    pub tag: u16,
    pub op: MirrorOp,
}

/// Which connection a submitter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The submitter is queue `c` and drives connection `c` on its own ring.
    Own(usize),
    /// Forward to connection `c`, driven by queue `c`.
    Forward(usize),
}

/// One connection to the target: its socket and the inbox of operations forwarded to it.
pub struct Connection {
    pub name: String,
    fd: OwnedFd,
    inbox: SegQueue<Forwarded>,
    /// Its owner's queue has stopped: nothing will send what is forwarded to it any more.
    orphaned: AtomicBool,
}

impl Connection {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Distinguishes mirrors, so a queue can tell that the one in the slot is a new one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

pub struct Mirror {
    /// The name of the first connection's stored fd (what `stats` calls `target`).
    pub name: String,
    pub export: Export,
    /// None: wait forever (like tapdisk).
    pub timeout: Option<Duration>,
    pub generation: u64,
    conns: Vec<Connection>,
    state: AtomicState<MirrorState>,
    /// Operations handed to the target and not yet answered (forwarded ones included).
    jobs: AtomicU64,
    failure: Mutex<Option<(String, SystemTime)>>,
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    mail: Arc<Mailboxes>,
    /// Set by a clean stop before it closes the connections: their EOF is no failure.
    stopped: AtomicBool,
    /// Run once, on the thread that failed the mirror; not on a clean stop.
    on_failure: Box<dyn Fn() + Send + Sync>,
}

impl Mirror {
    /// A mirror over `conns` (name, socket in the transmission phase), all to `export`. The
    /// connections are driven by the queues' rings from their first use.
    pub fn new(
        conns: Vec<(String, OwnedFd)>,
        export: Export,
        timeout: Option<Duration>,
        mail: Arc<Mailboxes>,
        on_failure: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Mirror> {
        let name = conns.first().map(|c| c.0.clone()).unwrap_or_default();
        let conns = conns
            .into_iter()
            .map(|(name, fd)| Connection {
                name,
                fd,
                inbox: SegQueue::new(),
                orphaned: AtomicBool::new(false),
            })
            .collect();
        Arc::new(Mirror {
            name,
            export,
            timeout,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            conns,
            state: AtomicState::new(MirrorState::Connecting),
            jobs: AtomicU64::new(0),
            failure: Mutex::new(None),
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            mail,
            stopped: AtomicBool::new(false),
            on_failure,
        })
    }

    pub fn connections(&self) -> &[Connection] {
        &self.conns
    }

    pub fn names(&self) -> Vec<String> {
        self.conns.iter().map(|c| c.name.clone()).collect()
    }

    /// The connection submitter `who` (a queue, or a copy worker's slot after the queues)
    /// uses.
    pub fn route(&self, who: u16) -> Route {
        if usize::from(who) < self.conns.len() {
            Route::Own(usize::from(who))
        } else {
            Route::Forward(self.forward_conn(who))
        }
        // Copy workers, whose slots come after every queue's, always forward: a guest write
        // waits on the wire behind at most their chunks in flight (copy::WORKERS of them).
    }

    /// The connection a forwarder `who` (no connection of its own) sends through.
    pub fn forward_conn(&self, who: u16) -> usize {
        usize::from(who) % self.conns.len().max(1)
    }

    pub fn state(&self) -> MirrorState {
        self.state.load()
    }

    pub fn set_active(&self) {
        self.state
            .transition(MirrorState::Connecting, MirrorState::Active);
    }

    /// Whether new requests should go to the target.
    pub fn takes_io(&self) -> bool {
        matches!(self.state(), MirrorState::Connecting | MirrorState::Active)
    }

    pub fn failed(&self) -> bool {
        self.state() == MirrorState::Failed
    }

    /// Set once a clean stop closes the connections.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn failure(&self) -> Option<(String, SystemTime)> {
        lock(&self.failure).clone()
    }

    pub fn in_flight(&self) -> u64 {
        self.jobs.load(Ordering::SeqCst)
    }

    /// Counts an operation as handed to the target; false (not counted) if the mirror no
    /// longer takes requests. Counting first, then looking, pairs with `stop`: it sets
    /// Stopping, then waits for the count to drain.
    pub fn begin_job(&self) -> bool {
        self.jobs.fetch_add(1, Ordering::SeqCst);
        if self.takes_io() {
            return true;
        }
        self.jobs.fetch_sub(1, Ordering::SeqCst);
        false
    }

    pub fn end_job(&self) {
        self.jobs.fetch_sub(1, Ordering::SeqCst);
    }

    /// Counts what the target has taken.
    pub fn count_done(&self, bytes: u64) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Forwards `op` for submitter `reply_to` (its tag `tag`) to the owner of connection
    /// `conn`; the outcome arrives in `reply_to`'s mailbox. Never blocks.
    pub fn forward(&self, conn: usize, reply_to: u16, tag: u16, op: MirrorOp) {
        if !self.begin_job() {
            self.mail.deliver(reply_to, tag, Outcome::Failed);
            return;
        }
        let Some(c) = self.conns.get(conn) else {
            self.finish_forwarded(reply_to, tag, Outcome::Failed);
            return;
        };
        c.inbox.push(Forwarded { reply_to, tag, op });
        self.mail.ring(conn as u16);
        // A failure, a stop or the owner's end that drained the inbox just before the push
        // must not strand it (each sets its flag, then drains: SeqCst both sides).
        if !self.takes_io() || c.orphaned.load(Ordering::SeqCst) {
            self.drain_inboxes();
        }
    }

    /// The owner of connection `conn` has stopped (the device is going away): what is
    /// forwarded to it from now on, and what waits in its inbox, comes back Failed at once,
    /// so a copy worker does not wait for a queue that is gone.
    pub fn orphan(&self, conn: usize) {
        if let Some(c) = self.conns.get(conn) {
            c.orphaned.store(true, Ordering::SeqCst);
            while let Some(f) = c.inbox.pop() {
                self.finish_forwarded(f.reply_to, f.tag, Outcome::Failed);
            }
        }
    }

    /// The next operation forwarded to connection `conn` (called by its owner).
    pub fn take_forwarded(&self, conn: usize) -> Option<Forwarded> {
        self.conns.get(conn).and_then(|c| c.inbox.pop())
    }

    /// Delivers a forwarded operation's outcome (called by the owner when it is answered).
    pub fn finish_forwarded(&self, reply_to: u16, tag: u16, outcome: Outcome) {
        self.end_job();
        self.mail.deliver(reply_to, tag, outcome);
    }

    /// Fails back every forwarded operation no owner has taken yet.
    fn drain_inboxes(&self) {
        for c in &self.conns {
            while let Some(f) = c.inbox.pop() {
                self.finish_forwarded(f.reply_to, f.tag, Outcome::Failed);
            }
        }
    }

    /// Fails the mirror for good: every connection is shut down, so every ring driving one
    /// sees its receive end and fails back what waits on it; forwarded operations not yet
    /// taken come back Failed.
    pub fn fail(&self, reason: String) {
        let prev = self.state.swap(MirrorState::Failed);
        if prev == MirrorState::Failed {
            return;
        }
        if prev == MirrorState::Stopping && self.stopped() {
            // A clean stop closing the connections is not a failure.
            self.state.store(prev);
            return;
        }
        log::error!(
            "mirror {:?} failed: {reason}; continuing local-only",
            self.name
        );
        *lock(&self.failure) = Some((reason, SystemTime::now()));
        self.shutdown_all();
        self.drain_inboxes();
        // Owners parked with nothing to send must notice (their rings see EOF anyway).
        self.mail.ring_all();
        (self.on_failure)();
    }

    fn shutdown_all(&self) {
        for c in &self.conns {
            // SAFETY: shutdown on a socket fd we own; it only changes the socket's state.
            unsafe { libc::shutdown(c.raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Clean end: stop taking requests, wait for those in flight (up to `timeout`), say
    /// NBD_CMD_DISC on every connection, and close them. What is still in flight then comes
    /// back Failed.
    pub fn stop(&self, timeout: Duration) {
        if self.state() != MirrorState::Failed {
            self.state.store(MirrorState::Stopping);
        }
        let start = Instant::now();
        while self.in_flight() > 0 && start.elapsed() < timeout && !self.failed() {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stopped.store(true, Ordering::SeqCst);
        if !self.failed() && self.in_flight() == 0 {
            // Nothing in flight: no ring is sending, so this write cannot interleave.
            let disc = RequestHeader {
                flags: 0,
                command: Command::Disc,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode();
            for c in &self.conns {
                // SAFETY: sends 28 bytes from a live buffer on a socket we own.
                let _ = unsafe {
                    libc::send(
                        c.raw_fd(),
                        disc.as_ptr().cast(),
                        disc.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
            }
        }
        self.shutdown_all();
        self.drain_inboxes();
        self.mail.ring_all();
    }
}

/// A hostile or broken target: whatever it sends, the mirror fails with a reason, every
/// request handed to it comes back Failed, nothing panics, and a silent one is given up on at
/// the timeout.
#[cfg(test)]
mod tests;
