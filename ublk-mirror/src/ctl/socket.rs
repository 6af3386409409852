//! The listening socket, admission of clients (root or our own user, at most
//! `MAX_CLIENTS`), and line assembly: a line is at most `MAX_LINE` bytes however it was split
//! across reads, and an fd binds to the first line that ends in the read it came with.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use control::fdpass::recv_with_fd;
use control::protocol::{code, Reply, MAX_LINE};

use crate::ctl::dispatch::handle_line;
use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;
use crate::events::Subscription;

/// Control clients connected at once; more are told so and closed.
const MAX_CLIENTS: usize = 16;

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
    pub fn start(path: &Path, daemon: Arc<Daemon>, info: DeviceInfo) -> Result<ControlServer> {
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
            .spawn(move || accept_loop(listener, daemon, info, clients))
            .context("spawning the control thread")?;
        Ok(ControlServer {
            path: path.to_owned(),
        })
    }
}

fn accept_loop(
    listener: UnixListener,
    daemon: Arc<Daemon>,
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
        let (daemon, info, clients) = (daemon.clone(), info.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let watcher = serve_client(conn, &daemon, &info);
                // A watcher leaves the clients' count: it never locks out `stats`.
                clients.fetch_sub(1, Ordering::SeqCst);
                if let Some((conn, sub)) = watcher {
                    super::watch::serve(conn, &daemon, sub);
                }
            });
        if let Err(e) = spawned {
            log::error!("control: no thread for a client: {e}");
        }
    }
}

/// Root or our own user only (the control socket's rule, and the tapdisk fd receiver's).
pub(crate) fn peer_allowed(conn: &UnixStream) -> std::result::Result<(), String> {
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

/// Serves one client's lines until it closes; a `watch` ends it early and hands back the
/// connection with its subscription.
pub(crate) fn serve_client(
    mut conn: UnixStream,
    daemon: &Arc<Daemon>,
    info: &DeviceInfo,
) -> Option<(UnixStream, Subscription)> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut pending: Vec<u8> = Vec::new();
    let mut discarding = false;
    loop {
        let got = match recv_with_fd(&conn, &mut buf) {
            Ok(r) if r.len == 0 => return None,
            Ok(r) => r,
            Err(e) => {
                log::debug!("control client: {e}");
                return None;
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
                    return None;
                }
                continue;
            }
            // The fd and a truncation belong to the first line that ends in this read.
            let reply = handle_line(
                &line,
                fd.take(),
                std::mem::take(&mut excess_fds),
                daemon,
                info,
            );
            let sent = send(&mut conn, &reply);
            super::handlers::send_stop_after_reply(daemon);
            let watch = super::handlers::take_watch();
            if sent.is_err() {
                return None;
            }
            if let Some(sub) = watch {
                return Some((conn, sub));
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
                    return None;
                }
            }
        }
    }
}
