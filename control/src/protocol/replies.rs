//! Typed results of every command: what `result` holds in an `ok` reply.
//!
//! One struct per command (PROTOCOL.md's "result" column), with exactly the keys the daemon
//! sends today, in both directions: the daemon builds them ([`Response`] serializes to the
//! `result` object), `ublk-mirror-ctl` and other Rust clients parse them
//! ([`Response::parse`], [`crate::client::Client::call`]). A key whose value may be absent is
//! an `Option` serialized as `null`, never dropped: clients that look for the key find it.
//! Unknown keys are ignored when parsing, so an older client reads a newer daemon's reply.
//!
//! States and kinds stay strings (their values are listed on each field), so a client parses
//! a state it does not know yet instead of refusing the whole reply. Counts are `u64` unless
//! the daemon's own type is narrower.
//!
//! The key paths and value kinds are checked against the daemon's golden file
//! (`ublk-mirror/tests/golden/control-reply-keys.txt`) by this module's tests.

use serde::{Deserialize, Serialize};

use super::Command;

/// `info`: the device and its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoReply {
    /// The block device, e.g. `/dev/ublkb0`.
    pub device: String,
    pub dev_id: u32,
    /// Device size in bytes.
    pub size: u64,
    /// The image's path (the current one, also while paused).
    pub image: String,
    /// False while paused (the image is closed and its lock released).
    pub image_open: bool,
    pub queues: u16,
    pub depth: u16,
    /// Largest request the device takes, in bytes.
    pub max_io_bytes: u32,
    pub logical_block_size: u32,
    /// `attached`, `running`, `pausing`, `paused` or `stopping`.
    pub state: String,
    /// The `--label` the daemon was started with.
    pub label: String,
    /// The daemon's process id (tap-ctl's `-p PID`); 0 from a daemon too old to say.
    #[serde(default)]
    pub pid: u32,
}

/// `stats`: request counters and the mirror (names as `tap-ctl stats` where they overlap).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// The label.
    pub name: String,
    /// As [`InfoReply::state`].
    pub state: String,
    /// Requests issued to a leg and not yet completed (tapdisk's name).
    pub reqs_outstanding: u64,
    /// Requests held by a pause.
    pub reqs_parked: u64,
    /// 1 once a mirror failed (until `mirror-stop`, `mirror-start` or `unpause --mirror`), else 0.
    pub nbd_mirror_failed: u8,
    pub ops: OpsReport,
    pub mirror: MirrorReport,
    /// tapdisk's fd hand-off socket (`serve --tapdisk-compat`); null without it.
    #[serde(default)]
    pub fd_receiver: Option<FdReceiverReport>,
}

/// `stats.fd_receiver`: what tapdisk's `nbdclient<pid>` socket received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdReceiverReport {
    /// Its path, `DIR/nbdclient<pid>`.
    pub socket: String,
    /// fds stored (a name sent again counts again: it replaces the old fd).
    pub received: u64,
    /// Messages refused and their fds closed: no fd, several, not a socket, a bad name,
    /// over the cap, a peer that is not root or the daemon's user.
    pub refused: u64,
}

/// `stats.ops`: what the guest asked for, per kind of request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpsReport {
    pub read: ByteOps,
    pub write: WriteOps,
    pub flush: CountOps,
    pub discard: ByteOps,
    pub write_zeroes: ByteOps,
    /// Requests completed with an error.
    pub errors: u64,
}

/// Requests of one kind and the bytes they covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteOps {
    pub count: u64,
    pub bytes: u64,
}

/// Writes, and how many of them were FUA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOps {
    pub count: u64,
    pub bytes: u64,
    pub fua: u64,
}

/// Requests of a kind that carries no bytes (flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountOps {
    pub count: u64,
}

/// `stats.mirror`, in one of its two shapes: with a link to a target or without one.
///
/// Serialized as the inner object (no tag). Parsing tries [`MirrorReport::Attached`] first: it
/// requires keys ([`MirrorAttached::export`] and others) the other shape never has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MirrorReport {
    /// A mirror is attached (connecting, active, failed or stopping).
    Attached(Box<MirrorAttached>),
    /// No mirror: never started, stopped, or failed in a previous daemon.
    Off(MirrorOff),
}

impl MirrorReport {
    /// The mirror's state, in either shape.
    pub fn state(&self) -> &str {
        match self {
            MirrorReport::Attached(m) => &m.state,
            MirrorReport::Off(m) => &m.state,
        }
    }

    /// Why the mirror failed, if it did.
    pub fn last_error(&self) -> Option<&str> {
        match self {
            MirrorReport::Attached(m) => m.last_error.as_deref(),
            MirrorReport::Off(m) => m.last_error.as_deref(),
        }
    }

    /// The background copy or resync, if one runs or ran on this mirror.
    pub fn copy(&self) -> Option<&CopyReport> {
        match self {
            MirrorReport::Attached(m) => m.copy.as_ref(),
            MirrorReport::Off(_) => None,
        }
    }
}

