//! Background copy and resync: bring the target up to date with what the mirror did not carry.
//!
//! Both are one algorithm over the out-of-sync bitmap: a full copy (`--copy`) first marks the
//! whole device out of sync, a resync (`--resync`) takes the bitmap as it is (what changed since
//! a failure, plus whatever an earlier copy had not reached). Workers take the dirty extents in
//! chunks; for each chunk a worker counts itself as outstanding (so a pause waits for it), takes
//! the chunk's place in the range lock (so it is ordered with guest writes to the same range:
//! the target never ends stale), reads the chunk locally (a hole, found with SEEK_DATA, is sent
//! as WRITE_ZEROES, never skipped: the target may not be zero), forwards it to the queue that
//! owns connection `worker slot % connections` (`link.rs`) and waits for the answer, and only then clears the chunk's granules. A chunk the target did not
//! take leaves its bits set, so a later resync still copies it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::atomic_state::{u8_state, AtomicState};
use crate::datapath::io_path::IoPath;
use crate::lock::lock;
use crate::mirror::link::{Mirror, MirrorOp, Outcome};

/// Copy workers, i.e. chunks in flight.
pub const WORKERS: u16 = 4;
pub const DEFAULT_CHUNK: u64 = 1 << 20;

u8_state! {
    /// Where a copy or resync job is.
    pub enum CopyState {
        Copying = 1 => "copying",
        /// Every byte copied and all new writes mirrored ("actively synced").
        Ready = 2 => "ready",
        Failed = 3 => "failed",
        Cancelled = 4 => "cancelled",
    }
}

/// What a copy job brings over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Everything (`--copy`).
    Copy,
    /// What the out-of-sync map holds (`--resync`).
    Resync,
}

impl CopyKind {
    pub fn name(self) -> &'static str {
        match self {
            CopyKind::Copy => "copy",
            CopyKind::Resync => "resync",
        }
    }
}

impl std::fmt::Display for CopyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub struct CopyJob {
    pub kind: CopyKind,
    state: AtomicState<CopyState>,
    pub bytes_total: u64,
    bytes_done: AtomicU64,
    /// Bytes per second, 0 for no limit; `mirror-set-speed` changes it while the job runs.
    speed: AtomicU64,
    /// Bytes of the chunks workers have taken (done or in flight): what the rate limit paces,
    /// so four workers starting at once do not make a burst.
    bytes_taken: AtomicU64,
    /// The rate limit counts from here: (when, bytes_taken then). Reset by a speed change and
    /// a resume, so neither makes up for time gone by with a burst.
    pace_from: Mutex<(Instant, u64)>,
    /// Held by `mirror-copy-pause`: workers take no new chunk (the guest is not paused).
    paused: AtomicBool,
    /// `--target-is-zero`: the target reads zeros, so holes are not sent.
    pub target_is_zero: bool,
    started: Instant,
    /// Nanoseconds from `started` to the end (ready, failed or cancelled); 0 while copying, so
    /// `elapsed` and `rate` stop moving once the copy is over.
    ended_ns: AtomicU64,
    cancel: AtomicBool,
    /// (time, bytes_done) samples for the current rate.
    samples: Mutex<Vec<(Instant, u64)>>,
}

impl CopyJob {
    pub fn state(&self) -> CopyState {
        self.state.load()
    }

    pub fn bytes_done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
    }

    /// The rate limit in bytes per second (None: no limit).
    pub fn speed(&self) -> Option<u64> {
        Some(self.speed.load(Ordering::Relaxed)).filter(|&s| s > 0)
    }

    /// Changes the rate limit from now on (None or 0: no limit).
    pub fn set_speed(&self, speed: Option<u64>) {
        self.speed.store(speed.unwrap_or(0), Ordering::Relaxed);
        self.repace();
        log::info!(
            "{}: speed {}",
            self.kind,
            speed
                .filter(|&s| s > 0)
                .map_or("unlimited".into(), |s| format!("{s} bytes/s"))
        );
    }

    /// Holds (true) or releases (false) the workers; chunks in flight finish. False if the job
    /// was already so.
    pub fn set_paused(&self, paused: bool) -> bool {
        let changed = self.paused.swap(paused, Ordering::SeqCst) != paused;
        if changed {
            if !paused {
                self.repace();
            }
            log::info!(
                "{}: {} at {} of {} bytes",
                self.kind,
                if paused { "paused" } else { "resumed" },
                self.bytes_done(),
                self.bytes_total
            );
        }
        changed
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn repace(&self) {
        *lock(&self.pace_from) = (Instant::now(), self.bytes_taken.load(Ordering::SeqCst));
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.end(CopyState::Cancelled);
    }

    /// Moves a running copy to its final state (once) and freezes its clock.
    fn end(&self, state: CopyState) {
        if self.state.transition(CopyState::Copying, state) {
            let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.ended_ns.store(ns.max(1), Ordering::SeqCst);
        }
    }

    /// Bytes per second over the last few seconds (holes included).
    pub fn rate(&self) -> f64 {
        if self.state() != CopyState::Copying {
            return self.bytes_done() as f64 / self.elapsed().as_secs_f64().max(1e-3);
        }
        let now = Instant::now();
        let done = self.bytes_done();
        let mut s = lock(&self.samples);
        s.push((now, done));
        s.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(5));
        match s.first() {
            Some(&(t0, b0)) if now.duration_since(t0) > Duration::from_millis(200) => {
                (done - b0) as f64 / now.duration_since(t0).as_secs_f64()
            }
            _ => done as f64 / self.started.elapsed().as_secs_f64().max(1e-3),
        }
    }

    pub fn elapsed(&self) -> Duration {
        match self.ended_ns.load(Ordering::SeqCst) {
            0 => self.started.elapsed(),
            ns => Duration::from_nanos(ns),
        }
    }
}

