//! Doorbells: one nonblocking eventfd per queue and per copy worker. Ringing one wakes that
//! slot's parked requests (a queue reads its eventfd on its own ring; a copy worker polls it)
//! and tells it that mirror outcomes wait in its mailbox.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The eventfds of every slot, owned for the life of the daemon.
pub struct Doorbells {
    fds: Vec<OwnedFd>,
}

impl Doorbells {
    /// `slots` new eventfds (`slots` > 0).
    pub fn new(slots: u16) -> std::io::Result<Doorbells> {
        let fds = (0..slots)
            .map(|_| {
                // SAFETY: eventfd takes integer arguments and returns a new fd or -1.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: fd was just created and is owned by nobody else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Doorbells { fds })
    }

    /// Every slot's eventfd number, in slot order.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.fds.iter().map(|d| d.as_raw_fd()).collect()
    }

    /// Slot `slot`'s eventfd (taken modulo the number of slots).
    pub fn fd(&self, slot: u16) -> RawFd {
        self.fds[usize::from(slot) % self.fds.len()].as_raw_fd()
    }

    /// Blocks (a copy worker) until slot `slot`'s doorbell rings or `timeout` passes.
    pub fn wait(&self, slot: u16, timeout: Duration) {
        let fd = self.fd(slot);
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
        if rc > 0 {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer from our nonblocking eventfd.
            let _ = unsafe { libc::read(fd, v.as_mut_ptr().cast(), v.len()) };
        }
    }
}

/// Rings the doorbell eventfd `fd`, which must live as long as the daemon.
pub fn ring(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd that lives as long as the
    // daemon. A full counter (EAGAIN) already means "ring".
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
}