/// `stats.mirror` without a mirror. The link's counters are 0 and `target` is `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorOff {
    /// `off`, or `failed` after a recovery from a daemon whose mirror had failed.
    pub state: String,
    /// The fd name last asked for (`mirror-start`, `unpause --mirror`), `null` if none.
    pub requested: Option<String>,
    /// Always `null` in this shape.
    pub target: Option<String>,
    /// Always 0 in this shape.
    pub in_flight: u64,
    /// Always 0 in this shape.
    pub ops: u64,
    /// Always 0 in this shape.
    pub bytes_mirrored: u64,
    /// The inherited failure, `null` if none.
    pub last_error: Option<String>,
    /// Bytes marked out of sync.
    pub dirty_bytes: u64,
    /// Whether the out-of-sync map is backed by a bitmap file.
    pub bitmap_persistent: bool,
    /// Extents in the activity log.
    pub activity_log_extents: u64,
}

/// `stats.mirror` with a mirror attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorAttached {
    /// `connecting`, `active`, `failed` or `stopping`.
    pub state: String,
    /// The fd name last asked for, `null` if none.
    pub requested: Option<String>,
    /// The stored fd's name the mirror runs on (the first connection's).
    pub target: String,
    /// Every connection's stored fd name, in connection order (queue `i` drives connection
    /// `i`).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Connections to the target.
    #[serde(default)]
    pub connections: u64,
    /// The NBD export's name.
    pub export: String,
    /// The NBD export's size in bytes.
    pub export_size: u64,
    /// Whether a guest FLUSH (and FUA) reaches the target's stable storage: false for an
    /// export without FLUSH mirrored with `allow_no_flush`.
    #[serde(default = "yes")]
    pub durable: bool,
    /// Seconds a request may wait for the target, `null` for no limit.
    pub timeout: Option<f64>,
    /// Requests sent to the target and not yet answered.
    pub in_flight: u64,
    /// Requests the target answered.
    pub ops: u64,
    pub bytes_mirrored: u64,
    /// Why the mirror failed, `null` while it has not.
    pub last_error: Option<String>,
    /// When it failed (Unix time in seconds), `null` while it has not.
    pub failed_at: Option<f64>,
    /// Bytes marked out of sync.
    pub dirty_bytes: u64,
    /// Whether the out-of-sync map is backed by a bitmap file.
    pub bitmap_persistent: bool,
    /// Extents in the activity log.
    pub activity_log_extents: u64,
    /// The most extents the activity log keeps hot while mirroring (`--al-extents`).
    #[serde(default)]
    pub activity_log_bound: u64,
    /// Writes of the activity log to disk (cold extents logged, retirements) since start.
    #[serde(default)]
    pub activity_log_writes: u64,
    /// Mirrored writes that waited for the activity log to reach the disk since start (more
    /// than the writes when several share one).
    #[serde(default)]
    pub activity_log_waits: u64,
    /// Extents retired from the hot set (least recently used first) since start.
    #[serde(default)]
    pub activity_log_retired: u64,
    /// Ranges held in the range lock.
    pub range_locks: u64,
    /// The background copy or resync, `null` if none was started with this mirror.
    pub copy: Option<CopyReport>,
}

/// `durable`'s value in a reply from a daemon that predates it (every mirror was durable).
fn yes() -> bool {
    true
}

/// A background copy or resync: `stats.mirror.copy`, and the result of `mirror-wait-ready`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// `copy` or `resync`.
    pub kind: String,
    /// `copying`, `ready`, `failed` or `cancelled`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes per second (whole numbers, sent as a float).
    pub rate: f64,
    /// Seconds left (whole), `null` while the rate is 0.
    pub eta: Option<f64>,
    /// Seconds since the copy started (stops moving once it ended).
    pub elapsed: f64,
    /// The `speed` limit in bytes per second, `null` for none.
    pub speed_limit: Option<u64>,
    /// Held by `mirror-copy-pause` (the state stays `copying`).
    #[serde(default)]
    pub paused: bool,
}

/// One line of `watch`: the snapshot that answers it (its `result`), and each event after it,
/// written as a line of its own. Every key is always there (null when it does not apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The line's number on this watch connection: 0 for the snapshot, then 1, 2, ... (a
    /// watcher that falls behind gets `lagged` and is closed, never a gap).
    pub seq: u64,
    /// Unix time, seconds.
    pub time: f64,
    /// `snapshot`, `paused`, `unpaused`, `mirror-active`, `mirror-failed`, `mirror-stopped`,
    /// `copy-progress` (at most once a second while copying), `copy-ready`, `copy-ended`
    /// (failed or cancelled), `lagged` (the last line before a watcher that does not read is
    /// dropped).
    pub event: String,
    /// The device's state (`info.state`): in the snapshot, `paused` and `unpaused`.
    pub state: Option<String>,
    /// The mirror's state (`stats.mirror.state`): in the snapshot and `mirror-*`.
    pub mirror: Option<String>,
    /// Why: a failure's reason (`mirror-failed`), how a copy ended (`copy-ended`), `lagged`'s.
    pub reason: Option<String>,
    /// The copy, as in `stats.mirror.copy`: in the snapshot and `copy-*`.
    pub copy: Option<CopyReport>,
}

