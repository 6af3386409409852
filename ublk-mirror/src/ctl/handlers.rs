//! One function per control command that changes or waits for something (the reports are in
//! `report.rs`). Each returns the reply's result, or its error code and message; a part's
//! error type names its own code (`LifecycleError::code`, `MirrorError::code`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use control::protocol::{code, defaults, timeout_limit, NegotiatedNbd};
use serde_json::{json, Value};

use crate::ctl::{report, DeviceInfo};
use crate::daemon::{Daemon, UnpausedMirror};
use crate::fd_store::StoredFd;
use crate::lock::lock;
use crate::mirror::copy::CopyState;
use crate::mirror::mirroring::{CopyPlan, MirrorTarget};

use crate::stop::StopReason;

/// A reply's result, or its error code and message.
pub(super) type Answer = std::result::Result<Value, (&'static str, String)>;

/// A command's `timeout` by the protocol's one rule: absent is `default`, 0 is no limit
/// (`None`), otherwise seconds up to a day.
fn timeout_of(
    t: Option<f64>,
    default: f64,
) -> std::result::Result<Option<Duration>, (&'static str, String)> {
    timeout_limit(t, default).map_err(|m| (code::BAD_REQUEST, m))
}

/// A wait with `timeout_of`'s limit; no limit waits as long as it takes.
fn wait_limit(limit: Option<Duration>) -> Duration {
    limit.unwrap_or(Duration::MAX)
}

pub(super) fn pause(daemon: &Daemon, timeout: Option<f64>) -> Answer {
    let limit = timeout_of(timeout, defaults::PAUSE_TIMEOUT)?;
    let took = daemon
        .device
        .pause(wait_limit(limit))
        .map_err(|e| (e.code(), e.to_string()))?;
    Ok(json!({ "drain_ms": took.as_secs_f64() * 1000.0 }))
}

/// Resumes (on `image` if given); with `mirror`, mirrors to that stored fd from the moment
/// the device runs (see `Daemon::unpause_mirroring`), or stops mirroring for "null".
pub(super) fn unpause(
    daemon: &std::sync::Arc<Daemon>,
    info: &DeviceInfo,
    image: Option<String>,
    mirror: Option<String>,
) -> Answer {
    let image = image.map(PathBuf::from);
    let failed = match mirror.as_deref() {
        None => {
            daemon
                .unpause(image)
                .map_err(|e| (e.code(), e.to_string()))?;
            None
        }
        Some("null") => {
            daemon
                .unpause(image)
                .map_err(|e| (e.code(), e.to_string()))?;
            daemon.stop_mirror();
            *lock(&daemon.mirroring.request) = None;
            None
        }
        Some(name) => {
            let timeout = timeout_of(None, defaults::MIRROR_TIMEOUT)?;
            let names = [name.to_owned()];
            let target = MirrorTarget {
                fd_names: &names,
                export_name: "",
                timeout,
                plan: CopyPlan::None,
                // tapdisk's servers offer no FLUSH: tapdisk mode mirrors to them anyway.
                need_flush: !daemon.tapdisk_mode(),
            };
            let outcome = daemon
                .unpause_mirroring(image, target, info.max_io_bytes)
                .map_err(|e| (e.code(), e.to_string()))?;
            *lock(&daemon.mirroring.request) = Some(name.to_owned());
            match outcome {
                UnpausedMirror::Active => None,
                UnpausedMirror::Failed(why) => Some(why),
            }
        }
    };
    Ok(json!({
        "state": daemon.device.state().name(),
        "nbd_mirror_failed": u8::from(daemon.mirror_failed()),
        "mirror_error": failed,
    }))
}

pub(super) fn pass_fd(
    daemon: &Daemon,
    fd: Option<OwnedFd>,
    name: String,
    nbd: Option<NegotiatedNbd>,
) -> Answer {
    let fd = fd.ok_or((code::BAD_FD, "pass-fd without an fd".to_string()))?;
    let replaced = daemon
        .fds
        .store(&name, StoredFd { fd, nbd })
        .map_err(|e| (e.code(), e.to_string()))?;
    log::info!(
        "pass-fd {name:?} stored{}",
        if replaced {
            " (replaced the old one)"
        } else {
            ""
        }
    );
    Ok(json!({ "name": name, "replaced": replaced }))
}

pub(super) fn list_fds(daemon: &Daemon) -> Value {
    let fds = daemon.fds.lock();
    let list: Vec<Value> = fds
        .iter()
        .map(|(n, f)| {
            json!({ "name": n, "family": socket_family(&f.fd),
                    "negotiated": f.nbd.is_some(),
                    "export": f.nbd.as_ref().map(|x| x.export.clone()) })
        })
        .collect();
    json!({ "fds": list })
}

pub(super) fn close_fd(daemon: &Daemon, name: String) -> Answer {
    match daemon.fds.take(&name) {
        Some(_) => Ok(json!({ "name": name })),
        None => Err((code::NO_SUCH_FD, format!("no fd named {name:?}"))),
    }
}

pub(super) fn wait_idle(daemon: &Daemon, timeout: Option<f64>) -> Answer {
    let limit = timeout_of(timeout, defaults::WAIT_IDLE_TIMEOUT)?;
    daemon
        .wait_idle(wait_limit(limit))
        .map_err(|e| (e.code(), e.to_string()))?;
    Ok(json!({ "reqs_outstanding": 0, "nbd_mirror_failed": u8::from(daemon.mirror_failed()) }))
}

/// What `mirror-start` copies: `copy` and `resync` exclude each other; a speed of 0 is no
/// limit, as an absent one; `target_is_zero` only goes with `copy` (a resync's target holds
/// older data, not zeros).
pub(super) fn copy_plan(
    (copy, resync): (bool, bool),
    speed: Option<u64>,
    target_is_zero: bool,
) -> std::result::Result<CopyPlan, (&'static str, String)> {
    if copy && resync {
        return Err((
            code::BAD_REQUEST,
            "copy and resync exclude each other".into(),
        ));
    }
    if target_is_zero && !copy {
        return Err((
            code::BAD_REQUEST,
            "target_is_zero goes with copy only (a resync's target is not zero)".into(),
        ));
    }
    let speed = speed.filter(|&s| s > 0);
    Ok(match (copy, resync) {
        (true, _) => CopyPlan::Copy {
            speed,
            target_is_zero,
        },
        (_, true) => CopyPlan::Resync { speed },
        _ => CopyPlan::None,
    })
}

pub(super) fn mirror_start(
    daemon: &std::sync::Arc<Daemon>,
    info: &DeviceInfo,
    (name, names): (String, Vec<String>),
    export: Option<String>,
    timeout: Option<f64>,
    (plan, need_flush): (CopyPlan, bool),
) -> Answer {
    let names = match (name.is_empty(), names.is_empty()) {
        (false, true) => vec![name],
        (true, false) => names,
        _ => {
            return Err((
                code::BAD_REQUEST,
                "give the stored fd as \"name\" or the list of them as \"names\", not both \
                 or neither"
                    .into(),
            ))
        }
    };
    // 0 is no limit, like tapdisk (a hung target then hangs the guest).
    let timeout = timeout_of(timeout, defaults::MIRROR_TIMEOUT)?;
    let target = MirrorTarget {
        fd_names: &names,
        export_name: export.as_deref().unwrap_or(""),
        timeout,
        plan,
        need_flush,
    };
    let m = daemon
        .start_mirror(target, info.max_io_bytes)
        .map_err(|e| (e.code(), e.to_string()))?;
    *lock(&daemon.mirroring.request) = Some(names.join(","));
    Ok(json!({ "state": m.state().name(), "export": m.export.name, "size": m.export.size }))
}

pub(super) fn mirror_stop(daemon: &Daemon) -> Value {
    json!({ "stopped": daemon.stop_mirror() })
}

/// The running copy or resync, for the commands that steer it.
fn running_copy(
    daemon: &Daemon,
) -> std::result::Result<std::sync::Arc<crate::mirror::copy::CopyJob>, (&'static str, String)> {
    match daemon.mirroring.copy.load_full() {
        Some(job) if job.state() == CopyState::Copying => Ok(job),
        Some(job) => Err((
            code::BAD_STATE,
            format!("the {} already ended {}", job.kind, job.state().name()),
        )),
        None => Err((code::BAD_STATE, "no copy or resync is running".into())),
    }
}

/// `mirror-set-speed`: a new rate limit for the running copy (0 or absent: none).
pub(super) fn mirror_set_speed(daemon: &Daemon, speed: Option<u64>) -> Answer {
    let job = running_copy(daemon)?;
    job.set_speed(speed);
    Ok(report::copy_json(&job))
}

/// `mirror-copy-pause` (true) and `mirror-copy-resume` (false): hold or release the copy's
/// workers; guest I/O and the mirror go on.
pub(super) fn mirror_copy_hold(daemon: &Daemon, hold: bool) -> Answer {
    let job = running_copy(daemon)?;
    job.set_paused(hold);
    Ok(report::copy_json(&job))
}

/// Waits until the copy or resync is ready; fails at once if none runs or it ended otherwise.
pub(super) fn mirror_wait_ready(daemon: &Daemon, timeout: Option<f64>) -> Answer {
    let limit = timeout_of(timeout, defaults::MIRROR_WAIT_READY_TIMEOUT)?;
    let deadline = limit.map(|d| std::time::Instant::now() + d);
    loop {
        let Some(job) = daemon.mirroring.copy.load_full() else {
            return Err((code::BAD_STATE, "no copy or resync is running".into()));
        };
        match job.state() {
            CopyState::Ready => return Ok(report::copy_json(&job)),
            CopyState::Copying => {}
            other => {
                return Err((
                    code::FAILED,
                    format!("the {} ended {}", job.kind, other.name()),
                ))
            }
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err((code::TIMEOUT, format!("{} not ready yet", job.kind)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

std::thread_local! {
    /// A `watch` that answered: its connection becomes a watcher once the reply is written.
    static WATCH_AFTER_REPLY: std::cell::RefCell<Option<crate::events::Subscription>> =
        const { std::cell::RefCell::new(None) };
}

/// `watch`: subscribes (before the snapshot is taken, so no change falls between them) and
/// answers with the snapshot; the connection is handed to `watch::serve` after the reply.
pub(super) fn watch(daemon: &Daemon) -> Answer {
    let sub = daemon.events.subscribe().ok_or_else(|| {
        (
            code::FAILED,
            format!(
                "too many watchers (at most {}); close one",
                crate::events::MAX_WATCHERS
            ),
        )
    })?;
    WATCH_AFTER_REPLY.with(|w| *w.borrow_mut() = Some(sub));
    Ok(serde_json::to_value(super::watch::snapshot(daemon)).unwrap_or_default())
}

/// After a reply is written: the watch its command started, if any.
pub(super) fn take_watch() -> Option<crate::events::Subscription> {
    WATCH_AFTER_REPLY.with(|w| w.borrow_mut().take())
}

std::thread_local! {
    /// A stop that `shutdown` asked for, sent only once its reply is written: a detaching
    /// daemon exits within milliseconds of the stop, and the client must still get its answer.
    static STOP_AFTER_REPLY: std::cell::Cell<Option<StopReason>> =
        const { std::cell::Cell::new(None) };
}

pub(super) fn shutdown(_daemon: &Daemon, keep: bool) -> Value {
    let why = if keep {
        StopReason::Detach
    } else {
        StopReason::Control
    };
    STOP_AFTER_REPLY.with(|s| s.set(Some(why)));
    json!({})
}

/// After a reply is written (or failed to be): sends the stop its command asked for, if any.
pub(super) fn send_stop_after_reply(daemon: &Daemon) {
    if let Some(why) = STOP_AFTER_REPLY.with(std::cell::Cell::take) {
        let _ = lock(&daemon.stop).send(why);
    }
}

/// "unix", "inet" or "inet6": what kind of link a stored fd is.
fn socket_family(fd: &OwnedFd) -> &'static str {
    match crate::mirror::attach::socket_family(fd.as_raw_fd()) {
        libc::AF_UNIX => "unix",
        libc::AF_INET => "inet",
        libc::AF_INET6 => "inet6",
        _ => "unknown",
    }
}
