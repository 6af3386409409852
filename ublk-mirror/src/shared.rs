//! The daemon's control-plane state around the data path's `IoPath`: the open image, the
//! device state, pause and unpause, mirror start and stop (handshake, export checks), the copy
//! job, stored fds and the state record.
//!
//! The queue threads and copy workers get only the `IoPath` (`io_path.rs`): what the common
//! path of a request reads. Every lock of this file is taken by control operations only.
//!
//! Pausing without stranding or racing requests (a Dekker-style handshake, all SeqCst):
//! a queue counts a request as started *before* it looks at the gate; the control thread closes
//! the gate *before* it sums started minus completed. Either the control thread sees the
//! request and waits for it, or the request sees the closed gate and parks (un-counting itself).
//! So once the sum reads zero with the gate closed, nothing touches the image until unpause.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::datapath::io_path::{Gate, IoPath};
use crate::device::image::{DirectMode, Image};
use crate::device::state::{self, DaemonState, MirrorRecord};
use crate::lock::lock;
use crate::mirror::attach::{self, DeviceNeeds};
use crate::mirror::copy::{CopyJob, WORKERS};
use crate::mirror::dirty::DirtyMap;
use crate::mirror::link::{Mirror, MirrorState};
use crate::stop::StopReason;

/// The device's state as the orchestrator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// `serve --paused`, not yet unpaused.
    Attached,
    Running,
    Pausing,
    Paused,
    Stopping,
}

impl DeviceState {
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Attached => "attached",
            DeviceState::Running => "running",
            DeviceState::Pausing => "pausing",
            DeviceState::Paused => "paused",
            DeviceState::Stopping => "stopping",
        }
    }
}

/// An fd passed by the orchestrator.
#[derive(Debug)]
pub struct StoredFd {
    pub fd: OwnedFd,
    pub nbd: Option<control::protocol::NegotiatedNbd>,
}

/// What a new mirror copies in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPlan {
    /// New writes only.
    None,
    /// Everything: the whole device is marked out of sync, then copied (sparse-aware).
    Copy { speed: Option<u64> },
    /// What the out-of-sync map holds (since a failure, plus what a copy had not reached).
    Resync { speed: Option<u64> },
}

