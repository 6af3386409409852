//! Mirroring as the control plane runs it: start (attach the target on a stored fd, publish the
//! link to the data path, start the copy or resync), stop, and the failure inherited from a
//! previous daemon that was mirroring. The caller holds the device's admin lock and saves the
//! state record after a change.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use arc_swap::ArcSwapOption;
use control::protocol::code;
use nbd_proxy::client::Export;
use nbd_proxy::proto::tx_flags;

use crate::datapath::io_path::{IoPath, MirrorSwitches};
use crate::events::Events;
use crate::fd_store::{FdStore, StoredFd};
use crate::lock::lock;
use crate::mirror::attach::{self, DeviceNeeds};
use crate::mirror::copy::{self, CopyJob};
use crate::mirror::link::{Mirror, MirrorState};

/// What a new mirror copies in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPlan {
    /// New writes only.
    None,
    /// Everything: the whole device is marked out of sync, then copied (sparse-aware; with
    /// `target_is_zero` holes are not sent at all).
    Copy {
        speed: Option<u64>,
        target_is_zero: bool,
    },
    /// What the out-of-sync map holds (since a failure, plus what a copy had not reached).
    Resync { speed: Option<u64> },
}

/// Why a mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("no fd named {0:?} (pass-fd it first)")]
    NoSuchFd(String),
    #[error("mirror refused: {0}")]
    Refused(String),
    /// The connection could not be opened: an I/O error or a failed NBD handshake (peer
    /// gone, garbage, no such export). `unpause` resumes anyway and reports the mirror failed,
    /// as tapdisk does with a secondary it cannot open.
    #[error("mirror target unreachable: {0}")]
    Unreachable(String),
    #[error("a mirror is already {0}; mirror-stop it first")]
    Busy(&'static str),
}

impl MirrorError {
    /// The control protocol's error code (`control/PROTOCOL.md`).
    pub fn code(&self) -> &'static str {
        match self {
            MirrorError::NoSuchFd(_) => code::NO_SUCH_FD,
            MirrorError::Refused(_) | MirrorError::Unreachable(_) => code::MIRROR_REFUSED,
            MirrorError::Busy(_) => code::BAD_STATE,
        }
    }
}

/// Where and how to mirror (`mirror-start`, or `unpause --mirror`).
#[derive(Debug, Clone, Copy)]
pub struct MirrorTarget<'a> {
    /// The stored fds to the target: one connection each.
    pub fd_names: &'a [String],
    /// The export to ask for, unless the fd came negotiated.
    pub export_name: &'a str,
    /// How long a request may wait for the target (None: forever).
    pub timeout: Option<Duration>,
    pub plan: CopyPlan,
    /// Refuse an export without FLUSH (the default); false mirrors to one anyway, and a
    /// guest flush then promises nothing about the target.
    pub need_flush: bool,
}

/// What `mirror-stop` found to stop.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The mirror on this fd name.
    Mirror(String),
    /// No mirror, but a failure inherited from a previous daemon, now acknowledged.
    InheritedFailure,
    Nothing,
}

/// A target whose connections are in the transmission phase and whose export passed the
/// checks: what `Mirroring::begin` publishes. Dropping it closes the connections.
pub struct Attached {
    conns: Vec<(String, OwnedFd)>,
    export: Export,
}

impl Attached {
    /// Hands the connections back to `fds` as negotiated fds (each under its own name), so a
    /// retry of the command that attached them finds them where they were.
    pub fn restore(self, fds: &FdStore) {
        for (name, fd) in self.conns {
            let nbd = control::protocol::NegotiatedNbd {
                export: self.export.name.clone(),
                size: self.export.size,
                flags: self.export.flags,
                block_size: self.export.block_size.to_array(),
            };
            if let Err(e) = fds.store(&name, StoredFd { fd, nbd: Some(nbd) }) {
                log::warn!("connection {name:?} could not be stored again ({e}); closed it");
            }
        }
    }
}

pub struct Mirroring {
    io: MirrorSwitches,
    /// Told when a mirror becomes active, fails or stops (`watch`).
    events: Arc<Events>,
    /// Serializes telling the activity log whether a mirror takes writes (`mirror_changed`).
    al_mode: Arc<Mutex<()>>,
    /// The background copy or resync of the current mirror, if any.
    pub copy: ArcSwapOption<CopyJob>,
    /// The fd name the last `mirror-start NAME` or `unpause --mirror NAME` mirrored to (None
    /// after `unpause --mirror null`; kept by `mirror-stop`); `stats` shows it as
    /// `mirror.requested`.
    pub request: Mutex<Option<String>>,
    /// A failure with no link in the slot, and why: this daemon recovered a device whose
    /// previous daemon was mirroring, or `unpause --mirror` could not open the target. The
    /// target missed writes, so `nbd_mirror_failed` reads 1 until the next mirror-start or
    /// mirror-stop.
    unlinked_failure: Mutex<Option<String>>,
}

