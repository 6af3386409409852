//! The data path's handle: what queue threads and copy workers read to serve a request, and
//! nothing of the control plane (pause/unpause and mirror attach logic, stored fds, the state
//! record). `IoPath::new` returns it behind an `Arc` together with its only two sets of
//! switches: [`DeviceSwitches`] (the gate, the image fd, the doorbells) for the device's
//! lifecycle and [`MirrorSwitches`] (the mirror slot, tracking) for mirroring. Queue threads
//! and copy workers get a clone of the `Arc` alone, which can read all of it and change none
//! of it: they cannot pause, swap the image or attach a mirror, by construction.
//!
//! The common path of a request touches only atomics: its queue's own counters, one load of
//! the gate and one of the mirror slot. While a mirror is attached a write-like request also
//! takes one shard of the range lock (a few instructions under a mutex few others touch), and
//! the activity log's lock when its extent is not logged yet (or, with no mirror taking
//! writes, when it leaves an extent idle).
//! The pause handshake that makes the gate safe is described in `device/lifecycle.rs`.

use std::ops::Deref;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::atomic_state::{u8_state, AtomicState};
use crate::datapath::request::Request;
use crate::datapath::stats::Stats;
use crate::doorbell::Doorbells;
use crate::mirror::dirty::DirtyMap;
use crate::mirror::link::{Mailboxes, Mirror};
use crate::mirror::range_lock::RangeLock;

u8_state! {
    /// Which requests wait instead of being served.
    pub enum Gate {
        Open = 0 => "open",
        /// `pause`: every request waits.
        ParkAll = 1 => "park-all",
        /// `serve --paused` before the first unpause: reads are answered (so the kernel's
        /// partition scan and udev's blkid do not hang), everything that changes the disk
        /// waits.
        ParkWrites = 2 => "park-writes",
    }
}

impl Gate {
    pub fn blocks(self, req: &Request) -> bool {
        match self {
            Gate::Open => false,
            Gate::ParkAll => true,
            Gate::ParkWrites => !matches!(req, Request::Read { .. }),
        }
    }
}

pub struct IoPath {
    pub stats: Stats,
    gate: AtomicState<Gate>,
    /// The image's fd for every queue's I/O; -1 while paused (closed).
    image_fd: Arc<AtomicI32>,
    /// One eventfd per queue and per copy worker: written to wake its parked requests or
    /// deliver a mirror completion. Owned here; the mailboxes hold their numbers.
    doorbells: Doorbells,
    /// The doorbells and mirror completions of every queue and copy worker.
    pub mail: Arc<Mailboxes>,
    /// The mirror, while one is attached (in any state). Loaded without a lock per request.
    mirror: ArcSwapOption<Mirror>,
    /// Out-of-sync granules between the image and the mirror target (and, with a file, the
    /// activity log).
    pub dirty: DirtyMap,
    /// Orders overlapping write-like requests while a mirror is attached.
    pub ranges: RangeLock,
    /// Queues; the copy workers' counter blocks and mailboxes come after theirs.
    queues: u16,
    /// TEST ONLY (UBLK_MIRROR_DEBUG_NO_RANGE_LOCK=1): skip the range lock, to prove the overlap
    /// test can fail without it.
    pub range_lock_disabled: bool,
    /// Set once a mirror has been attached (or a previous daemon's was inherited), for good:
    /// from then on a write that no mirror takes marks itself out of sync, also after
    /// mirror-stop, so that a later `mirror-start --resync` to the same target converges.
    tracking: AtomicBool,
}

impl IoPath {
    /// The data path of `queues` queues and `workers` copy workers, serving the image open as
    /// `image_fd`, and the switches that change it.
    pub fn new(
        image_fd: RawFd,
        queues: u16,
        workers: u16,
        gate: Gate,
        dirty: DirtyMap,
    ) -> std::io::Result<(Arc<IoPath>, DeviceSwitches, MirrorSwitches)> {
        let io = Arc::new(IoPath::build(image_fd, queues, workers, gate, dirty)?);
        Ok((io.clone(), DeviceSwitches(io.clone()), MirrorSwitches(io)))
    }

