//! The device's lifecycle as the orchestrator drives it: pause, unpause (optionally onto a new
//! image), wait-idle and the release before a stop; the image slot they open and close, and
//! the admin lock that serializes them with mirror start and stop.
//!
//! Pausing without stranding or racing requests (a Dekker-style handshake, all SeqCst):
//! a queue counts a request as started *before* it looks at the gate; the control thread closes
//! the gate *before* it sums started minus completed. Either the control thread sees the
//! request and waits for it, or the request sees the closed gate and parks (un-counting itself).
//! So once the sum reads zero with the gate closed, nothing touches the image until unpause.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use control::protocol::code;

use crate::datapath::io_path::{DeviceSwitches, Gate};
use crate::device::image::{DirectMode, Image};
use crate::events::Events;
use crate::lock::lock;

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

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
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
}

impl LifecycleError {
    /// The control protocol's error code (`control/PROTOCOL.md`).
    pub fn code(&self) -> &'static str {
        match self {
            LifecycleError::PauseTimeout { .. } | LifecycleError::IdleTimeout(_) => code::TIMEOUT,
            LifecycleError::Reopen(..) => code::BAD_IMAGE,
            LifecycleError::NotPaused(_) | LifecycleError::Stopping => code::BAD_STATE,
            LifecycleError::PauseFlush(_) => code::FAILED,
        }
    }
}

/// The image slot, the device state and the admin lock.
pub struct Lifecycle {
    io: DeviceSwitches,
    pub dev_size: u64,
    pub logical_block: u32,
    direct: DirectMode,
    image: Mutex<Option<Image>>,
    image_path: Mutex<PathBuf>,
    state: Mutex<DeviceState>,
    /// Serializes pause, unpause, mirror start and stop, and the stop of the device.
    admin: Mutex<()>,
    /// Told of every pause and unpause (`watch`).
    events: Arc<Events>,
}

impl Lifecycle {
    /// The lifecycle of a device serving `image` through `io` (whose gate matches
    /// `start_paused`).
    pub fn new(
        io: DeviceSwitches,
        image: Image,
        direct: DirectMode,
        start_paused: bool,
        events: Arc<Events>,
    ) -> Self {
        let state = if start_paused {
            DeviceState::Attached
        } else {
            DeviceState::Running
        };
        Lifecycle {
            io,
            dev_size: image.size,
            logical_block: image.logical_block,
            direct,
            image_path: Mutex::new(image.path.clone()),
            image: Mutex::new(Some(image)),
            state: Mutex::new(state),
            admin: Mutex::new(()),
            events,
        }
    }

    /// The gate a device starting this way opens with.
    pub fn initial_gate(start_paused: bool) -> Gate {
        if start_paused {
            Gate::ParkWrites
        } else {
            Gate::Open
        }
    }

