//! The exclusive lock on an image or bitmap file, so that no two daemons serve (or record)
//! the same file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// An open-file-description lock belongs to this open file, not to the process: it is released
/// when the fd is closed and it conflicts with every other open of the image, in this process
/// or another (a POSIX record lock would not conflict within one process).
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is a valid value that we then fill in.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // the whole file, however it grows
    const F_OFD_SETLK: libc::c_int = 37;
    // SAFETY: the fd is open for the duration of the call and `lock` is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), F_OFD_SETLK, &lock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