    fn build(
        image_fd: RawFd,
        queues: u16,
        workers: u16,
        gate: Gate,
        dirty: DirtyMap,
    ) -> std::io::Result<IoPath> {
        // One doorbell per queue and per copy worker; the range lock reports them in a u64.
        if queues + workers > crate::mirror::range_lock::MAX_WAITERS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{queues} queues and {workers} copy workers: at most 64 in all"),
            ));
        }
        let doorbells = Doorbells::new(queues + workers)?;
        let mail = Arc::new(Mailboxes::new(doorbells.raw_fds()));
        Ok(IoPath {
            mail,
            mirror: ArcSwapOption::empty(),
            dirty,
            ranges: RangeLock::default(),
            queues,
            range_lock_disabled: {
                let off = std::env::var_os("UBLK_MIRROR_DEBUG_NO_RANGE_LOCK").is_some();
                if off {
                    log::warn!("UBLK_MIRROR_DEBUG_NO_RANGE_LOCK: overlapping mirrored writes are NOT ordered; the legs can diverge (test only)");
                }
                off
            },
            stats: Stats::new(usize::from(queues + workers)),
            gate: AtomicState::new(gate),
            image_fd: Arc::new(AtomicI32::new(image_fd)),
            doorbells,
            tracking: AtomicBool::new(false),
        })
    }

    pub fn gate(&self) -> Gate {
        self.gate.load()
    }

    /// The fd the local leg issues I/O on.
    pub fn image_fd(&self) -> Arc<AtomicI32> {
        self.image_fd.clone()
    }

    pub fn image_raw_fd(&self) -> RawFd {
        self.image_fd.load(Ordering::SeqCst)
    }

    /// The mirror, while one is attached (in any state).
    pub fn mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror.load_full()
    }

    pub fn has_mirror(&self) -> bool {
        self.mirror.load().is_some()
    }

    pub fn doorbell(&self, qid: u16) -> RawFd {
        self.doorbells.fd(qid)
    }

    /// The device's queues.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The mailbox (and counter block) of copy worker `w`.
    pub fn copy_slot(&self, w: u16) -> u16 {
        self.queues + w
    }

    /// Copy workers wait while the device is paused or attached (the image may be closed or
    /// not yet final).
    pub fn gate_blocks_copy(&self) -> bool {
        self.gate() != Gate::Open
    }

    /// Blocks (a copy worker) until its doorbell rings or `timeout` passes.
    pub fn wait_doorbell(&self, qid: u16, timeout: Duration) {
        self.doorbells.wait(qid, timeout);
    }

    /// Whether writes must mark themselves out of sync although no mirror is attached.
    pub fn tracks_without_mirror(&self) -> bool {
        self.tracking.load(Ordering::Relaxed)
    }
}

/// What the device's lifecycle (pause, unpause, stop) changes in the data path.
pub struct DeviceSwitches(Arc<IoPath>);

impl DeviceSwitches {
    /// Moves the gate (pause, unpause, stop); the caller rings the doorbells.
    pub fn set_gate(&self, g: Gate) {
        let before = self.0.gate.swap(g);
        if before != g {
            log::debug!("gate: {} -> {}", before.name(), g.name());
        }
    }

    /// Points every queue's I/O at `fd` (-1 while the image is closed).
    pub fn set_image_fd(&self, fd: RawFd) {
        self.0.image_fd.store(fd, Ordering::SeqCst);
    }

    /// Wakes every parked request of every queue and copy worker.
    pub fn ring_doorbells(&self) {
        self.0.mail.ring_all();
    }
}

/// What attaching and detaching a mirror changes in the data path.
pub struct MirrorSwitches(Arc<IoPath>);

impl MirrorSwitches {
    /// Publishes (or, with `None`, withdraws) the mirror every request loads, and rings every
    /// doorbell: each queue that owns a connection of a new mirror starts it then, so its
    /// receive watches the target even while the guest does no writes.
    pub fn set_mirror(&self, mirror: Option<Arc<Mirror>>) {
        self.0.mirror.store(mirror);
        self.0.mail.ring_all();
    }

    /// From now on, for good, writes that no mirror takes mark themselves out of sync.
    pub fn start_tracking(&self) {
        self.0.tracking.store(true, Ordering::SeqCst);
    }
}

/// Both read the data path like everyone else.
impl Deref for DeviceSwitches {
    type Target = Arc<IoPath>;
    fn deref(&self) -> &Arc<IoPath> {
        &self.0
    }
}

impl Deref for MirrorSwitches {
    type Target = Arc<IoPath>;
    fn deref(&self) -> &Arc<IoPath> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_parks_what_it_should() {
        let read = Request::Read {
            offset: 0,
            len: 512,
        };
        let write = Request::Write {
            offset: 0,
            len: 512,
            fua: false,
        };
        assert!(!Gate::Open.blocks(&write));
        assert!(Gate::ParkAll.blocks(&read) && Gate::ParkAll.blocks(&write));
        assert!(!Gate::ParkWrites.blocks(&read) && Gate::ParkWrites.blocks(&write));
        assert!(Gate::ParkWrites.blocks(&Request::Flush));
    }
}