impl Mirroring {
    pub fn new(io: MirrorSwitches, events: Arc<Events>) -> Mirroring {
        Mirroring {
            io,
            events,
            al_mode: Arc::new(Mutex::new(())),
            copy: ArcSwapOption::empty(),
            request: Mutex::new(None),
            unlinked_failure: Mutex::new(None),
        }
    }

    /// Attaches a mirror over the stored fds `target.fd_names` (see `attach`), then
    /// publishes it (see `begin`). On error the fds are closed and nothing else changes.
    pub fn start(
        &self,
        fds: &FdStore,
        target: MirrorTarget<'_>,
        needs: DeviceNeeds,
    ) -> Result<Arc<Mirror>, MirrorError> {
        let attached = self.attach(fds, target, needs)?;
        Ok(self.begin(attached, target))
    }

    /// Takes the stored fds `target.fd_names`, runs the NBD handshake on each unless it came
    /// negotiated, and checks that they agree and that the export can take this device.
    /// Nothing is published: the data path does not know of them yet.
    pub fn attach(
        &self,
        fds: &FdStore,
        target: MirrorTarget<'_>,
        needs: DeviceNeeds,
    ) -> Result<Attached, MirrorError> {
        if let Some(m) = self.io.mirror() {
            if m.state() != MirrorState::Failed {
                return Err(MirrorError::Busy(m.state().name()));
            }
        }
        let (conns, export) = attach_all(fds, target, needs, self.io.queues())?;
        Ok(Attached { conns, export })
    }

    /// Publishes an attached target and starts the copy `target.plan` asks for; returns once
    /// the mirror is active (every write that started local-only has completed and marked
    /// itself out of sync, or 30 s have passed). Each connection is driven by its owner
    /// queue's ring, started when the publish rings that queue's doorbell.
    pub fn begin(&self, attached: Attached, target: MirrorTarget<'_>) -> Arc<Mirror> {
        let (io, al_mode) = (Arc::downgrade(&self.io), self.al_mode.clone());
        let events = self.events.clone();
        let on_failure = Box::new(move || on_mirror_failure(&io, &al_mode, &events));
        let mirror = Mirror::new(
            attached.conns,
            attached.export,
            target.timeout,
            self.io.mail.clone(),
            on_failure,
        );
        self.publish(&mirror);
        self.start_copy(&mirror, target.plan);
        log::info!(
            "mirroring to {:?} (export {:?}, {} bytes, {} connection(s), timeout {})",
            mirror.names(),
            mirror.export.name,
            mirror.export.size,
            mirror.connections().len(),
            target
                .timeout
                .map_or("none".to_string(), |t| format!("{} s", t.as_secs_f64()))
        );
        mirror
    }

    /// Publishes `mirror` to the queues, then waits for writes that began local-only (they
    /// mark themselves dirty); the store and the gauge loads are SeqCst, paired with the
    /// queues' side.
    fn publish(&self, mirror: &Arc<Mirror>) {
        self.io.start_tracking();
        self.io.set_mirror(Some(mirror.clone()));
        self.mirror_changed();
        let start = Instant::now();
        while self.io.stats.local_only() > 0 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(200));
        }
        mirror.set_active();
        self.clear_unlinked();
        self.events.publish("mirror-active", |e| {
            e.mirror = Some(mirror.state().name().into())
        });
    }

    /// Cancels the previous copy job, if any, and starts the one `plan` asks for.
    fn start_copy(&self, mirror: &Arc<Mirror>, plan: CopyPlan) {
        if let Some(old) = self.copy.swap(None) {
            old.cancel();
        }
        let job = match plan {
            CopyPlan::None => None,
            CopyPlan::Copy {
                speed,
                target_is_zero,
            } => {
                // A full copy is a resync of everything.
                self.io.dirty.mark_all();
                Some((copy::CopyKind::Copy, speed, target_is_zero))
            }
            CopyPlan::Resync { speed } => Some((copy::CopyKind::Resync, speed, false)),
        };
        if let Some((kind, speed, target_is_zero)) = job {
            // Each chunk is one NBD WRITE: no larger than the export takes.
            let max = u64::from(mirror.export.block_size.maximum);
            let chunk = copy::DEFAULT_CHUNK.min(if max == 0 { u64::MAX } else { max });
            let opts = copy::CopyOptions {
                speed,
                target_is_zero,
                chunk,
            };
            let job = copy::start(self.io.clone(), mirror.clone(), kind, opts);
            self.copy.store(Some(job));
        }
    }

    /// Ends mirroring cleanly: requests in flight to the target complete (for up to 30 s; the
    /// rest are failed back and marked out of sync), then disconnect, and the activity log is
    /// emptied as the last writes end. The failed flag is cleared with it (as `tap-ctl
    /// unpause -2 null`).
    pub fn stop(&self) -> Stopped {
        let Some(m) = self.io.mirror() else {
            // The orchestrator acknowledges a failure inherited from a previous daemon.
            return if self.clear_unlinked() {
                Stopped::InheritedFailure
            } else {
                Stopped::Nothing
            };
        };
        if let Some(job) = self.copy.swap(None) {
            job.cancel();
        }
        m.stop(Duration::from_secs(30));
        self.io.set_mirror(None);
        self.mirror_changed();
        self.clear_unlinked();
        self.events
            .publish("mirror-stopped", |e| e.mirror = Some("off".into()));
        Stopped::Mirror(m.name.clone())
    }

    fn mirror_changed(&self) {
        mirror_changed(&self.io, &self.al_mode);
    }

    pub fn mirror_failed(&self) -> bool {
        self.io.mirror().as_ref().is_some_and(|m| m.failed())
            || lock(&self.unlinked_failure).is_some()
    }

    /// A previous daemon of this device died (or detached) while mirroring.
    pub fn inherit_failure(&self, why: String) {
        self.fail_unlinked(why);
    }

    /// The mirror failed before it had a link (`unpause --mirror` could not open the
    /// target): from now on writes are tracked as out of sync, as after a link failure.
    pub fn fail_unlinked(&self, why: String) {
        log::warn!("nbd_mirror_failed=1: {why}");
        self.events.publish("mirror-failed", |e| {
            e.mirror = Some("failed".into());
            e.reason = Some(why.clone());
        });
        *lock(&self.unlinked_failure) = Some(why);
        self.io.start_tracking();
    }

    fn clear_unlinked(&self) -> bool {
        lock(&self.unlinked_failure).take().is_some()
    }

    /// Why the mirror failed when there is no link to ask (see `unlinked_failure`).
    pub fn unlinked_failure(&self) -> Option<String> {
        lock(&self.unlinked_failure).clone()
    }
}

