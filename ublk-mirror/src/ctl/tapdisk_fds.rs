//! tapdisk's fd hand-off socket, `DIR/nbdclient<pid>` (`serve --tapdisk-compat`), so that
//! xapi's `mirror_pass_fds` works unchanged: a client connects, sends one message whose
//! payload is the fd's name (e.g. `mirror_vbd/<vm-uuid>/<vdi-uuid>`) with the fd as
//! SCM_RIGHTS, and closes without reading a reply (none is sent). The fd is stored as
//! `pass-fd` stores it (same cap, a name replaces the fd stored under it), and a later
//! `unpause --mirror NAME` (`tap-ctl unpause -2 nbd:NAME`) mirrors to it.
//!
//! Safety of the path: the directory must be a real directory (not a symlink) owned by root
//! or this daemon's user and not writable by group or others, the socket is 0600, only root
//! or this user may hand over fds (as the control socket), and a socket somebody still
//! listens on is never unlinked.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use control::fdpass::recv_with_fd;

use crate::ctl::socket::peer_allowed;
use crate::daemon::Daemon;
use crate::fd_store::{HandoffCounters as Counters, StoredFd};

/// Where tapdisk's control sockets live, and so where xapi looks for `nbdclient<pid>`.
pub const DEFAULT_DIR: &str = "/run/blktap-control";

/// tapdisk reads the name with one recvmsg into a buffer of this size.
const MESSAGE_BUF: usize = 16 * 1024;

/// How long a connected client may take to send its one message: the receiver serves one
/// client at a time, as tapdisk's does, so a silent one must not hold it.
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// The listening socket and its counters; the socket is removed when dropped (if it is
/// still the one this daemon bound).
pub struct TapdiskFdReceiver {
    path: PathBuf,
    ino: u64,
    pub counters: Arc<Counters>,
}

impl Drop for TapdiskFdReceiver {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `DIR/nbdclient<pid>`: the name xapi computes from the pid `tap-ctl list` shows.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("nbdclient{pid}"))
}

impl TapdiskFdReceiver {
    /// Checks `dir` (creating it 0755 if missing), binds `DIR/nbdclient<our pid>` and serves
    /// it on its own thread.
    pub fn start(dir: &Path, daemon: Arc<Daemon>) -> Result<TapdiskFdReceiver> {
        check_dir(dir)?;
        let path = socket_path(dir, std::process::id());
        remove_if_stale(&path)?;
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let ino = std::fs::symlink_metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("tapdisk-fds".into())
            .spawn(move || accept_loop(listener, &daemon, &c))
            .context("spawning the tapdisk fd receiver")?;
        log::info!(
            "tapdisk fd receiver {} (xapi's mirror_pass_fds)",
            path.display()
        );
        Ok(TapdiskFdReceiver {
            path,
            ino,
            counters,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// After `recover`: the previous daemon's socket, unless somebody still listens on it.
pub fn remove_previous(dir: &Path, pid: u32) {
    let old = socket_path(dir, pid);
    if pid != std::process::id() {
        if let Err(e) = remove_if_stale(&old) {
            log::warn!("previous daemon's fd receiver: {e:#}");
        }
    }
}

/// Refuses a directory another user could swap the socket in: a symlink, not a directory,
/// owned by someone other than root or us, or writable by group or others.
fn check_dir(dir: &Path) -> Result<()> {
    // Nothing there at all (a dangling symlink is something, refused below).
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        bail!("tapdisk directory {shown} is a symlink: refusing it (give the real path)");
    }
    if !meta.is_dir() {
        bail!("tapdisk directory {shown} is not a directory");
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        bail!(
            "tapdisk directory {shown} is owned by uid {}, not root: refusing it",
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "tapdisk directory {shown} is writable by group or others (mode {:o}): refusing \
             it (chmod go-w)",
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Removes `path` if it is a socket nobody listens on; refuses one that is live or not a
/// socket.
fn remove_if_stale(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket: refusing it", path.display());
    }
    if UnixStream::connect(path).is_ok() {
        bail!(
            "{} is in use: another process listens on it",
            path.display()
        );
    }
    log::warn!("removing stale socket {} (nobody listens)", path.display());
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

fn accept_loop(listener: UnixListener, daemon: &Daemon, counters: &Counters) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("tapdisk fd receiver: accept: {e}");
                continue;
            }
        };
        match receive_one(&conn, daemon) {
            Ok(name) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                log::info!("tapdisk fd receiver: stored fd {name:?}");
            }
            Err(why) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("tapdisk fd receiver: refused: {why}");
            }
        }
    }
}

