//! The local leg: a request's effect on the local image, issued on the queue's own io_uring.
//!
//! One `LocalLeg` per queue thread. The image's fd is read from a shared slot for each
//! operation rather than registered as a fixed file: a pause closes the image (releasing its
//! lock) and an unpause may install another, and both happen only while no request is in
//! flight (see `device/lifecycle.rs`).
//!
//! Why not a fixed file (tried in issue 13): on 6.12 a fixed file replaced or removed with
//! IORING_REGISTER_FILES_UPDATE is only let go once every request issued before the update
//! has completed (io_uring recycles its resource nodes in order), and each idle tag's FETCH
//! (a uring_cmd on fixed file 0) is such a request and stays in flight throughout a pause. The
//! paused daemon then still held the image open and locked (`control-pause` checks
//! /proc/locks and failed), so an orchestrator could not take it over, and an LV under it
//! could not be deactivated, until unpause. Unregistering the whole table would wait for those
//! same FETCHes forever. Every operation is complete when its future resolves: short
//! transfers are resubmitted for the remainder, so a caller never sees a partial write.

use std::cell::{Cell, OnceCell};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;

use crate::datapath::error::LegError;

/// How many times an operation the kernel answered with EAGAIN/EINTR is retried.
const MAX_RETRIES: u32 = 8;

/// Size of the zero buffer used when the filesystem can neither zero-range nor punch holes.
const ZERO_CHUNK: usize = 1 << 20;

/// Ways to make a range read back as zeros, cheapest first for each request kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMethod {
    ZeroRange,
    PunchHole,
    WriteZeros,
}

pub struct LocalLeg {
    image_fd: Arc<AtomicI32>,
    /// Learned per queue: whether fallocate(ZERO_RANGE) / PUNCH_HOLE work on this filesystem
    /// (tmpfs has no ZERO_RANGE). Starts optimistic; set false on EOPNOTSUPP.
    zero_range_ok: Cell<bool>,
    punch_hole_ok: Cell<bool>,
    zeros: OnceCell<IoBuf<u8>>,
}

impl LocalLeg {
    pub fn new(image_fd: Arc<AtomicI32>) -> LocalLeg {
        LocalLeg {
            image_fd,
            zero_range_ok: Cell::new(true),
            punch_hole_ok: Cell::new(true),
            zeros: OnceCell::new(),
        }
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.image_fd.load(Ordering::SeqCst))
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), LegError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let sqe = opcode::Read::new(self.fd(), rest.as_mut_ptr(), len_u32(rest.len()))
                .offset(offset + done as u64)
                .build();
            match submit(sqe).await {
                Ok(0) => return Err(LegError::ShortRead { offset }),
                Ok(n) => done += n as usize,
                Err(errno) => return Err(LegError::ReadImage { offset, errno }),
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua`, the data is durable when this returns (RWF_DSYNC).
    pub async fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), LegError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let mut op = opcode::Write::new(self.fd(), rest.as_ptr(), len_u32(rest.len()))
                .offset(offset + done as u64);
            if fua {
                op = op.rw_flags(libc::RWF_DSYNC);
            }
            match submit(op.build()).await {
                Ok(0) => return Err(LegError::ShortWrite { offset }),
                Ok(n) => done += n as usize,
                Err(errno) => return Err(LegError::WriteImage { offset, errno }),
            }
        }
        Ok(())
    }

    /// fdatasync: everything completed before this call is durable when it returns.
    pub async fn flush(&self) -> Result<(), LegError> {
        let sqe = opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(sqe)
            .await
            .map(drop)
            .map_err(|errno| LegError::Flush { errno })
    }

    /// DISCARD: deallocate, and make the range read back zeros. A mirror target is sent
    /// WRITE_ZEROES for a discard, so both legs must read the same bytes afterwards.
    pub async fn discard(&self, offset: u64, len: u32) -> Result<(), LegError> {
        self.zero(
            offset,
            len,
            &[
                ZeroMethod::PunchHole,
                ZeroMethod::ZeroRange,
                ZeroMethod::WriteZeros,
            ],
        )
        .await
    }

    /// WRITE_ZEROES: zero range (keeps the blocks allocated), else punch hole, else write zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), LegError> {
        self.zero(
            offset,
            len,
            &[
                ZeroMethod::ZeroRange,
                ZeroMethod::PunchHole,
                ZeroMethod::WriteZeros,
            ],
        )
        .await
    }

    async fn zero(&self, offset: u64, len: u32, order: &[ZeroMethod]) -> Result<(), LegError> {
        for method in order {
            let mode = match method {
                ZeroMethod::ZeroRange if self.zero_range_ok.get() => {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                }
                ZeroMethod::PunchHole if self.punch_hole_ok.get() => {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                }
                ZeroMethod::WriteZeros => return self.write_zero_bytes(offset, len).await,
                _ => continue,
            };
            let sqe = opcode::Fallocate::new(self.fd(), u64::from(len))
                .offset(offset)
                .mode(mode)
                .build();
            match submit(sqe).await {
                Ok(_) => return Ok(()),
                Err(libc::EOPNOTSUPP) => {
                    let flag = if *method == ZeroMethod::ZeroRange {
                        &self.zero_range_ok
                    } else {
                        &self.punch_hole_ok
                    };
                    if flag.replace(false) {
                        log::info!("image does not support {method:?}; using the next method");
                    }
                }
                Err(errno) => return Err(LegError::ZeroImage { offset, errno }),
            }
        }
        self.write_zero_bytes(offset, len).await
    }

    async fn write_zero_bytes(&self, offset: u64, len: u32) -> Result<(), LegError> {
        let zeros = self.zeros.get_or_init(|| IoBuf::<u8>::new(ZERO_CHUNK));
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(ZERO_CHUNK as u64) as usize;
            self.write(&zeros.as_slice()[..n], offset + done, false)
                .await?;
            done += n as u64;
        }
        Ok(())
    }
}

fn len_u32(len: usize) -> u32 {
    // Request::parse bounds data requests by the io buffer size, which is a u32.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Submits one SQE on this thread's queue ring and waits for it; Ok(res >= 0) or Err(errno).
/// Transient EAGAIN/EINTR answers are retried a bounded number of times.
pub(super) async fn submit(sqe: squeue::Entry) -> Result<u32, i32> {
    let mut tries = 0;
    loop {
        let res = ublk_submit_sqe_async(sqe.clone(), UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if res >= 0 {
            return Ok(res as u32);
        }
        let errno = -res;
        tries += 1;
        if (errno == libc::EAGAIN || errno == libc::EINTR) && tries < MAX_RETRIES {
            continue;
        }
        return Err(errno);
    }
}
