//! The fds the orchestrator passed (`pass-fd`, or tapdisk's `nbdclient<pid>` socket), by
//! name, until a mirror takes one or `close-fd` closes it.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use control::protocol::{code, NegotiatedNbd, MAX_FDS, MAX_FD_NAME};

use crate::lock::lock;

/// An fd passed by the orchestrator.
#[derive(Debug)]
pub struct StoredFd {
    pub fd: OwnedFd,
    pub nbd: Option<NegotiatedNbd>,
}

/// What an fd hand-off socket other than the control socket (tapdisk's `nbdclient<pid>`)
/// did, for `stats`.
#[derive(Debug, Default)]
pub struct HandoffCounters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
}

/// Why an fd was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("fd names are 1..={MAX_FD_NAME} printable bytes")]
    BadName,
    #[error("at most {MAX_FDS} fds; close-fd one")]
    Full,
    #[error("{0}")]
    NotAStreamSocket(String),
}

impl StoreError {
    /// The control protocol's error code (`control/PROTOCOL.md`).
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::BadName => code::BAD_REQUEST,
            StoreError::Full => code::TOO_MANY_FDS,
            StoreError::NotAStreamSocket(_) => code::BAD_FD,
        }
    }
}

/// The stored fds, by name.
#[derive(Debug, Default)]
pub struct FdStore {
    fds: Mutex<BTreeMap<String, StoredFd>>,
}

impl FdStore {
    /// The table, for a command that reads or changes several entries at once.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, StoredFd>> {
        lock(&self.fds)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Stores `fd` under `name` (the whole name is the key, `/` included); a second fd under
    /// a name replaces and closes the first. True if it replaced one. The fd must be a stream
    /// socket, at most `MAX_FDS` are kept; on an error the fd is closed.
    pub fn store(&self, name: &str, fd: StoredFd) -> Result<bool, StoreError> {
        if name.is_empty() || name.len() > MAX_FD_NAME || name.chars().any(char::is_control) {
            return Err(StoreError::BadName);
        }
        check_stream_socket(&fd.fd).map_err(StoreError::NotAStreamSocket)?;
        let mut fds = self.lock();
        if !fds.contains_key(name) && fds.len() >= MAX_FDS {
            return Err(StoreError::Full);
        }
        Ok(fds.insert(name.to_owned(), fd).is_some())
    }

    /// Takes the fd `name` out of the store (a mirror uses it, or it is closed).
    pub fn take(&self, name: &str) -> Option<StoredFd> {
        self.lock().remove(name)
    }
}

/// Mirror targets are stream sockets (TCP, or a Unix socketpair from a TLS relay).
fn check_stream_socket(fd: &OwnedFd) -> Result<(), String> {
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
