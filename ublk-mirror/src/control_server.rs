//! The daemon's control socket (protocol: `control/PROTOCOL.md`).
//!
//! One thread per connected client, so a pause that takes seconds never delays a `stats` from
//! another client. Every read is a recvmsg with room for one fd; an fd binds to the first line
//! that ends in the same read, and any other fd is closed and its request rejected.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use control::fdpass::recv_with_fd;
use control::protocol::{
    code, defaults, timeout_limit, Command, Reply, Request, MAX_FDS, MAX_FD_NAME, MAX_LINE, VERSION,
};
use serde_json::{json, Value};

use crate::copy::{CopyJob, CopyState};
use crate::lock::lock;
use crate::run_dir::RUN_DIR;
use crate::shared::{ControlError, CopyPlan, Shared, StoredFd};
use crate::stop::StopReason;

/// Control clients connected at once; more are told so and closed.
const MAX_CLIENTS: usize = 16;

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

/// The listening socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlServer {
    pub fn start(path: &Path, shared: Arc<Shared>, info: DeviceInfo) -> Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("chmod 0700 {}", dir.display()))?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is in use by a running daemon",
                    path.display()
                );
            }
            log::warn!(
                "removing stale control socket {} (nobody listens)",
                path.display()
            );
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        log::info!("control socket {}", path.display());
        let clients = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, shared, info, clients))
            .context("spawning the control thread")?;
        Ok(ControlServer {
            path: path.to_owned(),
        })
    }
}

fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    info: DeviceInfo,
    clients: Arc<AtomicUsize>,
) {
    let info = Arc::new(info);
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control accept: {e}");
                continue;
            }
        };
        if let Err(why) = peer_allowed(&conn) {
            log::warn!("control: refused a client: {why}");
            let _ = send(&mut conn, &Reply::err(0, "permission-denied", why));
            continue;
        }
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let _ = send(
                &mut conn,
                &Reply::err(0, code::FAILED, "too many control clients connected"),
            );
            continue;
        }
        let (shared, info, clients) = (shared.clone(), info.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(conn, &shared, &info);
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("control: no thread for a client: {e}");
        }
    }
}

/// Root or our own user only.
fn peer_allowed(conn: &UnixStream) -> std::result::Result<(), String> {
    // SAFETY: ucred is plain old data; all-zero is valid and the kernel fills it in.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket fd, and a buffer of `len` bytes for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid == 0 || cred.uid == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) may not control this daemon",
            cred.uid, cred.pid
        ))
    }
}

fn send(conn: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    conn.write_all(line.as_bytes())
}

fn serve_client(mut conn: UnixStream, shared: &Arc<Shared>, info: &DeviceInfo) {
    let mut buf = vec![0u8; MAX_LINE];
    let mut pending: Vec<u8> = Vec::new();
    let mut discarding = false;
    loop {
        let got = match recv_with_fd(&conn, &mut buf) {
            Ok(r) if r.len == 0 => return,
            Ok(r) => r,
            Err(e) => {
                log::debug!("control client: {e}");
                return;
            }
        };
        let mut fd = got.fd;
        let mut excess_fds = got.excess_fds;
        let mut bytes = &buf[..got.len];
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            if discarding {
                discarding = false;
                pending.clear();
                fd = None; // an fd sent with an oversized line is closed
                continue;
            }
            pending.extend_from_slice(head);
            let line = std::mem::take(&mut pending);
            // The cap holds however the line was split across reads.
            if line.len() >= MAX_LINE {
                fd = None;
                let r = Reply::err(
                    0,
                    code::BAD_REQUEST,
                    format!("line longer than {MAX_LINE} bytes"),
                );
                if send(&mut conn, &r).is_err() {
                    return;
                }
                continue;
            }
            // The fd and a truncation belong to the first line that ends in this read.
            let reply = handle_line(
                &line,
                fd.take(),
                std::mem::take(&mut excess_fds),
                shared,
                info,
            );
            if send(&mut conn, &reply).is_err() {
                return;
            }
        }
        if fd.take().is_some() || excess_fds {
            log::warn!("control: an fd arrived with no complete line; closed it");
        }
        if !discarding {
            pending.extend_from_slice(bytes);
            if pending.len() >= MAX_LINE {
                discarding = true;
                pending.clear();
                let r = Reply::err(
                    0,
                    code::BAD_REQUEST,
                    format!("line longer than {MAX_LINE} bytes"),
                );
                if send(&mut conn, &r).is_err() {
                    return;
                }
            }
        }
    }
}

