//! The lock on an image (or bitmap) file, so that no two processes serve the same file: taken
//! by `nbd-proxy serve` on every export and by the daemon on its image and bitmap, which
//! therefore also exclude each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Exclusive for a writer; shared lets several read-only servers open one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Exclusive,
    Shared,
}

/// Takes the lock without waiting (EAGAIN if another open holds a conflicting one). An
/// open-file-description lock belongs to this open file, not to the process: it is released
/// when the fd is closed and it conflicts with every other open of the file, in this process
/// or another (a POSIX record lock would not conflict within one process).
pub fn lock(file: &File, mode: LockMode) -> io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is a valid value that we then fill in.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = match mode {
        LockMode::Exclusive => libc::F_WRLCK,
        LockMode::Shared => libc::F_RDLCK,
    } as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0 and l_len 0: the whole file, however it grows.
    const F_OFD_SETLK: libc::c_int = 37;
    // SAFETY: the fd is open for the duration of the call and `l` is a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), F_OFD_SETLK, &l) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lock(file, LockMode::Exclusive)`.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    lock(file, LockMode::Exclusive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, b"x").unwrap();
        let a = File::options().read(true).write(true).open(&path).unwrap();
        let b = File::options().read(true).write(true).open(&path).unwrap();
        lock_exclusive(&a).unwrap();
        assert!(
            lock_exclusive(&b).is_err(),
            "the same process, another open"
        );
        assert!(lock(&b, LockMode::Shared).is_err());
        drop(a);
        lock(&b, LockMode::Shared).unwrap();
        let c = File::open(&path).unwrap();
        lock(&c, LockMode::Shared).unwrap();
    }
}
