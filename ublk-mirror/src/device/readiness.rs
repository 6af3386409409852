//! Telling a supervisor that the device is live: `--ready-fd N` and systemd's sd_notify.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use anyhow::{bail, Result};

/// Where to report readiness. Both may be set.
pub struct Readiness {
    ready_fd: Mutex<Option<File>>,
    notify_socket: Option<String>,
}

impl Readiness {
    /// Takes ownership of `ready_fd` (checked to be open) and reads `NOTIFY_SOCKET`.
    pub fn new(ready_fd: Option<RawFd>) -> Result<Readiness> {
        let file = match ready_fd {
            Some(fd) => {
                // SAFETY: F_GETFD only inspects the descriptor table entry.
                if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    bail!("--ready-fd {fd} is not an open file descriptor");
                }
                // Keep it from leaking into anything we exec later.
                // SAFETY: fd is open (checked above); setting FD_CLOEXEC has no other effect.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                // SAFETY: the caller handed us this fd to own; nothing else in this process
                // uses it, and it is closed exactly once, when the File drops.
                Some(unsafe { File::from_raw_fd(fd) })
            }
            None => None,
        };
        Ok(Readiness {
            ready_fd: Mutex::new(file),
            notify_socket: std::env::var("NOTIFY_SOCKET").ok(),
        })
    }

    /// The device is live at `bdev`: write `READY=1` to the ready fd and close it, and
    /// notify systemd.
    pub fn ready(&self, bdev: &str) {
        if let Ok(mut guard) = self.ready_fd.lock() {
            if let Some(mut f) = guard.take() {
                if let Err(e) = writeln!(f, "READY=1 DEVICE={bdev}") {
                    log::warn!("cannot write to --ready-fd: {e}");
                }
            }
        }
        self.notify(&format!("READY=1\nSTATUS=serving {bdev}"));
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    fn notify(&self, msg: &str) {
        let Some(path) = &self.notify_socket else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|sock| {
            if let Some(abstract_name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
                sock.send_to_addr(msg.as_bytes(), &addr)
            } else {
                sock.send_to(msg.as_bytes(), path)
            }
        });
        if let Err(e) = sent {
            log::warn!("sd_notify to {path} failed: {e}");
        }
    }
}
