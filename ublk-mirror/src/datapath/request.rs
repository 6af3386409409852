//! A guest request, parsed once from the ublk io descriptor and matched exhaustively afterwards.

use libublk::sys;

/// What the guest asked for. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Discard { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32 },
}

/// Why a descriptor was refused before any I/O; the guest gets the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("op {op}: range {offset}+{len} is outside the {size}-byte device")]
    OutOfRange {
        op: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("op {op}: {len} bytes exceed the {max}-byte io buffer")]
    TooLarge { op: u32, len: u64, max: u32 },
    /// A READ, WRITE, DISCARD or WRITE_ZEROES of zero sectors. The block layer never sends one;
    /// refusing it keeps every leg's code free of the empty case (a 0-byte NBD WRITE, an empty
    /// batch of zero-writes that would never complete).
    #[error("op {op}: zero-length request at offset {offset}")]
    Empty { op: u32, offset: u64 },
    /// An op we do not serve (zone ops, WRITE_SAME, anything newer than us).
    #[error("unsupported op {0}")]
    Unsupported(u32),
}

impl RequestError {
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::OutOfRange { .. }
            | RequestError::TooLarge { .. }
            | RequestError::Empty { .. } => libc::EINVAL,
            RequestError::Unsupported(_) => libc::EOPNOTSUPP,
        }
    }
}

impl Request {
    /// The byte range a request touches, for those that have one (not FLUSH).
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Request::Read { offset, len }
            | Request::Write { offset, len, .. }
            | Request::Discard { offset, len }
            | Request::WriteZeroes { offset, len } => Some((offset, u64::from(len))),
            Request::Flush => None,
        }
    }

    /// Parses a descriptor; `dev_size` and `max_io` bound what a data request may touch.
    pub fn parse(
        op_flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        dev_size: u64,
        max_io: u32,
    ) -> Result<Request, RequestError> {
        let op = op_flags & 0xff;
        let offset = start_sector << 9;
        let len64 = u64::from(nr_sectors) << 9;
        let in_range = || offset.checked_add(len64).is_some_and(|end| end <= dev_size);
        let range_err = RequestError::OutOfRange {
            op,
            offset,
            len: len64,
            size: dev_size,
        };
        match op {
            sys::UBLK_IO_OP_FLUSH => return Ok(Request::Flush),
            sys::UBLK_IO_OP_READ
            | sys::UBLK_IO_OP_WRITE
            | sys::UBLK_IO_OP_DISCARD
            | sys::UBLK_IO_OP_WRITE_ZEROES => {}
            other => return Err(RequestError::Unsupported(other)),
        }
        if nr_sectors == 0 {
            return Err(RequestError::Empty { op, offset });
        }
        if !in_range() {
            return Err(range_err);
        }
        let is_data = op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE;
        if is_data && len64 > u64::from(max_io) {
            return Err(RequestError::TooLarge {
                op,
                len: len64,
                max: max_io,
            });
        }
        // nr_sectors is a u32 count of sectors; only data requests are bounded by the buffer,
        // so discard ranges may exceed u32 bytes in principle. Refuse what we cannot express.
        let len = u32::try_from(len64).map_err(|_| range_err)?;
        Ok(match op {
            sys::UBLK_IO_OP_READ => Request::Read { offset, len },
            sys::UBLK_IO_OP_WRITE => Request::Write {
                offset,
                len,
                fua: op_flags & sys::UBLK_IO_F_FUA != 0,
            },
            sys::UBLK_IO_OP_DISCARD => Request::Discard { offset, len },
            _ => Request::WriteZeroes { offset, len },
        })
    }
}

#[cfg(test)]
mod tests;
