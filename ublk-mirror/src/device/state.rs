//! The daemon's state file: everything a successor needs to take over a device whose daemon
//! died (or detached for an upgrade), in `/run/ublk-mirror/N.state`.
//!
//! Written atomically (a temporary file, fsync, rename, fsync of the directory) whenever what
//! it records changes: when the device is added, when an unpause moves the image, when a mirror
//! starts or stops. Removed when the device is deleted; kept by a crash and by `shutdown
//! --keep`, and read by `ublk-mirror recover`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::image::DirectMode;
use crate::run_dir::RUN_DIR;

const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorRecord {
    /// The first connection's fd name (what older daemons recorded).
    pub target: String,
    /// Every connection's fd name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonState {
    pub version: u32,
    pub dev_id: u32,
    /// The daemon that wrote it last.
    pub pid: u32,
    pub image: PathBuf,
    pub direct: DirectMode,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    pub label: String,
    /// None: no control socket.
    pub control: Option<PathBuf>,
    pub bitmap: Option<PathBuf>,
    pub granularity: u64,
    /// The activity log's bound (`--al-extents`); absent in files of older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub al_extents: Option<usize>,
    /// The mirror attached when this was written: after a crash it must be treated as failed.
    pub mirror: Option<MirrorRecord>,
    /// Set by `shutdown --keep`: the daemon left on purpose, the image was flushed.
    pub detached: bool,
    /// `--tapdisk-compat`'s directory (the successor listens there too and removes this
    /// pid's socket); absent without it, and in files of older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tapdisk_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "no state file {0}: nothing to recover (was device created by ublk-mirror since boot?)"
    )]
    Missing(PathBuf),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a ublk-mirror state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: version {found}, this daemon reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn path_for(dev_id: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{dev_id}.state"))
}

impl DaemonState {
    pub const CURRENT_VERSION: u32 = VERSION;

    pub fn load(path: &Path) -> Result<DaemonState, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing(path.to_owned()))
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let s: DaemonState = serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if s.version != VERSION {
            return Err(StateError::Version {
                path: path.to_owned(),
                found: s.version,
            });
        }
        Ok(s)
    }

    /// Replaces `path` atomically: a reader sees the old or the new file, never a torn one,
    /// and a crash right after this returns keeps the new one.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = path.with_extension(format!("state.tmp{}", std::process::id()));
        let mut text =
            serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        text.push(b'\n');
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }
}

#[cfg(test)]
mod tests;
