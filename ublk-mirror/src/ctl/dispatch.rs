//! One request line: parsed and checked (version, command, fds), then its command goes to
//! its handler, one line each.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use control::protocol::{code, Command, Reply, Request, VERSION};
use serde_json::Value;

use crate::ctl::handlers::{self, Answer};
use crate::ctl::{report, DeviceInfo};
use crate::daemon::Daemon;

pub(crate) fn handle_line(
    line: &[u8],
    fd: Option<OwnedFd>,
    excess_fds: bool,
    daemon: &Arc<Daemon>,
    info: &DeviceInfo,
) -> Reply {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Reply::err(0, code::BAD_REQUEST, format!("not JSON: {e}")),
    };
    let id = value.get("id").and_then(Value::as_u64).unwrap_or(0);
    if value.get("v").and_then(Value::as_u64) != Some(u64::from(VERSION)) {
        return Reply::err(
            id,
            code::BAD_VERSION,
            format!("protocol version must be {VERSION}"),
        );
    }
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) if e.to_string().contains("unknown variant") => {
            return Reply::err(id, code::UNKNOWN_COMMAND, e.to_string())
        }
        Err(e) => return Reply::err(id, code::BAD_REQUEST, e.to_string()),
    };
    if excess_fds {
        return Reply::err(
            id,
            code::BAD_FD,
            "more than one fd sent with one request; all closed",
        );
    }
    if fd.is_some() && !matches!(req.command, Command::PassFd { .. }) {
        return Reply::err(
            id,
            code::BAD_FD,
            "an fd may only come with pass-fd; closed it",
        );
    }
    match dispatch(req.command, fd, daemon, info) {
        Ok(v) => Reply::ok(id, v),
        Err((c, m)) => Reply::err(id, c, m),
    }
}

fn dispatch(cmd: Command, fd: Option<OwnedFd>, daemon: &Arc<Daemon>, info: &DeviceInfo) -> Answer {
    match cmd {
        Command::Info => Ok(report::info_json(daemon, info)),
        Command::Stats => Ok(report::stats_json(daemon)),
        Command::Pause { timeout } => handlers::pause(daemon, timeout),
        Command::Unpause { image, mirror } => handlers::unpause(daemon, info, image, mirror),
        Command::PassFd { name, nbd } => handlers::pass_fd(daemon, fd, name, nbd),
        Command::ListFds => Ok(handlers::list_fds(daemon)),
        Command::CloseFd { name } => handlers::close_fd(daemon, name),
        Command::WaitIdle { timeout } => handlers::wait_idle(daemon, timeout),
        Command::MirrorStart {
            name,
            names,
            export,
            timeout,
            copy,
            resync,
            speed,
            allow_no_flush,
            target_is_zero,
        } => {
            let plan = handlers::copy_plan((copy, resync), speed, target_is_zero)?;
            // `--allow-no-flush` is implied in tapdisk mode, as xapi's targets lack FLUSH.
            let need_flush = !allow_no_flush && !daemon.tapdisk_mode();
            handlers::mirror_start(
                daemon,
                info,
                (name, names),
                export,
                timeout,
                (plan, need_flush),
            )
        }
        Command::MirrorStop => Ok(handlers::mirror_stop(daemon)),
        Command::MirrorWaitReady { timeout } => handlers::mirror_wait_ready(daemon, timeout),
        Command::DirtyMap => Ok(report::dirty_map_json(daemon)),
        Command::MirrorSetSpeed { speed } => handlers::mirror_set_speed(daemon, speed),
        Command::MirrorCopyPause => handlers::mirror_copy_hold(daemon, true),
        Command::MirrorCopyResume => handlers::mirror_copy_hold(daemon, false),
        Command::Watch => handlers::watch(daemon),
        Command::Shutdown { keep } => Ok(handlers::shutdown(daemon, keep)),
        other => Err((
            code::UNKNOWN_COMMAND,
            format!("{other:?} is not served by this daemon"),
        )),
    }
}
