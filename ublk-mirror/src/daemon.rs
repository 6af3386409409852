//! The daemon object the control handlers and the device's serve loop hold: a small struct of
//! parts, each with one job. The data path never sees it: queue threads and copy workers get
//! only `io` (the `IoPath`).
//!
//! - `io`: what queue threads read lock-free (`datapath/io_path.rs`);
//! - `device`: pause, unpause, stop, wait-idle, the image slot and the admin lock
//!   (`device/lifecycle.rs`);
//! - `fds`: the stored fds (`fd_store.rs`);
//! - `record`: the state record for `recover` (`device/record.rs`);
//! - `mirroring`: mirror start and stop, the copy job, the inherited failure
//!   (`mirror/mirroring.rs`).
//!
//! What needs two parts is here: mirror start and stop under the admin lock, then a save of
//! the state record; an unpause that saves the record once a new image is in place.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::datapath::io_path::IoPath;
use crate::device::image::{DirectMode, Image};
use crate::device::lifecycle::{Lifecycle, LifecycleError};
use crate::device::record::{self, StateRecord};
use crate::device::state::MirrorRecord;
use crate::events::Events;
use crate::fd_store::{FdStore, HandoffCounters};
use crate::mirror::attach::DeviceNeeds;
use crate::mirror::copy::WORKERS;
use crate::mirror::dirty::DirtyMap;
use crate::mirror::link::Mirror;
use crate::mirror::mirroring::{MirrorError, MirrorTarget, Mirroring, Stopped};
use crate::stop::StopReason;

/// What `unpause --mirror NAME` did with the mirror once the device runs.
pub enum UnpausedMirror {
    Active,
    /// The target could not be opened; the mirror is failed for this reason.
    Failed(String),
}

/// Why `unpause --mirror NAME` left the device as it was.
#[derive(Debug, thiserror::Error)]
pub enum UnpauseError {
    #[error(transparent)]
    Device(#[from] LifecycleError),
    #[error("{0}; the device stays {1}")]
    Mirror(MirrorError, &'static str),
}

impl UnpauseError {
    /// The control protocol's error code: the part's own.
    pub fn code(&self) -> &'static str {
        match self {
            UnpauseError::Device(e) => e.code(),
            UnpauseError::Mirror(e, _) => e.code(),
        }
    }
}

pub struct Daemon {
    /// What the queue threads and copy workers read; they get this, never the whole daemon.
    pub io: Arc<IoPath>,
    pub device: Lifecycle,
    pub fds: FdStore,
    /// What `ublk-mirror recover` needs, once the device has an id; saved on every change.
    pub record: StateRecord,
    pub mirroring: Mirroring,
    pub label: String,
    pub stop: Mutex<Sender<StopReason>>,
    /// tapdisk's fd hand-off socket and its counters, with `serve --tapdisk-compat`; in that
    /// mode a mirror also takes an export without FLUSH (tapdisk's servers offer none).
    pub fd_receiver: std::sync::OnceLock<(PathBuf, Arc<HandoffCounters>)>,
    /// What `watch` connections are told.
    pub events: Arc<Events>,
}

impl Daemon {
    pub fn new(
        image: Image,
        direct: DirectMode,
        queues: u16,
        label: String,
        start_paused: bool,
        stop: Sender<StopReason>,
        dirty: DirtyMap,
    ) -> std::io::Result<Arc<Daemon>> {
        let gate = Lifecycle::initial_gate(start_paused);
        let (io, device_switches, mirror_switches) =
            IoPath::new(image.file.as_raw_fd(), queues, WORKERS, gate, dirty)?;
        let events = Arc::new(Events::default());
        Ok(Arc::new(Daemon {
            device: Lifecycle::new(device_switches, image, direct, start_paused, events.clone()),
            fds: FdStore::default(),
            record: StateRecord::default(),
            mirroring: Mirroring::new(mirror_switches, events.clone()),
            events,
            io,
            label,
            stop: Mutex::new(stop),
            fd_receiver: std::sync::OnceLock::new(),
        }))
    }

    /// Reopens the image (at `new_path` if given) and resumes; see `Lifecycle::unpause`.
    pub fn unpause(&self, new_path: Option<PathBuf>) -> Result<(), LifecycleError> {
        self.device.unpause(new_path, || self.save_state())
    }

