//! Attaching a target: a stored fd becomes a stream in NBD's transmission phase (running the
//! handshake unless the fd came negotiated), and the export is refused unless it can take
//! this device. Nothing here changes the daemon: the caller publishes the link on success.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use control::protocol::NegotiatedNbd;
use nbd_proxy::address::Stream;
use nbd_proxy::client::{Export, Negotiator};
use nbd_proxy::proto::{BlockSize, Command};

/// What the device needs of an export.
#[derive(Debug, Clone, Copy)]
pub struct DeviceNeeds {
    pub dev_size: u64,
    pub logical_block: u32,
    pub max_io: u32,
}

/// The fd as a stream to the target in the transmission phase, and its export: as negotiated
/// by the orchestrator (`nbd`), or by our own handshake for `export_name`. The error is the
/// reason the mirror is refused.
pub fn connect(
    fd: OwnedFd,
    nbd: Option<NegotiatedNbd>,
    export_name: &str,
) -> Result<(Stream, Export), String> {
    let family = socket_family(fd.as_raw_fd());
    let stream = if family == libc::AF_UNIX {
        Stream::Unix(std::os::unix::net::UnixStream::from(fd))
    } else {
        let s = std::net::TcpStream::from(fd);
        let _ = s.set_nodelay(true);
        Stream::Tcp(s)
    };
    if let Some(n) = nbd {
        let export = Export {
            name: n.export,
            size: n.size,
            flags: n.flags,
            block_size: BlockSize::from_array(n.block_size),
        };
        return Ok((stream, export));
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let (s, e) = Negotiator::start(stream)
        .and_then(|n| n.go(export_name))
        .map_err(|e| format!("NBD handshake: {e}"))?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((s, e))
}

/// Refuses, with the reason, an export that cannot take the device: too small, read-only,
/// without FLUSH (the target could not be crash-consistent), or with block sizes that do not
/// fit.
pub fn check_export(export: &Export, dev: DeviceNeeds, need_flush: bool) -> Result<(), String> {
    if export.size < dev.dev_size {
        return Err(format!(
            "export {:?} has {} bytes, smaller than the {}-byte device",
            export.name, export.size, dev.dev_size
        ));
    }
    // Every mirror sends writes, and flushes unless told the target need not take them
    // (`need_flush` false, for tapdisk's servers); the rest has a fallback on the ring
    // (`ring_conn.rs`): FUA as a write then a flush (or a plain write), discard and
    // write-zeroes as zero-filled writes.
    let mut needed = vec![(Command::Write, "")];
    if need_flush {
        needed.push((
            Command::Flush,
            ": the target could not be crash-consistent (mirror-start --allow-no-flush mirrors \
             anyway, and a guest flush then promises nothing about the target)",
        ));
    }
    for (command, consequence) in needed {
        if let Some(why) = export.refusal(command, 0) {
            return Err(format!(
                "export {:?} refused: {why}{consequence}",
                export.name
            ));
        }
    }
    if export.block_size.maximum < dev.max_io || export.block_size.minimum > dev.logical_block {
        return Err(format!(
            "export {:?} block sizes (min {}, max {}) do not fit the device (block {}, max io {})",
            export.name,
            export.block_size.minimum,
            export.block_size.maximum,
            dev.logical_block,
            dev.max_io
        ));
    }
    Ok(())
}

/// Refuses a further connection whose export differs from the first one's: every
/// connection of a mirror must reach the same export.
pub fn check_same(first: &Export, other: &Export) -> Result<(), String> {
    if first == other {
        return Ok(());
    }
    Err(format!(
        "export {:?} ({} bytes, flags {:#x}, block sizes {:?}) differs from the first \
         connection's {:?} ({} bytes, flags {:#x}, block sizes {:?})",
        other.name,
        other.size,
        other.flags,
        other.block_size.to_array(),
        first.name,
        first.size,
        first.flags,
        first.block_size.to_array()
    ))
}

/// The socket under a stream, for the ring that drives it.
pub fn into_fd(stream: Stream) -> OwnedFd {
    match stream {
        Stream::Tcp(s) => s.into(),
        Stream::Unix(s) => s.into(),
    }
}

/// The address family (AF_UNIX, AF_INET, ...) of a socket fd; -1 if it is not a socket.
pub fn socket_family(fd: RawFd) -> i32 {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid fd and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        i32::from(addr.ss_family)
    } else {
        -1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proxy::proto::tx_flags;

    fn export(size: u64, flags: u16, block_size: [u32; 3]) -> Export {
        Export {
            name: "e".into(),
            size,
            flags,
            block_size: BlockSize::from_array(block_size),
        }
    }

    #[test]
    fn an_export_that_cannot_take_the_device_is_refused_with_the_reason() {
        let dev = DeviceNeeds {
            dev_size: 1 << 20,
            logical_block: 512,
            max_io: 4096,
        };
        let ok = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH;
        assert!(check_export(&export(1 << 20, ok, [1, 4096, 32 << 20]), dev, true).is_ok());
        let small = check_export(&export(4096, ok, [1, 4096, 32 << 20]), dev, true);
        assert!(small.is_err_and(|m| m.contains("smaller than")));
        let ro = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::READ_ONLY;
        let ro = check_export(&export(1 << 20, ro, [1, 4096, 32 << 20]), dev, true);
        assert!(ro.is_err_and(|m| m.contains("read-only")));
        let no_flush = check_export(
            &export(1 << 20, tx_flags::HAS_FLAGS, [1, 4096, 1 << 20]),
            dev,
            true,
        );
        assert!(no_flush.is_err_and(|m| m.contains("FLUSH") && m.contains("--allow-no-flush")));
        // Asked to, it mirrors to tapdisk's exports: flags 0 offer nothing, not even FLUSH;
        // a read-only one is still refused.
        assert!(check_export(&export(1 << 20, 0, [1, 4096, 1 << 20]), dev, false).is_ok());
        let ro_flags = tx_flags::HAS_FLAGS | tx_flags::READ_ONLY;
        let ro = check_export(&export(1 << 20, ro_flags, [1, 4096, 1 << 20]), dev, false);
        assert!(ro.is_err_and(|m| m.contains("read-only")));
        let blocks = check_export(&export(1 << 20, ok, [4096, 4096, 1 << 20]), dev, true);
        assert!(blocks.is_err_and(|m| m.contains("block sizes")));
    }
}
