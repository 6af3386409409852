//! Kernel TLS (kTLS): once rustls has run the handshake (and the NBD option haggling after
//! STARTTLS), the session's keys and record numbers are given to the kernel, and the TCP socket
//! then carries TLS records by itself. Plain `send`/`recv` on it (io_uring's included) encrypt
//! and decrypt in the caller's context: the daemon's queue ring sends and receives on it as on
//! a plain socket, and no thread relays between a TLS session and a socketpair.
//!
//! Two steps, because only the first can be undone: [`attach`] puts the "tls" upper-layer
//! protocol on the socket (it fails harmlessly where the kernel has no kTLS, and the caller
//! then keeps TLS in user space); [`install`] then hands over the keys, which consumes the
//! rustls session, so any failure there is the connection's end.
//!
//! What the kernel does not do: only application data passes through `recv`. A record of
//! another type arriving later (a TLS 1.3 KeyUpdate, a late NewSessionTicket, a close_notify)
//! makes `recv` fail with EIO, which both our ends treat as the connection's end (for the
//! daemon: the mirror fails, the guest does not notice). A server's tickets follow its
//! handshake at once, so rustls reads them before the reply to NBD_OPT_GO that the switch
//! waits for. A KeyUpdate comes only from a peer that keeps TLS in user space (a relay, or
//! another implementation) and rekeys, as rustls does before AES-GCM's limit of 2^24 records
//! in TLS 1.3 (64 GiB of 4 KiB writes on one connection): then that connection ends there.
//! Nor does the kernel send a close_notify: our ends close with NBD_CMD_DISC and a TCP FIN.
//!
//! TLS 1.2 with AES-GCM is not moved (the caller relays it): rustls makes each record's
//! explicit nonce as the key block's value XOR the record number, the kernel as that value
//! plus the records it has sent, so the kernel's first records would reuse the nonces of the
//! handshake's last ones under the same key.

use std::io;
use std::os::fd::RawFd;

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// Attaches the "tls" upper-layer protocol to TCP socket `fd`. Undoable in effect: until keys
/// are installed the socket behaves as plain TCP, so on error the caller may go on with TLS in
/// user space. ENOENT: the kernel has no kTLS (module not loaded or not built).
pub fn attach(fd: RawFd) -> io::Result<()> {
    const ULP: &[u8] = b"tls";
    // SAFETY: setsockopt reads ULP.len() bytes from a live static slice; fd is the caller's.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            ULP.as_ptr().cast(),
            ULP.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The session's direction to install.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Send,
    Receive,
}

/// Installs one direction's keys on a socket that [`attach`] prepared: `seq` is the number of
/// the next record in that direction (rustls counted the handshake's records).
pub fn install(
    fd: RawFd,
    direction: Direction,
    version: ProtocolVersion,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> io::Result<()> {
    let version = match version {
        ProtocolVersion::TLSv1_2 => libc::TLS_1_2_VERSION,
        ProtocolVersion::TLSv1_3 => libc::TLS_1_3_VERSION,
        other => return Err(unsupported(format!("protocol version {other:?}"))),
    };
    let (dir, what) = match direction {
        Direction::Send => (libc::TLS_TX, "send (TLS_TX)"),
        Direction::Receive => (libc::TLS_RX, "receive (TLS_RX)"),
    };
    let context = |module: &'static str| {
        move |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "kernel TLS: installing the {what} keys: {e} (is the kernel's {module} \
                     module loaded? --tls-relay keeps TLS in user space)"
                ),
            )
        }
    };
    let rec_seq = seq.to_be_bytes();
    let info = |cipher_type| libc::tls_crypto_info {
        version,
        cipher_type,
    };
    // The 12-byte nonce base of the GCM suites is split as the kernel wants it: a 4-byte salt
    // and 8 bytes of IV (for TLS 1.2, the implicit salt and the first explicit nonce).
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(libc::TLS_CIPHER_AES_GCM_128_SALT_SIZE);
            let mut c = libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: [0; libc::TLS_CIPHER_AES_GCM_128_IV_SIZE],
                key: [0; libc::TLS_CIPHER_AES_GCM_128_KEY_SIZE],
                salt: [0; libc::TLS_CIPHER_AES_GCM_128_SALT_SIZE],
                rec_seq,
            };
            copy(&mut c.iv, iv)?;
            copy(&mut c.key, key.as_ref())?;
            copy(&mut c.salt, salt)?;
            set(fd, dir, &c).map_err(context("gcm"))
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(libc::TLS_CIPHER_AES_GCM_256_SALT_SIZE);
            let mut c = libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: [0; libc::TLS_CIPHER_AES_GCM_256_IV_SIZE],
                key: [0; libc::TLS_CIPHER_AES_GCM_256_KEY_SIZE],
                salt: [0; libc::TLS_CIPHER_AES_GCM_256_SALT_SIZE],
                rec_seq,
            };
            copy(&mut c.iv, iv)?;
            copy(&mut c.key, key.as_ref())?;
            copy(&mut c.salt, salt)?;
            set(fd, dir, &c).map_err(context("gcm"))
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut c = libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [0; libc::TLS_CIPHER_CHACHA20_POLY1305_IV_SIZE],
                key: [0; libc::TLS_CIPHER_CHACHA20_POLY1305_KEY_SIZE],
                salt: [0; libc::TLS_CIPHER_CHACHA20_POLY1305_SALT_SIZE],
                rec_seq,
            };
            copy(&mut c.iv, iv.as_ref())?;
            copy(&mut c.key, key.as_ref())?;
            set(fd, dir, &c).map_err(context("chacha20poly1305"))
        }
        _ => Err(unsupported("a cipher suite kTLS has no mode for".into())),
    }
}

fn unsupported(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("kernel TLS: {what}"))
}

fn copy(to: &mut [u8], from: &[u8]) -> io::Result<()> {
    if to.len() != from.len() {
        return Err(unsupported(format!(
            "a key part of {} bytes where {} were expected",
            from.len(),
            to.len()
        )));
    }
    to.copy_from_slice(from);
    Ok(())
}

/// The kernel's crypto_info structs (libc's definitions: the kernel's layout, no padding).
trait CryptoInfo {}
impl CryptoInfo for libc::tls12_crypto_info_aes_gcm_128 {}
impl CryptoInfo for libc::tls12_crypto_info_aes_gcm_256 {}
impl CryptoInfo for libc::tls12_crypto_info_chacha20_poly1305 {}

fn set<T: CryptoInfo>(fd: RawFd, dir: libc::c_int, info: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from `info`, a live reference to one of the
    // kernel's tls12_crypto_info_* structs (CryptoInfo: libc's definitions, same layout).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            dir,
            (info as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