    /// Held across every control operation that changes what the queues see.
    pub fn admin(&self) -> MutexGuard<'_, ()> {
        lock(&self.admin)
    }

    pub fn state(&self) -> DeviceState {
        *lock(&self.state)
    }

    pub fn image_path(&self) -> PathBuf {
        lock(&self.image_path).clone()
    }

    pub fn image_is_open(&self) -> bool {
        lock(&self.image).is_some()
    }

    /// Park new requests, wait until none is outstanding, flush and close the image.
    /// Pausing a paused device is a no-op. At the timeout the pause is undone.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, LifecycleError> {
        let _admin = self.admin();
        match self.state() {
            DeviceState::Paused => return Ok(Duration::ZERO),
            DeviceState::Stopping => return Err(LifecycleError::Stopping),
            _ => {}
        }
        let before = (self.io.gate(), self.state());
        let start = Instant::now();
        self.io.set_gate(Gate::ParkAll);
        *lock(&self.state) = DeviceState::Pausing;
        log::info!("pause: parking new requests, draining");
        let undo = |e: LifecycleError| {
            self.io.set_gate(before.0);
            *lock(&self.state) = before.1;
            self.io.ring_doorbells();
            log::warn!("pause failed: {e}");
            e
        };
        if let Err(outstanding) = self.drain(timeout) {
            return Err(undo(LifecycleError::PauseTimeout {
                waited_ms: start.elapsed().as_millis() as u64,
                outstanding,
            }));
        }
        let mut image = lock(&self.image);
        if let Some(img) = image.as_ref() {
            if let Err(e) = img.sync() {
                drop(image);
                return Err(undo(LifecycleError::PauseFlush(e)));
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
        self.events.publish("paused", |e| {
            e.state = Some(DeviceState::Paused.name().into())
        });
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
    /// block no larger than the device's) and resume. `save_state` runs once a new image is
    /// in place, before any request reaches it (a successor must open this one). On any
    /// error the device stays paused (or attached, after `serve --paused`) on its old image.
    pub fn unpause(
        &self,
        new_path: Option<PathBuf>,
        save_state: impl FnOnce(),
    ) -> Result<(), LifecycleError> {
        let admin = self.admin();
        self.unpause_locked(&admin, new_path, save_state)
    }

    /// Whether an `unpause` (with a new image if `new_image`) can run now: Ok(true) if there
    /// is something to do, Ok(false) if the device already runs, as asked.
    pub fn can_unpause(&self, new_image: bool) -> Result<bool, LifecycleError> {
        match self.state() {
            DeviceState::Paused | DeviceState::Attached => Ok(true),
            DeviceState::Running if !new_image => Ok(false),
            DeviceState::Stopping => Err(LifecycleError::Stopping),
            other => Err(LifecycleError::NotPaused(other.name())),
        }
    }

    /// `unpause` for a caller that already holds the admin lock (to do more before the
    /// device resumes, and after, with no other command in between).
    pub fn unpause_locked(
        &self,
        _admin: &MutexGuard<'_, ()>,
        new_path: Option<PathBuf>,
        save_state: impl FnOnce(),
    ) -> Result<(), LifecycleError> {
        if !self.can_unpause(new_path.is_some())? {
            return Ok(());
        }
        let state = self.state();
        let current = self.image_path();
        let path = new_path.unwrap_or_else(|| current.clone());
        let reuse = path == current && lock(&self.image).is_some();
        if !reuse {
            let candidate = self.reopen(state, &current, &path)?;
            self.io.set_image_fd(candidate.file.as_raw_fd());
            *lock(&self.image) = Some(candidate);
            *lock(&self.image_path) = path;
            save_state();
        }
        *lock(&self.state) = DeviceState::Running;
        self.io.set_gate(Gate::Open);
        self.io.ring_doorbells();
        log::info!("unpaused on {}", self.image_path().display());
        self.events.publish("unpaused", |e| {
            e.state = Some(DeviceState::Running.name().into())
        });
        Ok(())
    }

    /// Opens the image at `path` for `unpause` from `state` and checks it fits the device; on
    /// an error an attached device is put back on its `current` image.
    fn reopen(
        &self,
        state: DeviceState,
        current: &std::path::Path,
        path: &std::path::Path,
    ) -> Result<Image, LifecycleError> {
        let shown = current.display().to_string();
        let reopen = |msg: String| LifecycleError::Reopen(msg, shown.clone());
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
        let candidate = Image::open(path, self.direct).map_err(|e| reopen(e.to_string()));
        let candidate = candidate.and_then(|c| self.fits(c, path).map_err(reopen));
        if candidate.is_err() && state == DeviceState::Attached {
            // Put the device back as it was: attached on its old image.
            if let Ok(old) = Image::open(current, self.direct) {
                self.io.set_image_fd(old.file.as_raw_fd());
                *lock(&self.image) = Some(old);
            }
            self.io.set_gate(Gate::ParkWrites);
            self.io.ring_doorbells();
        }
        candidate
    }

    /// The image if it can replace the device's (same size, no larger logical block).
    fn fits(&self, c: Image, path: &std::path::Path) -> Result<Image, String> {
        if c.size != self.dev_size {
            Err(format!(
                "image {} has {} bytes, the device {}",
                path.display(),
                c.size,
                self.dev_size
            ))
        } else if c.logical_block > self.logical_block {
            Err(format!(
                "image {} needs {}-byte blocks, the device has {}",
                path.display(),
                c.logical_block,
                self.logical_block
            ))
        } else {
            Ok(c)
        }
    }

    /// Before STOP_DEV: parked requests must finish or the kernel's teardown waits for them
    /// forever. Reopen the image if a pause closed it (failing that, they fail with EIO).
    pub fn release_for_stop(&self, save_state: impl FnOnce()) {
        if matches!(self.state(), DeviceState::Paused) {
            if let Err(e) = self.unpause(None, save_state) {
                log::error!("stopping while paused: {e}; parked requests will fail");
            }
        }
        let _admin = self.admin();
        *lock(&self.state) = DeviceState::Stopping;
        self.io.set_gate(Gate::Open);
        self.io.ring_doorbells();
    }

    /// Wait until no request is outstanding.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), LifecycleError> {
        self.drain(timeout).map_err(LifecycleError::IdleTimeout)
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
mod tests {
    use super::*;
    use crate::daemon::tests::daemon_with;
    use std::sync::atomic::Ordering;

    #[test]
    fn stats_are_answered_while_a_pause_drains_and_a_timeout_undoes_it() {
        let (_f, daemon) = daemon_with(1 << 20, 2);
        let busy = daemon.io.stats.queue(1).try_start(|| false); // one request being served
        let s2 = daemon.clone();
        let pause = std::thread::spawn(move || s2.device.pause(Duration::from_millis(400)));
        std::thread::sleep(Duration::from_millis(100));
        // Mid-drain: state and counters answer at once.
        assert_eq!(daemon.device.state(), DeviceState::Pausing);
        assert_eq!(daemon.io.stats.snapshot().outstanding, 1);
        let res = pause.join().expect("pause thread");
        assert!(
            matches!(
                res,
                Err(LifecycleError::PauseTimeout { outstanding: 1, .. })
            ),
            "{res:?}"
        );
        assert_eq!(
            (daemon.device.state(), daemon.io.gate()),
            (DeviceState::Running, Gate::Open)
        );
        assert!(
            daemon.device.image_is_open(),
            "a failed pause keeps the image"
        );

        drop(busy); // completed
        daemon.device.pause(Duration::from_secs(1)).expect("pause");
        assert_eq!(daemon.device.state(), DeviceState::Paused);
        assert!(!daemon.device.image_is_open(), "paused means closed");
        assert_eq!(daemon.io.image_fd().load(Ordering::SeqCst), -1);
        assert!(
            daemon.device.pause(Duration::from_secs(1)).is_ok(),
            "pausing a paused device is a no-op"
        );
        daemon.unpause(None).expect("unpause");
        assert!(daemon.device.image_is_open());
        assert_eq!(daemon.io.gate(), Gate::Open);
    }

    #[test]
    fn unpause_onto_a_wrong_image_stays_paused() {
        let (_f, daemon) = daemon_with(1 << 20, 2);
        daemon.device.pause(Duration::from_secs(1)).expect("pause");
        let small = tempfile::NamedTempFile::new().expect("tempfile");
        small.as_file().set_len(4096).expect("size");
        let err = daemon
            .unpause(Some(small.path().to_owned()))
            .expect_err("size differs");
        assert!(err.to_string().contains("stays paused"), "{err}");
        assert_eq!(daemon.device.state(), DeviceState::Paused);
        assert_eq!(daemon.io.gate(), Gate::ParkAll);
        let missing = daemon
            .unpause(Some("/nonexistent.img".into()))
            .expect_err("missing");
        assert!(matches!(missing, LifecycleError::Reopen(..)));
        daemon.unpause(None).expect("the old image is still fine");
    }
}