/// How a copy job runs.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    pub speed: Option<u64>,
    /// Skip holes (only for a full copy to a target known to read zeros).
    pub target_is_zero: bool,
    /// Bytes per chunk (one NBD WRITE each).
    pub chunk: u64,
}

/// Starts copying what is out of sync to `mirror`, on `WORKERS` threads.
pub fn start(
    io: Arc<IoPath>,
    mirror: Arc<Mirror>,
    kind: CopyKind,
    opts: CopyOptions,
) -> Arc<CopyJob> {
    let (speed, chunk) = (opts.speed, opts.chunk);
    let chunks: Vec<(u64, u64)> = io
        .dirty
        .extents()
        .into_iter()
        .flat_map(|(off, len)| {
            (0..len.div_ceil(chunk)).map(move |i| (off + i * chunk, (len - i * chunk).min(chunk)))
        })
        .collect();
    let job = Arc::new(CopyJob {
        kind,
        state: AtomicState::new(CopyState::Copying),
        bytes_total: chunks.iter().map(|c| c.1).sum(),
        bytes_done: AtomicU64::new(0),
        bytes_taken: AtomicU64::new(0),
        speed: AtomicU64::new(speed.unwrap_or(0)),
        pace_from: Mutex::new((Instant::now(), 0)),
        paused: AtomicBool::new(false),
        target_is_zero: opts.target_is_zero,
        started: Instant::now(),
        ended_ns: AtomicU64::new(0),
        cancel: AtomicBool::new(false),
        samples: Mutex::new(Vec::new()),
    });
    log::info!(
        "{kind}: {} bytes in {} chunks to copy{}{}",
        job.bytes_total,
        chunks.len(),
        speed.map_or(String::new(), |s| format!(", at most {s} bytes/s")),
        if opts.target_is_zero {
            ", holes skipped (the target reads zeros)"
        } else {
            ""
        }
    );
    let chunks = Arc::new(chunks);
    let next = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(usize::from(WORKERS)));
    for worker_no in 0..WORKERS {
        let (io, mirror, job_of_worker, chunks, next, running) = (
            io.clone(),
            mirror.clone(),
            job.clone(),
            chunks.clone(),
            next.clone(),
            running.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("copy-{worker_no}"))
            .spawn(move || {
                worker(&io, &mirror, &job_of_worker, &chunks, &next, worker_no);
                if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                    finish(&io, &mirror, &job_of_worker);
                }
            });
        if let Err(e) = spawned {
            log::error!("{kind}: cannot start a copy worker: {e}");
            job.end(CopyState::Failed);
        }
    }
    job
}

fn finish(io: &IoPath, mirror: &Mirror, job: &CopyJob) {
    if job.state() != CopyState::Copying {
        log::warn!(
            "{}: ended {} after {} bytes",
            job.kind,
            job.state().name(),
            job.bytes_done()
        );
        return;
    }
    if mirror.takes_io() && io.dirty.dirty_bytes() == 0 {
        job.end(CopyState::Ready);
        log::info!(
            "{}: ready after {} bytes in {:.1} s: the target is actively synced",
            job.kind,
            job.bytes_done(),
            job.elapsed().as_secs_f64()
        );
    } else {
        job.end(CopyState::Failed);
        log::error!(
            "{}: not ready: mirror {}, {} bytes still out of sync",
            job.kind,
            mirror.state().name(),
            io.dirty.dirty_bytes()
        );
    }
}

