//! The state record: what `ublk-mirror recover` needs (the format is `state.rs`), kept in
//! memory once the device has an id and written to the state file on every change.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::datapath::io_path::IoPath;
use crate::device::state::{self, DaemonState, MirrorRecord};
use crate::lock::lock;

/// The record, `None` until `serve` fills it in.
#[derive(Default)]
pub struct StateRecord {
    record: Mutex<Option<DaemonState>>,
}

impl StateRecord {
    /// Sets what is recorded (at start).
    pub fn set(&self, rec: DaemonState) {
        *lock(&self.record) = Some(rec);
    }

    /// Records the device id the driver picked and the control socket's path.
    pub fn set_device(&self, dev_id: u32, control: Option<PathBuf>) {
        if let Some(r) = lock(&self.record).as_mut() {
            r.dev_id = dev_id;
            r.control = control;
        }
    }

    /// Rewrites the state file with the current `image` and `mirror`; a no-op before the
    /// device has an id. A failure is logged: the device keeps serving, only recovery would
    /// suffer.
    pub fn save(&self, image: PathBuf, mirror: Option<MirrorRecord>, detached: bool) {
        let mut rec = lock(&self.record);
        let Some(r) = rec.as_mut() else { return };
        r.pid = std::process::id();
        r.image = image;
        r.mirror = mirror;
        r.detached = detached;
        if let Err(e) = r.save(&state::path_for(r.dev_id)) {
            log::error!("{:#}", anyhow::Error::from(e));
        }
    }

    /// Deletes the state file (the device is gone).
    pub fn remove(&self) {
        if let Some(r) = lock(&self.record).take() {
            let _ = std::fs::remove_file(state::path_for(r.dev_id));
        }
    }
}

/// What the state file records of the mirror attached to `io`, if any.
pub fn mirror_record(io: &IoPath) -> Option<MirrorRecord> {
    io.mirror().as_ref().map(|m| MirrorRecord {
        target: m.name.clone(),
        targets: m.names(),
        export: m.export.name.clone(),
    })
}