/// Takes the stored fds `target.fd_names` and brings each into the transmission phase; Err
/// unless there is at least one and at most one per queue, all fds exist, every handshake
/// succeeds, all agree on the export, the export can take the device, and (with more than
/// one) the export allows several connections.
fn attach_all(
    fds: &FdStore,
    target: MirrorTarget<'_>,
    needs: DeviceNeeds,
    queues: u16,
) -> Result<(Vec<(String, OwnedFd)>, Export), MirrorError> {
    let names = target.fd_names;
    if names.is_empty() || names.len() > usize::from(queues) {
        return Err(MirrorError::Refused(format!(
            "{} connection(s) for a device with {queues} queue(s): give 1 to {queues}",
            names.len()
        )));
    }
    if let Some(missing) = names.iter().find(|n| !fds.contains(n)) {
        return Err(MirrorError::NoSuchFd(missing.clone()));
    }
    let mut conns = Vec::with_capacity(names.len());
    let mut first: Option<Export> = None;
    for name in names {
        let stored = fds
            .take(name)
            .ok_or_else(|| MirrorError::NoSuchFd(name.clone()))?;
        let (stream, export) = attach::connect(stored.fd, stored.nbd, target.export_name)
            .map_err(|why| MirrorError::Unreachable(format!("connection {name:?}: {why}")))?;
        match &first {
            None => {
                attach::check_export(&export, needs, target.need_flush)
                    .map_err(MirrorError::Refused)?;
                first = Some(export);
            }
            Some(f) => attach::check_same(f, &export)
                .map_err(|why| MirrorError::Refused(format!("connection {name:?}: {why}")))?,
        }
        conns.push((name.clone(), attach::into_fd(stream)));
    }
    let export = first.ok_or_else(|| MirrorError::Refused("no connection".into()))?;
    if conns.len() > 1 && !export.has(tx_flags::CAN_MULTI_CONN) {
        return Err(MirrorError::Refused(format!(
            "export {:?} does not allow several connections (no CAN_MULTI_CONN: a FLUSH on \
             one would not cover writes on the others); mirror over one",
            export.name
        )));
    }
    Ok((conns, export))
}

/// The link's `on_failure`: weak, so a link outliving the daemon's data path does nothing.
fn on_mirror_failure(io: &Weak<IoPath>, al_mode: &Mutex<()>, events: &Events) {
    if let Some(io) = io.upgrade() {
        mirror_changed(&io, al_mode);
        let reason = io.mirror().and_then(|m| m.failure()).map(|f| f.0);
        events.publish("mirror-failed", |e| {
            e.mirror = Some("failed".into());
            e.reason = reason;
        });
    }
}

/// After every change of whether a mirror takes writes (published, failed, stopped):
/// tells the activity log, which, while none does, is emptied as the writes end (see
/// `DirtyMap::set_mirroring`). Each call reads the slot under `al_mode`, so the last one
/// leaves the log in the mode that matches the slot, whatever the order of the callers.
fn mirror_changed(io: &IoPath, al_mode: &Mutex<()>) {
    let _g = lock(al_mode);
    let mirroring = io.mirror().as_ref().is_some_and(|m| m.takes_io());
    let cleared = io.dirty.set_mirroring(mirroring);
    if cleared > 0 {
        log::info!(
            "activity log: {cleared} idle extents cleared (no mirror takes writes; the \
             out-of-sync bitmap holds every write that may differ and is written back)"
        );
    }
}