    /// `unpause --mirror NAME` (`tap-ctl unpause -2 nbd:NAME`), as tapdisk resumes with a
    /// secondary: the target is attached and checked while the device is still paused, then
    /// the device resumes (on `new_path` if given) and the mirror is published, with no other
    /// command in between. An unknown fd, an export that cannot take the device or a mirror
    /// already active fail before anything changes (the device stays paused); so does a failed
    /// reopen, and the attached connections then go back to the fd store, negotiated. A
    /// target that cannot be opened (I/O error, failed handshake) does not hold the guest:
    /// the device resumes and the mirror is failed, with the reason.
    pub fn unpause_mirroring(
        &self,
        new_path: Option<PathBuf>,
        target: MirrorTarget<'_>,
        max_io: u32,
    ) -> Result<UnpausedMirror, UnpauseError> {
        let admin = self.device.admin();
        self.device.can_unpause(new_path.is_some())?;
        let stays = self.device.state().name();
        let attached = match self.mirroring.attach(&self.fds, target, self.needs(max_io)) {
            Ok(a) => Ok(a),
            Err(MirrorError::Unreachable(why)) => Err(why),
            Err(e) => return Err(UnpauseError::Mirror(e, stays)),
        };
        if let Err(e) = self
            .device
            .unpause_locked(&admin, new_path, || self.save_state())
        {
            if let Ok(a) = attached {
                a.restore(&self.fds);
            }
            return Err(e.into());
        }
        let outcome = match attached {
            Ok(a) => {
                self.mirroring.begin(a, target);
                UnpausedMirror::Active
            }
            Err(why) => {
                let why = format!("unpause: the mirror target could not be opened: {why}");
                self.mirroring.fail_unlinked(why.clone());
                UnpausedMirror::Failed(why)
            }
        };
        self.save_state();
        Ok(outcome)
    }

    fn needs(&self, max_io: u32) -> DeviceNeeds {
        DeviceNeeds {
            dev_size: self.device.dev_size,
            logical_block: self.device.logical_block,
            max_io,
        }
    }

    /// Before STOP_DEV: parked requests must finish; see `Lifecycle::release_for_stop`.
    pub fn release_for_stop(&self) {
        self.device.release_for_stop(|| self.save_state());
    }

    /// Attaches a mirror (see `Mirroring::start`) and records it in the state file.
    pub fn start_mirror(
        &self,
        target: MirrorTarget<'_>,
        max_io: u32,
    ) -> Result<Arc<Mirror>, MirrorError> {
        let _admin = self.device.admin();
        let mirror = self
            .mirroring
            .start(&self.fds, target, self.needs(max_io))?;
        self.save_state();
        Ok(mirror)
    }

    /// Ends mirroring cleanly (see `Mirroring::stop`). False if there was neither a mirror
    /// nor an inherited failure.
    pub fn stop_mirror(&self) -> bool {
        let _admin = self.device.admin();
        match self.mirroring.stop() {
            Stopped::Mirror(name) => {
                self.save_state();
                log::info!("mirror {name:?} stopped");
                true
            }
            Stopped::InheritedFailure => {
                self.save_state();
                true
            }
            Stopped::Nothing => false,
        }
    }

    /// What the state file records of the mirror: the attached one, or an empty record for a
    /// failure without a link (inherited, or a target unreachable at unpause), so that a
    /// successor reports it failed too.
    pub fn mirror_record(&self) -> Option<MirrorRecord> {
        record::mirror_record(&self.io).or_else(|| {
            self.mirroring.unlinked_failure().map(|_| MirrorRecord {
                target: String::new(),
                targets: Vec::new(),
                export: String::new(),
            })
        })
    }

    /// Rewrites the state file from the current image and mirror; a no-op before the device
    /// has an id.
    pub fn save_state(&self) {
        let image = self.device.image_path();
        self.record.save(image, self.mirror_record(), false);
    }

    /// The last save before a detach: the mirror that was attached (already stopped) stays on
    /// record, so the successor reports it failed: it will not see the writes in between.
    pub fn save_detached(&self, mirror: Option<MirrorRecord>) {
        let mirror = mirror.or_else(|| self.mirror_record());
        self.record.save(self.device.image_path(), mirror, true);
    }

    /// tapdisk mode (`serve --tapdisk-compat`): xapi's targets are tapdisk's servers.
    pub fn tapdisk_mode(&self) -> bool {
        self.fd_receiver.get().is_some()
    }

    /// How long `stats` and `wait-idle` report the mirror as failed.
    pub fn mirror_failed(&self) -> bool {
        self.mirroring.mirror_failed()
    }

    /// Wait until no request is outstanding.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), LifecycleError> {
        self.device.wait_idle(timeout)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// A daemon on a temp-file image of `len` bytes with `queues` queues (no ublk needed);
    /// stop requests go nowhere.
    pub(crate) fn daemon_with(len: u64, queues: u16) -> (tempfile::NamedTempFile, Arc<Daemon>) {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        f.as_file().set_len(len).expect("size");
        let img = Image::open(f.path(), DirectMode::Off).expect("image");
        let (tx, _rx) = channel();
        let dirty = DirtyMap::new(img.size, crate::mirror::dirty::DEFAULT_GRANULE);
        let d = Daemon::new(img, DirectMode::Off, queues, "t".into(), false, tx, dirty)
            .expect("daemon");
        (f, d)
    }
}