/// One client's one message: its name and fd, stored. The error says why it was refused
/// (its fd, if any, is then closed).
fn receive_one(conn: &UnixStream, daemon: &Daemon) -> std::result::Result<String, String> {
    peer_allowed(conn)?;
    conn.set_read_timeout(Some(CLIENT_WAIT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MESSAGE_BUF];
    let got = recv_with_fd(conn, &mut buf).map_err(|e| format!("recvmsg: {e}"))?;
    if got.excess_fds {
        return Err("more than one fd in the message; all closed".into());
    }
    let fd = got
        .fd
        .ok_or_else(|| format!("a message of {} bytes without an fd", got.len))?;
    // The name is the whole payload; a C client may send its terminating NUL too.
    let raw = &buf[..got.len];
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    let name = std::str::from_utf8(raw).map_err(|_| "the name is not UTF-8".to_string())?;
    let replaced = daemon
        .fds
        .store(name, StoredFd { fd, nbd: None })
        .map_err(|e| format!("fd {name:?}: {e}"))?;
    Ok(if replaced {
        format!("{name} (replaced the old one)")
    } else {
        name.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use control::fdpass::send_with_fd;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    fn dir_with_mode(mode: u32) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        d
    }

    /// Hands `fd` over as xapi does: connect, one sendmsg, close without reading.
    fn hand_over(path: &Path, name: &[u8], fd: std::os::fd::BorrowedFd<'_>) {
        let c = UnixStream::connect(path).expect("connect");
        send_with_fd(&c, name, fd).expect("sendmsg");
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn stores_xapi_names_whole_and_refuses_bad_fds() {
        let (_f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
        let dir = dir_with_mode(0o755);
        let rx = TapdiskFdReceiver::start(dir.path(), daemon.clone()).expect("start");
        assert_eq!(
            std::fs::metadata(rx.path()).expect("socket").mode() & 0o777,
            0o600
        );
        let (sock, _peer) = UnixStream::pair().expect("pair");
        let long = format!("mirror_vbd/{}/{}", "a".repeat(36), "b".repeat(200));
        hand_over(rx.path(), long.as_bytes(), sock.as_fd());
        // A name that is a prefix of the first is another name.
        hand_over(rx.path(), &long.as_bytes()[..40], sock.as_fd());
        let file = std::fs::File::open("/dev/null").expect("file");
        hand_over(rx.path(), b"not-a-socket", file.as_fd());
        hand_over(rx.path(), b"", sock.as_fd());
        assert!(wait_for(|| {
            rx.counters.received.load(Ordering::Relaxed) == 2
                && rx.counters.refused.load(Ordering::Relaxed) == 2
        }));
        let fds = daemon.fds.lock();
        assert!(fds.contains_key(&long) && fds.contains_key(&long[..40]));
        assert_eq!(fds.len(), 2);
    }

    #[test]
    fn nothing_is_replied_and_the_socket_goes_at_exit() {
        let (_f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
        let dir = dir_with_mode(0o700);
        let rx = TapdiskFdReceiver::start(dir.path(), daemon).expect("start");
        let path = rx.path().to_owned();
        let (sock, _peer) = UnixStream::pair().expect("pair");
        let mut c = UnixStream::connect(&path).expect("connect");
        send_with_fd(&c, b"mirror_vbd/1/xvda", sock.as_fd()).expect("sendmsg");
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut reply = Vec::new();
        assert_eq!(c.read_to_end(&mut reply).expect("closed by the daemon"), 0);
        // A second receiver on the same path is refused while the first listens.
        assert!(remove_if_stale(&path).is_err(), "a live listener is kept");
        drop(rx);
        assert!(!path.exists(), "removed at exit");
    }

    #[test]
    fn unsafe_directories_are_refused() {
        let (_f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
        let open = dir_with_mode(0o777);
        let err = TapdiskFdReceiver::start(open.path(), daemon.clone())
            .err()
            .expect("world-writable refused");
        assert!(format!("{err:#}").contains("writable"), "{err:#}");
        let group = dir_with_mode(0o775);
        assert!(TapdiskFdReceiver::start(group.path(), daemon.clone()).is_err());
        let real = dir_with_mode(0o755);
        let link = real.path().join("link");
        let inner = real.path().join("inner");
        std::fs::create_dir(&inner).expect("mkdir");
        symlink(&inner, &link).expect("symlink");
        let err = TapdiskFdReceiver::start(&link, daemon)
            .err()
            .expect("symlink refused");
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_previous_one_removed() {
        let (_f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
        let dir = dir_with_mode(0o755);
        // A socket left by a dead process of our pid, and one of a previous daemon.
        drop(UnixListener::bind(socket_path(dir.path(), std::process::id())).expect("bind"));
        let old = socket_path(dir.path(), 999_999);
        drop(UnixListener::bind(&old).expect("bind"));
        let rx = TapdiskFdReceiver::start(dir.path(), daemon).expect("stale one replaced");
        assert!(UnixStream::connect(rx.path()).is_ok());
        remove_previous(dir.path(), 999_999);
        assert!(!old.exists());
        // A previous daemon's socket somebody listens on stays.
        let live = UnixListener::bind(&old).expect("bind");
        remove_previous(dir.path(), 999_999);
        assert!(old.exists());
        drop(live);
    }
}
