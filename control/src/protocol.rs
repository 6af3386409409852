//! Messages. One request or reply per line, UTF-8 JSON, at most [`MAX_LINE`] bytes.
//!
//! Every command here is served by the daemon (`ublk-mirror/src/ctl/`) and has a
//! verb of the same name in `ublk-mirror-ctl`; the one older name still accepted is
//! `wait-ready` for `mirror-wait-ready`.
//!
//! Requests are [`Request`]s carrying a [`Command`]; replies are [`Reply`]s whose `result` is
//! the command's reply type ([`InfoReply`], [`StatsReply`], ... gathered in [`Response`]), with
//! exactly the keys the daemon sends, `null` ones included.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod replies;
pub use replies::*;

pub const VERSION: u32 = 1;
/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest fd name.
pub const MAX_FD_NAME: usize = 255;
/// fds a daemon keeps at once.
pub const MAX_FDS: usize = 40;

/// Defaults of the commands' `timeout` arguments, in seconds (PROTOCOL.md's table).
pub mod defaults {
    /// `pause`: how long the drain may take.
    pub const PAUSE_TIMEOUT: f64 = 30.0;
    /// `wait-idle`: how long to wait for no request outstanding.
    pub const WAIT_IDLE_TIMEOUT: f64 = 30.0;
    /// `mirror-start`: how long a request may wait for the target before the mirror fails:
    /// well under a guest's own disk timeout (30 s or more), long enough for a busy target.
    pub const MIRROR_TIMEOUT: f64 = 10.0;
    /// `mirror-wait-ready`: how long to wait for the copy or resync (one day).
    pub const MIRROR_WAIT_READY_TIMEOUT: f64 = 86_400.0;
}

/// Largest `timeout` other than 0, in seconds (one day).
pub const MAX_TIMEOUT: f64 = 86_400.0;

/// The one rule for every `timeout` argument: absent is `default`, 0 means no limit (`None`),
/// anything else is a number of seconds up to [`MAX_TIMEOUT`] (fractions allowed).
pub fn timeout_limit(timeout: Option<f64>, default: f64) -> Result<Option<Duration>, String> {
    let secs = timeout.unwrap_or(default);
    if secs == 0.0 {
        return Ok(None);
    }
    if !(secs > 0.0 && secs <= MAX_TIMEOUT) {
        return Err(format!(
            "timeout {secs}: expected seconds from 0 (no limit) to {MAX_TIMEOUT}"
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// A request: `{"v":1,"id":7,"cmd":"pass-fd","args":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub id: u64,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "cmd",
    content = "args",
    rename_all = "kebab-case",
    deny_unknown_fields
)]
#[non_exhaustive]
pub enum Command {
    /// Device path, id, size, image, queues, depth, state.
    Info,
    /// Counters; answered at any time, also while a pause is draining.
    Stats,
    /// Park new requests, wait until none is outstanding, flush, close the image.
    Pause {
        /// Seconds to wait for the drain (default 30; 0 = no limit); at the timeout the pause
        /// is undone and a `timeout` error returned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
    },
    /// Reopen the image (optionally at a new path of the same size) and resume.
    Unpause {
        /// A new path for the image (same size required); default: the current path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
        /// After resuming, start mirroring to the stored fd of this name (as `mirror-start`
        /// with the default export and timeout), or "null" to stop mirroring and clear
        /// `nbd_mirror_failed`; default: the mirror is left as it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mirror: Option<String>,
    },
    /// Store the fd sent with this line (SCM_RIGHTS) under `name`.
    PassFd {
        name: String,
        /// Present when the sender already ran the NBD handshake: the socket is in the
        /// transmission phase and this describes the export.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd: Option<NegotiatedNbd>,
    },
    /// The stored fds: name, socket family, whether negotiated, export.
    ListFds,
    /// Close the stored fd `name`.
    CloseFd { name: String },
    /// Wait until no request is outstanding (default 30 s; 0 = no limit).
    WaitIdle {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
    },
    /// Graceful stop, as SIGTERM; with `keep`, detach instead: drain, flush, leave the device
    /// waiting (guest I/O queues) for `ublk-mirror recover`, as for a live upgrade.
    Shutdown {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keep: bool,
    },
    /// Mirror every write to the NBD target on the stored fd `name`, or over the stored fds
    /// `names` (one connection each, all to the same export; at most one per queue, and more
    /// than one only to an export with CAN_MULTI_CONN). Give `name` or `names`.
    MirrorStart {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        name: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        names: Vec<String>,
        /// Export name for the handshake (default ""), unless the fd came negotiated.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        export: Option<String>,
        /// Seconds a request may wait for the target before the mirror fails (default 10;
        /// 0 = no limit, like tapdisk).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
        /// Also copy the whole device in the background (sparse-aware).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        copy: bool,
        /// Copy only what the out-of-sync map holds (after a failure).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
        /// Copy rate limit in bytes per second of device covered (holes included); absent or
        /// 0: no limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// Mirror to an export that does not take FLUSH (tapdisk's servers): a guest flush then
        /// completes after the local flush only and promises nothing about the target.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_no_flush: bool,
        /// With `copy`: the target is known to read zeros (freshly created), so holes are not
        /// sent at all.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        target_is_zero: bool,
    },
    /// Change the running copy's or resync's rate limit (bytes per second; absent or 0: no
    /// limit), from now on.
    MirrorSetSpeed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
    },
    /// Hold the background copy or resync (chunks in flight finish); guest I/O and mirroring
    /// go on.
    MirrorCopyPause,
    /// Let a held copy or resync go on.
    MirrorCopyResume,
    /// Keep the connection open and push one JSON line per change (control/PROTOCOL.md,
    /// "Events"); the reply's result is a snapshot of the current state.
    Watch,
    /// Wait until the background copy or resync is ready (actively synced); default 1 day,
    /// 0 = no limit. Also accepted under its older name `wait-ready` (the CLI verb's alias).
    #[serde(alias = "wait-ready")]
    MirrorWaitReady {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
    },
    /// End mirroring cleanly and clear `nbd_mirror_failed`.
    MirrorStop,
    /// The out-of-sync extents.
    DirtyMap,
}

/// Stable error codes of replies (see PROTOCOL.md).
pub mod code {
    pub const BAD_REQUEST: &str = "bad-request";
    pub const UNKNOWN_COMMAND: &str = "unknown-command";
    pub const BAD_VERSION: &str = "bad-version";
    pub const BAD_FD: &str = "bad-fd";
    pub const NO_SUCH_FD: &str = "no-such-fd";
    pub const TOO_MANY_FDS: &str = "too-many-fds";
    pub const TIMEOUT: &str = "timeout";
    pub const BAD_IMAGE: &str = "bad-image";
    pub const BAD_STATE: &str = "bad-state";
    pub const MIRROR_REFUSED: &str = "mirror-refused";
    pub const FAILED: &str = "failed";
}

/// An NBD export negotiated by the fd's sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiatedNbd {
    pub export: String,
    pub size: u64,
    /// NBD transmission flags.
    pub flags: u16,
    /// NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum payload).
    pub block_size: [u32; 3],
}

