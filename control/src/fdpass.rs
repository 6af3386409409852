//! Passing one fd with a message over a Unix stream socket (SCM_RIGHTS), exactly.
//!
//! A stream has no message boundaries, so the rules are: the sender sends a request line and
//! its fd in one sendmsg; the receiver always reads with recvmsg with room for one fd
//! (close-on-exec), and learns from each read whether an fd came with it, or more than one
//! (several fds, or control data truncated): then every fd is closed and the request rejected.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// One sendmsg carrying `data` and one fd as SCM_RIGHTS.
pub fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    send_with_fds(sock, data, &[fd])
}

/// One sendmsg carrying `data` and `fds` as SCM_RIGHTS (the protocol allows one; more is for
/// testing the receiver's refusal).
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is a pure computation on a size.
    let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid and filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one cmsghdr with the
    // fds, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `raw`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
    }
    // SAFETY: msg and everything it points to (iov, data, cbuf) live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < data.len() {
        // The fds went with the first part; send the rest of the line plainly.
        (&*sock).write_all(&data[n as usize..])?;
    }
    Ok(())
}

/// What one recvmsg returned.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer; 0 at end of stream.
    pub len: usize,
    /// The fd that came with these bytes, if any (close-on-exec).
    pub fd: Option<OwnedFd>,
    /// The sender passed more than one fd with these bytes (several fds, or control data the
    /// kernel truncated with MSG_CTRUNC): reject the request. Every fd is closed already.
    pub excess_fds: bool,
}

/// One recvmsg with room for one fd.
pub fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: CMSG_SPACE is a pure computation on a constant size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid and filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at buffers we own that live across the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    let mut count = 0usize;
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // within that buffer, and CMSG_DATA of an SCM_RIGHTS header holds fds we now own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let header = libc::CMSG_LEN(0) as usize;
                let n = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..n {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    count += 1;
                    if fd.is_none() {
                        fd = Some(owned);
                    } // else: dropped, i.e. closed
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // CMSG_SPACE for one int is padded, so two fds can fit without MSG_CTRUNC: count them.
    let excess_fds = msg.msg_flags & libc::MSG_CTRUNC != 0 || count > 1;
    if excess_fds {
        fd = None;
    }
    Ok(Received {
        len: n as usize,
        fd,
        excess_fds,
    })
}