pub(crate) fn handle_line(
    line: &[u8],
    fd: Option<OwnedFd>,
    excess_fds: bool,
    shared: &Arc<Shared>,
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
    match dispatch(req.command, fd, shared, info) {
        Ok(v) => Reply::ok(id, v),
        Err((c, m)) => Reply::err(id, c, m),
    }
}

type Outcome = std::result::Result<Value, (&'static str, String)>;

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

fn control_error(e: ControlError) -> (&'static str, String) {
    let c = match e {
        ControlError::PauseTimeout { .. } | ControlError::IdleTimeout(_) => code::TIMEOUT,
        ControlError::Reopen(..) => code::BAD_IMAGE,
        ControlError::NotPaused(_) | ControlError::Stopping => code::BAD_STATE,
        ControlError::PauseFlush(_) => code::FAILED,
        ControlError::NoSuchFd(_) => code::NO_SUCH_FD,
        ControlError::MirrorRefused(_) => code::MIRROR_REFUSED,
        ControlError::MirrorBusy(_) => code::BAD_STATE,
    };
    (c, e.to_string())
}

fn dispatch(cmd: Command, fd: Option<OwnedFd>, shared: &Arc<Shared>, info: &DeviceInfo) -> Outcome {
    match cmd {
        Command::Info => Ok(json!({
            "device": info.bdev,
            "dev_id": info.dev_id,
            "size": shared.dev_size,
            "image": shared.image_path().display().to_string(),
            "image_open": shared.image_is_open(),
            "queues": info.queues,
            "depth": info.depth,
            "max_io_bytes": info.max_io_bytes,
            "logical_block_size": shared.logical_block,
            "state": shared.state().name(),
            "label": shared.label,
        })),
        Command::Stats => Ok(stats_json(shared)),
        Command::Pause { timeout } => {
            let limit = timeout_of(timeout, defaults::PAUSE_TIMEOUT)?;
            let took = shared.pause(wait_limit(limit)).map_err(control_error)?;
            Ok(json!({ "drain_ms": took.as_secs_f64() * 1000.0 }))
        }
        Command::Unpause { image, mirror } => {
            if let Some(m) = &mirror {
                let known = m == "null" || lock(&shared.fds).contains_key(m);
                if !known {
                    return Err((
                        code::NO_SUCH_FD,
                        format!("no fd named {m:?} (pass-fd it first)"),
                    ));
                }
            }
            shared
                .unpause(image.map(PathBuf::from))
                .map_err(control_error)?;
            match mirror.as_deref() {
                Some("null") => {
                    shared.stop_mirror();
                }
                Some(name) => {
                    let timeout = timeout_of(None, defaults::MIRROR_TIMEOUT)?;
                    shared
                        .start_mirror(name, "", timeout, info.max_io_bytes, CopyPlan::None)
                        .map_err(control_error)?;
                }
                None => {}
            }
            if let Some(m) = mirror {
                *lock(&shared.mirror_request) = (m != "null").then_some(m);
            }
            Ok(json!({ "state": shared.state().name() }))
        }
        Command::PassFd { name, nbd } => {
            let fd = fd.ok_or((code::BAD_FD, "pass-fd without an fd".to_string()))?;
            if name.is_empty() || name.len() > MAX_FD_NAME || name.chars().any(char::is_control) {
                return Err((
                    code::BAD_REQUEST,
                    format!("fd names are 1..={MAX_FD_NAME} printable bytes"),
                ));
            }
            check_stream_socket(&fd).map_err(|m| (code::BAD_FD, m))?;
            let mut fds = lock(&shared.fds);
            if !fds.contains_key(&name) && fds.len() >= MAX_FDS {
                return Err((
                    code::TOO_MANY_FDS,
                    format!("at most {MAX_FDS} fds; close-fd one"),
                ));
            }
            let replaced = fds.insert(name.clone(), StoredFd { fd, nbd }).is_some();
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
        Command::ListFds => {
            let fds = lock(&shared.fds);
            let list: Vec<Value> = fds
                .iter()
                .map(|(n, f)| {
                    json!({ "name": n, "family": socket_family(&f.fd),
                            "negotiated": f.nbd.is_some(),
                            "export": f.nbd.as_ref().map(|x| x.export.clone()) })
                })
                .collect();
            Ok(json!({ "fds": list }))
        }
        Command::CloseFd { name } => match lock(&shared.fds).remove(&name) {
            Some(_) => Ok(json!({ "name": name })),
            None => Err((code::NO_SUCH_FD, format!("no fd named {name:?}"))),
        },
        Command::WaitIdle { timeout } => {
            let limit = timeout_of(timeout, defaults::WAIT_IDLE_TIMEOUT)?;
            shared.wait_idle(wait_limit(limit)).map_err(control_error)?;
            Ok(
                json!({ "reqs_outstanding": 0, "nbd_mirror_failed": u8::from(shared.mirror_failed()) }),
            )
        }
        Command::MirrorStart {
            name,
            export,
            timeout,
            copy,
            resync,
            speed,
        } => {
            if copy && resync {
                return Err((
                    code::BAD_REQUEST,
                    "copy and resync exclude each other".into(),
                ));
            }
            // A speed of 0 is no limit, as an absent one.
            let speed = speed.filter(|&s| s > 0);
            let plan = match (copy, resync) {
                (true, _) => CopyPlan::Copy { speed },
                (_, true) => CopyPlan::Resync { speed },
                _ => CopyPlan::None,
            };
            // 0 is no limit, like tapdisk (a hung target then hangs the guest).
            let timeout = timeout_of(timeout, defaults::MIRROR_TIMEOUT)?;
            let m = shared
                .start_mirror(
                    &name,
                    export.as_deref().unwrap_or(""),
                    timeout,
                    info.max_io_bytes,
                    plan,
                )
                .map_err(control_error)?;
            *lock(&shared.mirror_request) = Some(name);
            Ok(json!({ "state": m.state().name(), "export": m.export.name, "size": m.export.size }))
        }
        Command::MirrorStop => Ok(json!({ "stopped": shared.stop_mirror() })),
        Command::MirrorWaitReady { timeout } => {
            let limit = timeout_of(timeout, defaults::MIRROR_WAIT_READY_TIMEOUT)?;
            let deadline = limit.map(|d| std::time::Instant::now() + d);
            loop {
                let Some(job) = shared.copy.load_full() else {
                    return Err((code::BAD_STATE, "no copy or resync is running".into()));
                };
                match job.state() {
                    CopyState::Ready => return Ok(copy_json(&job)),
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
        Command::DirtyMap => {
            let extents: Vec<Value> = shared
                .io
                .dirty
                .extents()
                .into_iter()
                .map(|(o, l)| json!([o, l]))
                .collect();
            Ok(json!({
                "granularity": shared.io.dirty.granule(),
                "dirty_bytes": shared.io.dirty.dirty_bytes(),
                "extents": extents,
            }))
        }
        Command::Shutdown { keep } => {
            let why = if keep {
                StopReason::Detach
            } else {
                StopReason::Control
            };
            let _ = lock(&shared.stop).send(why);
            Ok(json!({}))
        }
        other => Err((
            code::UNKNOWN_COMMAND,
            format!("{other:?} is not served by this daemon"),
        )),
    }
}

/// The names and meaning follow `tap-ctl stats` where they overlap.
fn stats_json(shared: &Shared) -> Value {
    let s = shared.io.stats.snapshot();
    json!({
        "name": shared.label,
        "state": shared.state().name(),
        "reqs_outstanding": s.outstanding,
        "reqs_parked": s.parked,
        "nbd_mirror_failed": u8::from(shared.mirror_failed()),
        "ops": {
            "read": { "count": s.reads, "bytes": s.read_bytes },
            "write": { "count": s.writes, "bytes": s.write_bytes, "fua": s.fua_writes },
            "flush": { "count": s.flushes },
            "discard": { "count": s.discards, "bytes": s.discard_bytes },
            "write_zeroes": { "count": s.write_zeroes, "bytes": s.write_zeroes_bytes },
            "errors": s.errors,
        },
        "mirror": mirror_json(shared),
    })
}

fn mirror_json(shared: &Shared) -> Value {
    let requested = lock(&shared.mirror_request).clone();
    let Some(m) = shared.io.mirror.load_full() else {
        // After a recovery from a daemon that was mirroring: failed, until mirror-start/stop.
        let inherited = shared.inherited_failure();
        return json!({ "state": if inherited.is_some() { "failed" } else { "off" },
                       "requested": requested, "target": Value::Null,
                       "in_flight": 0, "ops": 0, "bytes_mirrored": 0, "last_error": inherited,
                       "dirty_bytes": shared.io.dirty.dirty_bytes(),
                       "bitmap_persistent": shared.io.dirty.persistent(),
                       "activity_log_extents": shared.io.dirty.activity_extents() });
    };
    let failure = m.failure();
    json!({
        "state": m.state().name(),
        "requested": requested,
        "target": m.name,
        "export": m.export.name,
        "export_size": m.export.size,
        "timeout": m.timeout.map(|t| t.as_secs_f64()),
        "in_flight": m.in_flight(),
        "ops": m.ops.load(Ordering::Relaxed),
        "bytes_mirrored": m.bytes.load(Ordering::Relaxed),
        "last_error": failure.as_ref().map(|f| f.0.clone()),
        "failed_at": failure.as_ref().and_then(|f| f.1.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
        "dirty_bytes": shared.io.dirty.dirty_bytes(),
        "bitmap_persistent": shared.io.dirty.persistent(),
        "activity_log_extents": shared.io.dirty.activity_extents(),
        "range_locks": shared.io.ranges.len(),
        "copy": shared.copy.load_full().map(|j| copy_json(&j)),
    })
}

fn copy_json(job: &CopyJob) -> Value {
    let done = job.bytes_done();
    let rate = job.rate();
    let left = job.bytes_total.saturating_sub(done);
    json!({
        "kind": job.kind,
        "state": job.state().name(),
        "bytes_done": done,
        "bytes_total": job.bytes_total,
        "rate": rate.round(),
        "eta": if rate > 0.0 { Some((left as f64 / rate).round()) } else { None },
        "elapsed": job.elapsed().as_secs_f64(),
        "speed_limit": job.speed,
    })
}

/// Mirror targets are stream sockets (TCP, or a Unix socketpair from a TLS relay).
fn check_stream_socket(fd: &OwnedFd) -> std::result::Result<(), String> {
    // SAFETY: stat is plain old data; all-zero is valid and fstat fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("the fd is not a socket".into());
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket fd and an int-sized buffer for SO_TYPE.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_STREAM {
        return Err("the fd is not a stream socket".into());
    }
    Ok(())
}

/// "unix", "inet" or "inet6": what kind of link a stored fd is.
fn socket_family(fd: &OwnedFd) -> &'static str {
    match crate::shared::socket_family(fd.as_raw_fd()) {
        libc::AF_UNIX => "unix",
        libc::AF_INET => "inet",
        libc::AF_INET6 => "inet6",
        _ => "unknown",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use control::fdpass::send_with_fd;
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsFd;

    /// A control connection served by the real handler, with the device side replaced by a
    /// Shared on a temp file (no ublk needed).
    fn session() -> (
        tempfile::NamedTempFile,
        Arc<Shared>,
        UnixStream,
        BufReader<UnixStream>,
    ) {
        let (f, shared) = crate::shared::tests::shared_with(1 << 20, 1);
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (s2, info) = (shared.clone(), test_info());
        std::thread::spawn(move || serve_client(theirs, &s2, &info));
        let reader = BufReader::new(ours.try_clone().expect("clone"));
        (f, shared, ours, reader)
    }

    /// What the handler is told of the (absent) device.
    pub(crate) fn test_info() -> DeviceInfo {
        DeviceInfo {
            dev_id: 0,
            bdev: "/dev/ublkb0".into(),
            queues: 1,
            depth: 1,
            max_io_bytes: 4096,
        }
    }

    fn reply(r: &mut BufReader<UnixStream>) -> Reply {
        let mut line = String::new();
        r.read_line(&mut line).expect("reply");
        serde_json::from_str(line.trim_end()).expect("reply json")
    }

    fn code_of(r: &Reply) -> &str {
        r.error.as_ref().map(|e| e.code.as_str()).unwrap_or("ok")
    }

    #[test]
    fn errors_are_replies_and_the_connection_survives() {
        let (_f, _s, mut c, mut r) = session();
        c.write_all(b"garbage\n").expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_REQUEST);
        c.write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"frob\"}\n")
            .expect("send");
        let rep = reply(&mut r);
        assert_eq!((code_of(&rep), rep.id), (code::UNKNOWN_COMMAND, 3));
        c.write_all(b"{\"v\":2,\"id\":4,\"cmd\":\"stats\"}\n")
            .expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_VERSION);
        c.write_all(&vec![b'x'; MAX_LINE + 10]).expect("send");
        c.write_all(b"\n").expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_REQUEST, "oversized line");
        // The same line split across reads, with the newline in the last part.
        c.write_all(&vec![b'y'; 40_000]).expect("send");
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.write_all(&vec![b'y'; 30_000]).expect("send");
        c.write_all(b"\n").expect("send");
        let rep = reply(&mut r);
        assert!(
            rep.error
                .as_ref()
                .is_some_and(|e| e.message.contains("line longer")),
            "split oversized line: {rep:?}"
        );
        c.write_all(b"{\"v\":1,\"id\":9,\"cmd\":\"stats\"}\n")
            .expect("send");
        let rep = reply(&mut r);
        assert!(
            rep.ok && rep.id == 9,
            "still serving after the errors: {rep:?}"
        );
        let v = rep.result.expect("stats");
        assert_eq!(v["reqs_outstanding"], 0);
        assert_eq!(v["nbd_mirror_failed"], 0);
    }

    #[test]
    fn fds_bind_to_their_line_and_bad_ones_are_closed() {
        let (_f, shared, c, mut r) = session();
        let (sock, _peer) = UnixStream::pair().expect("pair");
        let file = std::fs::File::open("/dev/null").expect("file");
        // An fd on the wrong command.
        send_with_fd(&c, b"{\"v\":1,\"id\":1,\"cmd\":\"stats\"}\n", sock.as_fd()).expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
        // Not a socket.
        send_with_fd(
            &c,
            b"{\"v\":1,\"id\":2,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"f\"}}\n",
            file.as_fd(),
        )
        .expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
        // pass-fd without an fd.
        (&c).write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"f\"}}\n")
            .expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
        // A good one, then its replacement.
        let line = b"{\"v\":1,\"id\":4,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"m\"}}\n";
        send_with_fd(&c, line, sock.as_fd()).expect("send");
        let rep = reply(&mut r);
        assert!(rep.ok, "{rep:?}");
        send_with_fd(&c, line, sock.as_fd()).expect("send");
        assert_eq!(reply(&mut r).result.expect("ok")["replaced"], true);
        assert_eq!(lock(&shared.fds).len(), 1);
        (&c).write_all(b"{\"v\":1,\"id\":5,\"cmd\":\"list-fds\"}\n")
            .expect("send");
        let fds = reply(&mut r).result.expect("list");
        assert_eq!(fds["fds"][0]["name"], "m");
        assert_eq!(fds["fds"][0]["family"], "unix");
        (&c).write_all(b"{\"v\":1,\"id\":6,\"cmd\":\"close-fd\",\"args\":{\"name\":\"m\"}}\n")
            .expect("send");
        assert!(reply(&mut r).ok);
        assert!(lock(&shared.fds).is_empty());
    }

    #[test]
    fn two_fds_in_one_message_are_rejected() {
        let (_f, shared, c, mut r) = session();
        let (a, _pa) = UnixStream::pair().expect("pair");
        let (b, _pb) = UnixStream::pair().expect("pair");
        let line = b"{\"v\":1,\"id\":7,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"two\"}}\n";
        control::fdpass::send_with_fds(&c, line, &[a.as_fd(), b.as_fd()]).expect("send");
        assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
        assert!(
            lock(&shared.fds).is_empty(),
            "nothing stored from a message with two fds"
        );
    }

    /// `pause` and `wait-idle` with `timeout: 0` wait as long as it takes (as `mirror-start`'s
    /// 0 does); they do not fail at once.
    #[test]
    fn a_zero_timeout_is_no_limit() {
        let (_f, shared, mut c, mut r) = session();
        shared.io.stats.queue(0).start(); // one request being served
        for (id, cmd) in [(1, "wait-idle"), (2, "pause")] {
            let line =
                format!("{{\"v\":1,\"id\":{id},\"cmd\":\"{cmd}\",\"args\":{{\"timeout\":0}}}}\n");
            c.write_all(line.as_bytes()).expect("send");
            r.get_ref()
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let mut early = String::new();
            assert!(
                r.read_line(&mut early).is_err(),
                "{cmd} with timeout 0 answered while a request was outstanding: {early}"
            );
            r.get_ref().set_read_timeout(None).expect("timeout");
            shared.io.stats.queue(0).complete();
            let rep = reply(&mut r);
            assert!(rep.ok && rep.id == id, "{cmd}: {rep:?}");
            shared.io.stats.queue(0).start();
        }
        assert_eq!(shared.state(), crate::shared::DeviceState::Paused);
        shared.io.stats.queue(0).complete();
        // Out of range is refused, with the rule.
        c.write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"wait-idle\",\"args\":{\"timeout\":-1}}\n")
            .expect("send");
        let rep = reply(&mut r);
        assert_eq!(code_of(&rep), code::BAD_REQUEST);
        assert!(rep
            .error
            .is_some_and(|e| e.message.contains("0 (no limit)")));
    }

    #[test]
    fn wait_ready_is_served_as_mirror_wait_ready() {
        let (_f, _s, mut c, mut r) = session();
        for (id, cmd) in [(1, "mirror-wait-ready"), (2, "wait-ready")] {
            let line = format!("{{\"v\":1,\"id\":{id},\"cmd\":\"{cmd}\",\"args\":{{}}}}\n");
            c.write_all(line.as_bytes()).expect("send");
            let rep = reply(&mut r);
            // Known, and answered: no copy is running.
            assert_eq!(
                (code_of(&rep), rep.id),
                (code::BAD_STATE, id),
                "{cmd}: {rep:?}"
            );
        }
    }

    #[test]
    fn at_most_sixteen_fds() {
        let (_f, _s, c, mut r) = session();
        let (sock, _peer) = UnixStream::pair().expect("pair");
        for i in 0..=MAX_FDS {
            let line = format!(
                "{{\"v\":1,\"id\":{i},\"cmd\":\"pass-fd\",\"args\":{{\"name\":\"n{i}\"}}}}\n"
            );
            send_with_fd(&c, line.as_bytes(), sock.as_fd()).expect("send");
            let rep = reply(&mut r);
            if i < MAX_FDS {
                assert!(rep.ok, "{rep:?}");
            } else {
                assert_eq!(code_of(&rep), code::TOO_MANY_FDS);
            }
        }
    }
}

