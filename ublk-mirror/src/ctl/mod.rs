//! The daemon's control socket (protocol: `control/PROTOCOL.md`).
//!
//! `socket.rs` listens, admits clients and assembles lines (one thread per connected client,
//! so a pause that takes seconds never delays a `stats` from another client; every read is a
//! recvmsg with room for one fd, bound to the first line that ends in the same read);
//! `dispatch.rs` checks a line and hands its command to one handler; `handlers.rs` holds one
//! short function per command; `report.rs` builds the JSON of `info`, `stats` and the copy.
//!
//! Named `ctl` rather than `control`: the protocol crate is `control`, and a module of that
//! name would shadow it in every path of the crate root.

use std::path::{Path, PathBuf};

use crate::run_dir::RUN_DIR;

pub mod dispatch;
#[cfg(test)]
mod fuzz;
mod handlers;
mod report;
pub mod socket;
pub mod tapdisk_fds;
#[cfg(test)]
pub(crate) mod tests;
mod watch;

/// Where the control socket goes.
#[derive(Debug, Clone)]
pub enum ControlPath {
    /// `/run/ublk-mirror/<dev-id>.sock`.
    Default,
    Path(PathBuf),
}

impl ControlPath {
    pub fn resolve(&self, dev_id: u32) -> PathBuf {
        match self {
            ControlPath::Default => Path::new(RUN_DIR).join(format!("{dev_id}.sock")),
            ControlPath::Path(p) => p.clone(),
        }
    }
}

/// What `info` reports besides the shared state.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub dev_id: u32,
    pub bdev: String,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
}