/// `pause`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PauseReply {
    /// How long the drain took, in milliseconds.
    pub drain_ms: f64,
}

/// `unpause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpauseReply {
    /// The device's state afterwards, as [`InfoReply::state`].
    pub state: String,
    /// As [`StatsReply::nbd_mirror_failed`], right after the unpause: 1 when `mirror` named a
    /// target that could not be opened (the device resumed anyway, as tapdisk does).
    #[serde(default)]
    pub nbd_mirror_failed: u8,
    /// Why that target could not be opened; null otherwise.
    #[serde(default)]
    pub mirror_error: Option<String>,
}

/// `pass-fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassFdReply {
    pub name: String,
    /// Whether an fd of that name was replaced (and closed).
    pub replaced: bool,
}

/// `list-fds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFdsReply {
    pub fds: Vec<StoredFdReport>,
}

/// One stored fd in `list-fds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFdReport {
    pub name: String,
    /// `unix`, `inet`, `inet6` or `unknown`.
    pub family: String,
    /// Whether the sender ran the NBD handshake.
    pub negotiated: bool,
    /// The negotiated export's name, `null` if not negotiated.
    pub export: Option<String>,
}

/// `close-fd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseFdReply {
    pub name: String,
}

/// `wait-idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitIdleReply {
    /// Always 0: the reply comes once none is outstanding.
    pub reqs_outstanding: u64,
    /// As [`StatsReply::nbd_mirror_failed`].
    pub nbd_mirror_failed: u8,
}

/// `mirror-start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStartReply {
    /// The mirror's state (`active` once the reply comes).
    pub state: String,
    /// The NBD export's name.
    pub export: String,
    /// The NBD export's size in bytes.
    pub size: u64,
}

/// `mirror-stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStopReply {
    /// Whether a mirror was attached and stopped.
    pub stopped: bool,
}

/// `dirty-map`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyMapReply {
    /// Bytes per bit of the map.
    pub granularity: u64,
    pub dirty_bytes: u64,
    /// `[offset, length]` in bytes, ascending.
    pub extents: Vec<[u64; 2]>,
}

/// `shutdown`: an empty object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShutdownReply {}

/// The result of any command. Serializes as the bare result object (no tag), which is what
/// the daemon sends; a client parses it with [`Response::parse`], knowing what it asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Response {
    Info(InfoReply),
    /// Boxed: by far the largest reply.
    Stats(Box<StatsReply>),
    Pause(PauseReply),
    Unpause(UnpauseReply),
    PassFd(PassFdReply),
    ListFds(ListFdsReply),
    CloseFd(CloseFdReply),
    WaitIdle(WaitIdleReply),
    Shutdown(ShutdownReply),
    MirrorStart(MirrorStartReply),
    /// The copy, as in `stats.mirror.copy`.
    MirrorWaitReady(CopyReport),
    MirrorStop(MirrorStopReply),
    DirtyMap(DirtyMapReply),
    /// `mirror-set-speed`, `mirror-copy-pause`, `mirror-copy-resume`: the copy afterwards.
    CopyControl(CopyReport),
    /// `watch`: the snapshot; events follow as lines of their own.
    Watch(Box<Event>),
}

impl Response {
    /// Parses `result`, the reply's result to `command`, into that command's type.
    pub fn parse(command: &Command, result: serde_json::Value) -> serde_json::Result<Response> {
        use serde_json::from_value as of;
        Ok(match command {
            Command::Info => Response::Info(of(result)?),
            Command::Stats => Response::Stats(Box::new(of(result)?)),
            Command::Pause { .. } => Response::Pause(of(result)?),
            Command::Unpause { .. } => Response::Unpause(of(result)?),
            Command::PassFd { .. } => Response::PassFd(of(result)?),
            Command::ListFds => Response::ListFds(of(result)?),
            Command::CloseFd { .. } => Response::CloseFd(of(result)?),
            Command::WaitIdle { .. } => Response::WaitIdle(of(result)?),
            Command::Shutdown { .. } => Response::Shutdown(of(result)?),
            Command::MirrorStart { .. } => Response::MirrorStart(of(result)?),
            Command::MirrorWaitReady { .. } => Response::MirrorWaitReady(of(result)?),
            Command::MirrorStop => Response::MirrorStop(of(result)?),
            Command::DirtyMap => Response::DirtyMap(of(result)?),
            Command::MirrorSetSpeed { .. }
            | Command::MirrorCopyPause
            | Command::MirrorCopyResume => Response::CopyControl(of(result)?),
            Command::Watch => Response::Watch(Box::new(of(result)?)),
        })
    }
}

#[cfg(test)]
mod tests;
