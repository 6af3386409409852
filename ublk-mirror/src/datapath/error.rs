//! Errors of the data path, each named for the action that failed, and their one mapping to
//! the errno the guest sees.

/// A leg could not carry out its part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LegError {
    #[error("read of the image at {offset} failed: errno {errno}")]
    ReadImage { offset: u64, errno: i32 },
    #[error("read of the image at {offset} hit end of file (image truncated behind our back?)")]
    ShortRead { offset: u64 },
    #[error("write to the image at {offset} failed: errno {errno}")]
    WriteImage { offset: u64, errno: i32 },
    #[error("write to the image at {offset} made no progress")]
    ShortWrite { offset: u64 },
    #[error("fdatasync of the image failed: errno {errno}")]
    Flush { errno: i32 },
    #[error("zeroing the image at {offset} failed: errno {errno}")]
    ZeroImage { offset: u64, errno: i32 },
    #[error("internal error: a read reached the write path")]
    NotAWrite,
}

impl LegError {
    /// The errno completed to the guest. A failed local leg is the guest's error: EIO unless
    /// the kernel said something more specific that a block device may report (ENOSPC).
    pub fn errno(&self) -> i32 {
        match self {
            LegError::ReadImage { errno, .. }
            | LegError::WriteImage { errno, .. }
            | LegError::Flush { errno }
            | LegError::ZeroImage { errno, .. } => match *errno {
                libc::ENOSPC => libc::ENOSPC,
                _ => libc::EIO,
            },
            LegError::ShortRead { .. } | LegError::ShortWrite { .. } | LegError::NotAWrite => {
                libc::EIO
            }
        }
    }
}