/// A reply: `{"v":1,"id":7,"ok":true,"result":{...}}` (`result` is a [`Response`]) or
/// `{"v":1,"id":7,"ok":false,"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable (see PROTOCOL.md).
    pub code: String,
    /// For humans.
    pub message: String,
}

impl Reply {
    pub fn ok(id: u64, result: serde_json::Value) -> Reply {
        Reply {
            v: VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: u64, code: &str, message: impl Into<String>) -> Reply {
        Reply {
            v: VERSION,
            id,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_fd_wire_form_is_stable() {
        let r = Request {
            v: VERSION,
            id: 7,
            command: Command::PassFd {
                name: "mirror0".into(),
                nbd: None,
            },
        };
        let s = serde_json::to_string(&r).expect("serialize");
        assert_eq!(
            s,
            r#"{"v":1,"id":7,"cmd":"pass-fd","args":{"name":"mirror0"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).expect("parse"), r);
    }

    #[test]
    fn commands_without_args_and_unknown_ones() {
        let r: Request = serde_json::from_str(r#"{"v":1,"id":1,"cmd":"stats"}"#).expect("stats");
        assert_eq!(r.command, Command::Stats);
        let r: Request =
            serde_json::from_str(r#"{"v":1,"id":2,"cmd":"pause","args":{"timeout":2.5}}"#)
                .expect("pause");
        assert_eq!(r.command, Command::Pause { timeout: Some(2.5) });
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"id":3,"cmd":"frob"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"v":1,"id":4,"cmd":"pause","args":{"timeout":1,"bogus":2}}"#
        )
        .is_err());
    }

    #[test]
    fn wait_ready_is_an_alias_of_mirror_wait_ready() {
        let canonical: Request = serde_json::from_str(
            r#"{"v":1,"id":1,"cmd":"mirror-wait-ready","args":{"timeout":5}}"#,
        )
        .expect("mirror-wait-ready");
        let alias: Request =
            serde_json::from_str(r#"{"v":1,"id":1,"cmd":"wait-ready","args":{"timeout":5}}"#)
                .expect("wait-ready");
        assert_eq!(alias, canonical);
        assert_eq!(
            alias.command,
            Command::MirrorWaitReady { timeout: Some(5.0) }
        );
        let alias: Request = serde_json::from_str(r#"{"v":1,"id":2,"cmd":"wait-ready","args":{}}"#)
            .expect("default timeout");
        assert_eq!(alias.command, Command::MirrorWaitReady { timeout: None });
        // Sent under the one name.
        let s = serde_json::to_string(&alias).expect("serialize");
        assert_eq!(s, r#"{"v":1,"id":2,"cmd":"mirror-wait-ready","args":{}}"#);
    }

    #[test]
    fn zero_timeout_means_no_limit_everywhere() {
        use defaults::*;
        for default in [
            PAUSE_TIMEOUT,
            WAIT_IDLE_TIMEOUT,
            MIRROR_TIMEOUT,
            MIRROR_WAIT_READY_TIMEOUT,
        ] {
            assert_eq!(timeout_limit(Some(0.0), default), Ok(None));
            assert_eq!(
                timeout_limit(None, default),
                Ok(Some(Duration::from_secs_f64(default)))
            );
        }
        assert_eq!(
            timeout_limit(Some(2.5), PAUSE_TIMEOUT),
            Ok(Some(Duration::from_millis(2500)))
        );
        assert_eq!(
            timeout_limit(Some(MAX_TIMEOUT), PAUSE_TIMEOUT),
            Ok(Some(Duration::from_secs(86_400)))
        );
        for bad in [-1.0, MAX_TIMEOUT + 1.0, f64::NAN, f64::INFINITY] {
            let e = timeout_limit(Some(bad), PAUSE_TIMEOUT).expect_err("refused");
            assert!(e.contains("0 (no limit)"), "{e}");
        }
    }
}