fn worker(
    io: &IoPath,
    mirror: &Mirror,
    job: &CopyJob,
    chunks: &[(u64, u64)],
    next: &AtomicUsize,
    worker_no: u16,
) {
    // Its mailbox, doorbell and counter block come after every queue's.
    let slot = io.copy_slot(worker_no);
    let counters = io.stats.queue(usize::from(slot));
    // Page-aligned: the image may be open with O_DIRECT.
    let mut aligned = libublk::helpers::IoBuf::<u8>::new(
        chunks.iter().map(|c| c.1).max().unwrap_or(4096) as usize,
    );
    let buf = aligned.as_mut_slice();
    loop {
        let index = next.fetch_add(1, Ordering::SeqCst);
        let Some(&(off, len)) = chunks.get(index) else {
            return;
        };
        if !wait_while_paused(job, mirror) {
            return;
        }
        throttle(job, len);
        if !wait_while_paused(job, mirror) {
            return;
        }
        // Count first, then look at the gate (the pause handshake, as the queues do).
        // The chunk is outstanding until `in_flight` drops.
        let in_flight = loop {
            if let Some(started) = counters.try_start(|| io.gate_blocks_copy()) {
                break started;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let ticket = io.ranges.enqueue(off, len, slot);
        while !ticket.granted() {
            io.wait_doorbell(slot, Duration::from_millis(100));
        }
        let op = match read_chunk(io.image_raw_fd(), off, &mut buf[..len as usize]) {
            Ok(false) if job.target_is_zero => {
                // A hole on a target that reads zeros: nothing to send.
                release(io, &ticket);
                drop(in_flight);
                io.dirty.clear(off, len);
                job.bytes_done.fetch_add(len, Ordering::Relaxed);
                continue;
            }
            Ok(true) => MirrorOp::Write {
                offset: off,
                data: buf[..len as usize].to_vec(),
                fua: false,
            },
            Ok(false) => MirrorOp::WriteZeroes {
                offset: off,
                len: len as u32,
            },
            Err(e) => {
                log::error!("{}: reading the image at {off}: {e}", job.kind);
                job.end(CopyState::Failed);
                release(io, &ticket);
                return;
            }
        };
        mirror.forward(mirror.forward_conn(slot), slot, 0, op);
        let outcome = loop {
            if let Some((_, o)) = io.mail.take(slot).into_iter().next() {
                break o;
            }
            io.wait_doorbell(slot, Duration::from_millis(100));
        };
        release(io, &ticket);
        drop(in_flight);
        if outcome == Outcome::Failed {
            return;
        }
        io.dirty.clear(off, len);
        job.bytes_done.fetch_add(len, Ordering::Relaxed);
    }
}

fn release(io: &IoPath, ticket: &crate::mirror::range_lock::Ticket) {
    for q in io.ranges.release(ticket) {
        io.mail.ring(q);
    }
}

/// Waits while the job is paused; false when the worker should stop instead (cancelled, or
/// the mirror no longer takes writes).
fn wait_while_paused(job: &CopyJob, mirror: &Mirror) -> bool {
    loop {
        if job.cancel.load(Ordering::SeqCst) || !mirror.takes_io() {
            return false;
        }
        if !job.paused() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes `len` bytes for a chunk, then sleeps until the bytes taken before it since the last
/// speed change fit the rate limit (in steps of at most 100 ms, so a speed change or a pause
/// takes effect soon).
fn throttle(job: &CopyJob, len: u64) {
    let before = job.bytes_taken.fetch_add(len, Ordering::SeqCst);
    loop {
        let Some(speed) = job.speed() else {
            return;
        };
        let (since, base) = *lock(&job.pace_from);
        let taken = before.saturating_sub(base);
        let allowed_at = Duration::from_secs_f64(taken as f64 / speed as f64);
        let elapsed = since.elapsed();
        if allowed_at <= elapsed || job.paused() || job.cancel.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep((allowed_at - elapsed).min(Duration::from_millis(100)));
    }
}

/// Reads a chunk; Ok(false) when it is entirely a hole (nothing read: send zeroes).
fn read_chunk(fd: RawFd, off: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    // SAFETY: lseek on an fd with integer arguments only.
    let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `off` (a hole to the end).
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(false);
        }
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    } else if data as u64 >= off + buf.len() as u64 {
        return Ok(false);
    }
    let mut done = 0usize;
    while done < buf.len() {
        // SAFETY: reads into the live, writable tail of `buf`.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as i64,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(true)
}