/// Fuzzing of the request parser and dispatcher (a stand-in for cargo-fuzz, which needs a
/// nightly toolchain): arbitrary bytes, and well-formed requests of every command with fields
/// of arbitrary types and values, against the real handler on a temp-file device. Every input
/// must get a reply: no panic, no hang.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;
    use std::sync::OnceLock;

    struct Target {
        _image: tempfile::NamedTempFile,
        shared: Arc<Shared>,
        info: DeviceInfo,
    }

    fn target() -> &'static Target {
        static T: OnceLock<Target> = OnceLock::new();
        T.get_or_init(|| {
            let (image, shared) = crate::shared::tests::shared_with(1 << 20, 1);
            Target {
                _image: image,
                shared,
                info: super::tests::test_info(),
            }
        })
    }

    const COMMANDS: &[&str] = &[
        "info",
        "stats",
        "pause",
        "unpause",
        "pass-fd",
        "list-fds",
        "close-fd",
        "wait-idle",
        "shutdown",
        "mirror-start",
        "mirror-stop",
        "mirror-wait-ready",
        "wait-ready",
        "dirty-map",
        "frob",
    ];
    const FIELDS: &[&str] = &[
        "name", "timeout", "image", "mirror", "export", "copy", "resync", "speed", "nbd", "keep",
        "size", "flags",
    ];

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            "\\PC{0,80}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_answered(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let t = target();
            let r = handle_line(&line, None, false, &t.shared, &t.info);
            prop_assert!(!r.ok || serde_json::from_slice::<Value>(&line).is_ok());
        }

        #[test]
        fn every_command_with_any_arguments_is_answered(
            cmd in select(COMMANDS),
            v in 0u64..3,
            args in proptest::collection::vec((select(FIELDS), value()), 0..4),
        ) {
            let t = target();
            let args: serde_json::Map<String, Value> =
                args.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let line = serde_json::to_vec(&serde_json::json!({
                "v": v, "id": 1, "cmd": cmd, "args": args,
            })).expect("json");
            let r = handle_line(&line, None, false, &t.shared, &t.info);
            prop_assert!(r.ok || r.error.is_some());
        }
    }
}