/// Why a control operation failed; the control server maps it to an error code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("pause timed out after {waited_ms} ms with {outstanding} requests outstanding; the device is running again")]
    PauseTimeout { waited_ms: u64, outstanding: u64 },
    #[error("flushing the image before closing it failed: {0}; the device is running again")]
    PauseFlush(std::io::Error),
    #[error("{0}; the device stays paused on {1}")]
    Reopen(String, String),
    #[error("the device is {0}, not paused")]
    NotPaused(&'static str),
    #[error("the device is stopping")]
    Stopping,
    #[error("wait-idle timed out with {0} requests outstanding")]
    IdleTimeout(u64),
    #[error("no fd named {0:?} (pass-fd it first)")]
    NoSuchFd(String),
    #[error("mirror refused: {0}")]
    MirrorRefused(String),
    #[error("a mirror is already {0}; mirror-stop it first")]
    MirrorBusy(&'static str),
}

pub struct Shared {
    /// What the queue threads and copy workers read; they get this, never the whole Shared.
    pub io: Arc<IoPath>,
    pub dev_size: u64,
    pub logical_block: u32,
    pub direct: DirectMode,
    pub label: String,
    image: Mutex<Option<Image>>,
    image_path: Mutex<PathBuf>,
    state: Mutex<DeviceState>,
    /// Serializes telling the activity log whether a mirror takes writes (`mirror_changed`).
    al_mode: Mutex<()>,
    /// The background copy or resync of the current mirror, if any.
    pub copy: ArcSwapOption<CopyJob>,
    /// Serializes pause, unpause, mirror start and stop, and the stop of the device.
    admin: Mutex<()>,
    pub fds: Mutex<BTreeMap<String, StoredFd>>,
    /// The fd name the last `mirror-start NAME` or `unpause --mirror NAME` mirrored to (None
    /// after `unpause --mirror null`; kept by `mirror-stop`); `stats` shows it as
    /// `mirror.requested`.
    pub mirror_request: Mutex<Option<String>>,
    pub stop: Mutex<Sender<StopReason>>,
    /// What `ublk-mirror recover` needs, once the device has an id; saved on every change.
    pub record: Mutex<Option<DaemonState>>,
    /// Set when this daemon recovered a device whose previous daemon was mirroring: the
    /// target missed writes, so `nbd_mirror_failed` reads 1 until the next mirror-start or
    /// mirror-stop.
    inherited_failure: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(
        image: Image,
        direct: DirectMode,
        queues: u16,
        label: String,
        start_paused: bool,
        stop: Sender<StopReason>,
        dirty: DirtyMap,
    ) -> std::io::Result<Arc<Shared>> {
        let (gate, state) = if start_paused {
            (Gate::ParkWrites, DeviceState::Attached)
        } else {
            (Gate::Open, DeviceState::Running)
        };
        let io = IoPath::new(image.file.as_raw_fd(), queues, WORKERS, gate, dirty)?;
        Ok(Arc::new(Shared {
            io: Arc::new(io),
            al_mode: Mutex::new(()),
            copy: ArcSwapOption::empty(),
            dev_size: image.size,
            logical_block: image.logical_block,
            direct,
            label,
            image_path: Mutex::new(image.path.clone()),
            image: Mutex::new(Some(image)),
            state: Mutex::new(state),
            admin: Mutex::new(()),
            fds: Mutex::new(BTreeMap::new()),
            mirror_request: Mutex::new(None),
            stop: Mutex::new(stop),
            record: Mutex::new(None),
            inherited_failure: Mutex::new(None),
        }))
    }

    pub fn state(&self) -> DeviceState {
        *lock(&self.state)
    }

    pub fn image_path(&self) -> PathBuf {
        lock(&self.image_path).clone()
    }

    /// Park new requests, wait until none is outstanding, flush and close the image.
    /// Pausing a paused device is a no-op. At the timeout the pause is undone.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, ControlError> {
        let _admin = lock(&self.admin);
        match self.state() {
            DeviceState::Paused => return Ok(Duration::ZERO),
            DeviceState::Stopping => return Err(ControlError::Stopping),
            _ => {}
        }
        let before = (self.io.gate(), self.state());
        let start = Instant::now();
        self.io.set_gate(Gate::ParkAll);
        *lock(&self.state) = DeviceState::Pausing;
        log::info!("pause: parking new requests, draining");
        let undo = |e: ControlError| {
            self.io.set_gate(before.0);
            *lock(&self.state) = before.1;
            self.io.ring_doorbells();
            log::warn!("pause failed: {e}");
            e
        };
        if let Err(outstanding) = self.drain(timeout) {
            return Err(undo(ControlError::PauseTimeout {
                waited_ms: start.elapsed().as_millis() as u64,
                outstanding,
            }));
        }
        let mut image = lock(&self.image);
        if let Some(img) = image.as_ref() {
            if let Err(e) = img.sync() {
                drop(image);
                return Err(undo(ControlError::PauseFlush(e)));
            }
        }
        self.io.set_image_fd(-1);
        // Closing releases the OFD lock: the image may now be copied, moved or taken over.
        *image = None;
        if let Err(e) = self.io.dirty.flush() {
            log::error!("writing the out-of-sync bitmap back failed: {e}");
        }
        *lock(&self.state) = DeviceState::Paused;
        let took = start.elapsed();
        log::info!("paused in {} ms: image closed", took.as_millis());
        Ok(took)
    }

    /// Waits until no request is outstanding; the caller has closed the gate.
    fn drain(&self, timeout: Duration) -> Result<(), u64> {
        let start = Instant::now();
        loop {
            let outstanding = self.io.stats.snapshot().outstanding;
            if outstanding == 0 {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(outstanding);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Reopen the image (at `new_path` if given; it must have the same size and a logical
    /// block no larger than the device's) and resume. On any error the device stays paused
    /// (or attached, after `serve --paused`) on its old image.
    pub fn unpause(&self, new_path: Option<PathBuf>) -> Result<(), ControlError> {
        let _admin = lock(&self.admin);
        let state = self.state();
        match state {
            DeviceState::Paused | DeviceState::Attached => {}
            DeviceState::Running if new_path.is_none() => return Ok(()),
            DeviceState::Stopping => return Err(ControlError::Stopping),
            other => return Err(ControlError::NotPaused(other.name())),
        }
        let current = self.image_path();
        let path = new_path.unwrap_or_else(|| current.clone());
        let reuse = path == current && lock(&self.image).is_some();
        if !reuse {
            let shown = current.display().to_string();
            let reopen = |msg: String| ControlError::Reopen(msg, shown.clone());
            if state == DeviceState::Attached {
                // Reads are being served from the old image: none may be in flight while its
                // fd is replaced (the number could be reused by the new open).
                self.io.set_gate(Gate::ParkAll);
                if let Err(n) = self.drain(Duration::from_secs(30)) {
                    self.io.set_gate(Gate::ParkWrites);
                    self.io.ring_doorbells();
                    return Err(reopen(format!("{n} reads still outstanding")));
                }
                *lock(&self.image) = None; // releases its lock, in case it is the same file
            }
            let candidate = Image::open(&path, self.direct).map_err(|e| reopen(e.to_string()));
            let candidate = candidate.and_then(|c| {
                if c.size != self.dev_size {
                    Err(reopen(format!(
                        "image {} has {} bytes, the device {}",
                        path.display(),
                        c.size,
                        self.dev_size
                    )))
                } else if c.logical_block > self.logical_block {
                    Err(reopen(format!(
                        "image {} needs {}-byte blocks, the device has {}",
                        path.display(),
                        c.logical_block,
                        self.logical_block
                    )))
                } else {
                    Ok(c)
                }
            });
            let candidate = match candidate {
                Ok(c) => c,
                Err(e) => {
                    if state == DeviceState::Attached {
                        // Put the device back as it was: attached on its old image.
                        if let Ok(old) = Image::open(&current, self.direct) {
                            self.io.set_image_fd(old.file.as_raw_fd());
                            *lock(&self.image) = Some(old);
                        }
                        self.io.set_gate(Gate::ParkWrites);
                        self.io.ring_doorbells();
                    }
                    return Err(e);
                }
            };
            self.io.set_image_fd(candidate.file.as_raw_fd());
            *lock(&self.image) = Some(candidate);
            *lock(&self.image_path) = path;
            // Before any request reaches the new image: a successor must open this one.
            self.save_state();
        }
        *lock(&self.state) = DeviceState::Running;
        self.io.set_gate(Gate::Open);
        self.io.ring_doorbells();
        log::info!("unpaused on {}", self.image_path().display());
        Ok(())
    }

    /// Before STOP_DEV: parked requests must finish or the kernel's teardown waits for them
    /// forever. Reopen the image if a pause closed it (failing that, they fail with EIO).
    pub fn release_for_stop(&self) {
        if matches!(self.state(), DeviceState::Paused) {
            if let Err(e) = self.unpause(None) {
                log::error!("stopping while paused: {e}; parked requests will fail");
            }
        }
        let _admin = lock(&self.admin);
        *lock(&self.state) = DeviceState::Stopping;
        self.io.set_gate(Gate::Open);
        self.io.ring_doorbells();
    }

    /// Wait until no request is outstanding.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), ControlError> {
        self.drain(timeout).map_err(ControlError::IdleTimeout)
    }

    /// Attaches a mirror on the stored fd `fd_name`: runs the NBD handshake unless the fd came
    /// negotiated, checks the export can take this device, starts the link, and returns once
    /// the mirror is active (every write that started local-only has completed and marked
    /// itself out of sync, or 30 s have passed). On error the fd is closed and nothing else
    /// changes.
    pub fn start_mirror(
        self: &Arc<Self>,
        fd_name: &str,
        export_name: &str,
        timeout: Option<Duration>,
        max_io: u32,
        plan: CopyPlan,
    ) -> Result<Arc<Mirror>, ControlError> {
        let _admin = lock(&self.admin);
        if let Some(m) = self.io.mirror.load_full() {
            if m.state() != MirrorState::Failed {
                return Err(ControlError::MirrorBusy(m.state().name()));
            }
        }
        let stored = lock(&self.fds)
            .remove(fd_name)
            .ok_or_else(|| ControlError::NoSuchFd(fd_name.to_owned()))?;
        let refuse = |m: String| ControlError::MirrorRefused(m);
        let (stream, export) =
            attach::connect(stored.fd, stored.nbd, export_name).map_err(refuse)?;
        let needs = DeviceNeeds {
            dev_size: self.dev_size,
            logical_block: self.logical_block,
            max_io,
        };
        attach::check_export(&export, needs).map_err(refuse)?;
        let weak = Arc::downgrade(self);
        let on_failure = Box::new(move || {
            if let Some(shared) = weak.upgrade() {
                shared.mirror_changed();
            }
        });
        let mirror = Mirror::start(
            fd_name.to_owned(),
            stream,
            export,
            timeout,
            self.io.mail.clone(),
            on_failure,
        )
        .map_err(|e| refuse(format!("starting the mirror threads: {e}")))?;
        // Publish, then wait for writes that began local-only (they mark themselves dirty);
        // the store and the gauge loads are SeqCst, paired with the queues' side.
        self.io.start_tracking();
        self.io.mirror.store(Some(mirror.clone()));
        self.mirror_changed();
        let start = Instant::now();
        while self.io.stats.local_only() > 0 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(200));
        }
        mirror.set_active();
        self.clear_inherited();
        if let Some(old) = self.copy.swap(None) {
            old.cancel();
        }
        let job = match plan {
            CopyPlan::None => None,
            CopyPlan::Copy { speed } => {
                // A full copy is a resync of everything.
                self.io.dirty.mark_all();
                Some(("copy", speed))
            }
            CopyPlan::Resync { speed } => Some(("resync", speed)),
        };
        if let Some((kind, speed)) = job {
            let chunk = crate::mirror::copy::DEFAULT_CHUNK;
            let job =
                crate::mirror::copy::start(self.io.clone(), mirror.clone(), kind, speed, chunk);
            self.copy.store(Some(job));
        }
        log::info!(
            "mirroring to {:?} (export {:?}, {} bytes, timeout {})",
            fd_name,
            mirror.export.name,
            mirror.export.size,
            timeout.map_or("none".to_string(), |t| format!("{} s", t.as_secs_f64()))
        );
        self.save_state();
        Ok(mirror)
    }

    /// Ends mirroring cleanly: requests in flight to the target complete (for up to 30 s; the
    /// rest are failed back and marked out of sync), then disconnect, and the activity log is
    /// emptied as the last writes end. The failed flag is cleared with it (as `tap-ctl
    /// unpause -2 null`). False if there was neither a mirror nor an inherited failure.
    pub fn stop_mirror(&self) -> bool {
        let _admin = lock(&self.admin);
        let Some(m) = self.io.mirror.load_full() else {
            // The orchestrator acknowledges a failure inherited from a previous daemon.
            return self.clear_inherited();
        };
        if let Some(job) = self.copy.swap(None) {
            job.cancel();
        }
        m.stop(Duration::from_secs(30));
        self.io.mirror.store(None);
        self.mirror_changed();
        self.clear_inherited();
        self.save_state();
        log::info!("mirror {:?} stopped", m.name);
        true
    }

    /// After every change of whether a mirror takes writes (published, failed, stopped):
    /// tells the activity log, which, while none does, is emptied as the writes end (see
    /// `DirtyMap::set_mirroring`). Each call reads the slot under `al_mode`, so the last one
    /// leaves the log in the mode that matches the slot, whatever the order of the callers.
    fn mirror_changed(&self) {
        let _g = lock(&self.al_mode);
        let mirroring = self.io.mirror.load().as_ref().is_some_and(|m| m.takes_io());
        let cleared = self.io.dirty.set_mirroring(mirroring);
        if cleared > 0 {
            log::info!(
                "activity log: {cleared} idle extents cleared (no mirror takes writes; the \
                 out-of-sync bitmap holds every write that may differ and is written back)"
            );
        }
    }

    pub fn mirror_failed(&self) -> bool {
        self.io.mirror.load().as_ref().is_some_and(|m| m.failed())
            || lock(&self.inherited_failure).is_some()
    }

    /// A previous daemon of this device died (or detached) while mirroring.
    pub fn inherit_mirror_failure(&self, why: String) {
        log::warn!("nbd_mirror_failed=1: {why}");
        *lock(&self.inherited_failure) = Some(why);
        self.io.start_tracking();
    }

    fn clear_inherited(&self) -> bool {
        lock(&self.inherited_failure).take().is_some()
    }

    pub fn inherited_failure(&self) -> Option<String> {
        lock(&self.inherited_failure).clone()
    }

    /// What the state file records of the attached mirror, if any.
    pub fn mirror_record(&self) -> Option<MirrorRecord> {
        self.io.mirror.load().as_ref().map(|m| MirrorRecord {
            target: m.name.clone(),
            export: m.export.name.clone(),
        })
    }

    /// Rewrites the state file from the current image and mirror; a no-op before the device
    /// has an id. A failure is logged: the device keeps serving, only recovery would suffer.
    pub fn save_state(&self) {
        self.write_state(false, self.mirror_record());
    }

    /// The last save before a detach: the mirror that was attached (already stopped) stays on
    /// record, so the successor reports it failed: it will not see the writes in between.
    pub fn save_detached(&self, mirror: Option<MirrorRecord>) {
        let mirror = mirror.or_else(|| {
            self.inherited_failure().map(|_| MirrorRecord {
                target: String::new(),
                export: String::new(),
            })
        });
        self.write_state(true, mirror);
    }

    fn write_state(&self, detached: bool, mirror: Option<MirrorRecord>) {
        let mut rec = lock(&self.record);
        let Some(r) = rec.as_mut() else { return };
        r.pid = std::process::id();
        r.image = self.image_path();
        r.mirror = mirror;
        r.detached = detached;
        if let Err(e) = r.save(&state::path_for(r.dev_id)) {
            log::error!("{:#}", anyhow::Error::from(e));
        }
    }

    /// Deletes the state file (the device is gone).
    pub fn remove_state(&self) {
        if let Some(r) = lock(&self.record).take() {
            let _ = std::fs::remove_file(state::path_for(r.dev_id));
        }
    }

    pub fn image_is_open(&self) -> bool {
        lock(&self.image).is_some()
    }

    /// Flushes the image if it is open, and the bitmap (at exit).
    pub fn sync_image(&self) -> std::io::Result<()> {
        self.io.dirty.flush()?;
        match lock(&self.image).as_ref() {
            Some(i) => i.sync(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::channel;

    /// A Shared on a temp-file image of `len` bytes with `queues` queues (no ublk needed);
    /// stop requests go nowhere.
    pub(crate) fn shared_with(len: u64, queues: u16) -> (tempfile::NamedTempFile, Arc<Shared>) {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(len).expect("size");
        let img = Image::open(f.path(), DirectMode::Off).expect("image");
        let (tx, _rx) = channel();
        let dirty = DirtyMap::new(img.size, crate::mirror::dirty::DEFAULT_GRANULE);
        let s = Shared::new(img, DirectMode::Off, queues, "t".into(), false, tx, dirty)
            .expect("shared");
        (f, s)
    }

    #[test]
    fn stats_are_answered_while_a_pause_drains_and_a_timeout_undoes_it() {
        let (_f, shared) = shared_with(1 << 20, 2);
        shared.io.stats.queue(1).start(); // one request being served
        let s2 = shared.clone();
        let pause = std::thread::spawn(move || s2.pause(Duration::from_millis(400)));
        std::thread::sleep(Duration::from_millis(100));
        // Mid-drain: state and counters answer at once.
        assert_eq!(shared.state(), DeviceState::Pausing);
        assert_eq!(shared.io.stats.snapshot().outstanding, 1);
        let res = pause.join().expect("pause thread");
        assert!(
            matches!(res, Err(ControlError::PauseTimeout { outstanding: 1, .. })),
            "{res:?}"
        );
        assert_eq!(
            (shared.state(), shared.io.gate()),
            (DeviceState::Running, Gate::Open)
        );
        assert!(shared.image_is_open(), "a failed pause keeps the image");

        shared.io.stats.queue(1).complete();
        shared.pause(Duration::from_secs(1)).expect("pause");
        assert_eq!(shared.state(), DeviceState::Paused);
        assert!(!shared.image_is_open(), "paused means closed");
        assert_eq!(shared.io.image_fd().load(Ordering::SeqCst), -1);
        assert!(
            shared.pause(Duration::from_secs(1)).is_ok(),
            "pausing a paused device is a no-op"
        );
        shared.unpause(None).expect("unpause");
        assert!(shared.image_is_open());
        assert_eq!(shared.io.gate(), Gate::Open);
    }

    #[test]
    fn unpause_onto_a_wrong_image_stays_paused() {
        let (_f, shared) = shared_with(1 << 20, 2);
        shared.pause(Duration::from_secs(1)).expect("pause");
        let small = tempfile::NamedTempFile::new().expect("tempfile");
        small.as_file().set_len(4096).expect("size");
        let err = shared
            .unpause(Some(small.path().to_owned()))
            .expect_err("size differs");
        assert!(err.to_string().contains("stays paused"), "{err}");
        assert_eq!(shared.state(), DeviceState::Paused);
        assert_eq!(shared.io.gate(), Gate::ParkAll);
        let missing = shared
            .unpause(Some("/nonexistent.img".into()))
            .expect_err("missing");
        assert!(matches!(missing, ControlError::Reopen(..)));
        shared.unpause(None).expect("the old image is still fine");
    }
}
