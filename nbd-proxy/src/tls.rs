//! TLS for the migration link (NBD_OPT_STARTTLS), with rustls.
//!
//! A TLS session is bridged to a plain socketpair by [`spawn_pump`]: after STARTTLS, the rest of
//! the handshake and the whole transmission phase run unchanged on the plain end, on the server
//! and in `nbd-proxy connect`'s relay alike (a TLS session cannot be handed to the daemon as an
//! fd, but the plain end of the pair can).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::address::Stream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}: {detail}")]
    Load {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::Load {
        path: path.display().to_string(),
        what: "certificates",
        detail,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Load {
        path: path.display().to_string(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c).map_err(|e| TlsError::Load {
            path: ca.display().to_string(),
            what: "CA certificate",
            detail: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Server side: our certificate, and with `client_ca` every client must present a certificate
/// signed by it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(
        builder.with_single_cert(load_certs(cert)?, load_key(key)?)?,
    ))
}

/// Client side: trust `ca`; present `cert`/`key` if given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let cfg = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

pub fn server_session(cfg: &Arc<ServerConfig>) -> Result<rustls::Connection, TlsError> {
    Ok(ServerConnection::new(cfg.clone())?.into())
}

pub fn client_session(
    cfg: &Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<rustls::Connection, TlsError> {
    Ok(ClientConnection::new(cfg.clone(), name)?.into())
}

/// Bridges `tls` over the socket `wire` to a new plain socketpair, on a thread. Returns the
/// plain end to use instead of `wire`, and the thread (which ends when either side closes).
pub fn spawn_pump(
    tls: rustls::Connection,
    wire: Stream,
    label: String,
) -> io::Result<(Stream, std::thread::JoinHandle<()>)> {
    let (ours, theirs) = UnixStream::pair()?;
    let h = std::thread::Builder::new()
        .name("tls-pump".into())
        .spawn(move || {
            if let Err(e) = pump(tls, wire, ours) {
                log::warn!("{label}: TLS session ended: {e}");
            }
        })?;
    Ok((Stream::Unix(theirs), h))
}

/// Largest amount of decrypted data held for a slow plain side before we stop reading TLS.
const MAX_PENDING: usize = 4 << 20;

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

/// The pump loop: encrypted bytes on `wire`, plaintext on `plain`.
fn pump(tls: rustls::Connection, wire: Stream, plain: UnixStream) -> io::Result<()> {
    set_nonblocking(wire.as_raw_fd())?;
    set_nonblocking(plain.as_raw_fd())?;
    let mut p = Pump {
        tls,
        wire,
        plain,
        to_plain: Vec::new(),
        buf: vec![0u8; 64 << 10],
        wire_eof: false,
        plain_eof: false,
    };
    loop {
        p.write_out()?;
        if p.finished() {
            return Ok(());
        }
        let read_wire = !p.wire_eof && p.to_plain.len() < MAX_PENDING;
        let read_plain = !p.plain_eof && !p.tls.is_handshaking() && !p.tls.wants_write();
        let Some(fds) = p.poll(read_wire, read_plain)? else {
            continue;
        };
        let hup = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if read_wire && fds[0].revents & hup != 0 {
            p.read_wire()?;
        }
        if read_plain && fds[1].revents & hup != 0 {
            p.read_plain()?;
        }
    }
}

/// One TLS session bridged between the encrypted `wire` and the `plain` socketpair end.
struct Pump {
    tls: rustls::Connection,
    wire: Stream,
    plain: UnixStream,
    /// Decrypted bytes the plain side has not taken yet.
    to_plain: Vec<u8>,
    buf: Vec<u8>,
    wire_eof: bool,
    plain_eof: bool,
}

impl Pump {
    /// Writes what it can: encrypted bytes to the wire, plaintext to the plain side.
    fn write_out(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.wire) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        while !self.to_plain.is_empty() {
            match self.plain.write(&self.to_plain) {
                Ok(n) => {
                    self.to_plain.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Passes the wire's end on once the plain side has everything; true when the session is
    /// over (the plain side closed and all is sent, or both sides closed).
    fn finished(&mut self) -> bool {
        if self.wire_eof && self.to_plain.is_empty() {
            let _ = self.plain.shutdown(std::net::Shutdown::Write);
        }
        self.plain_eof && (self.wire_eof || !self.tls.wants_write())
    }

    /// Waits for either side; `None` when interrupted (poll again).
    fn poll(&self, read_wire: bool, read_plain: bool) -> io::Result<Option<[libc::pollfd; 2]>> {
        let events = |read: bool, write: bool| {
            (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
        };
        let mut fds = [
            libc::pollfd {
                fd: self.wire.as_raw_fd(),
                events: events(read_wire, self.tls.wants_write()),
                revents: 0,
            },
            libc::pollfd {
                fd: self.plain.as_raw_fd(),
                events: events(read_plain, !self.to_plain.is_empty()),
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if would_block(&e) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(fds))
    }

    /// Reads encrypted bytes and queues what they decrypt to for the plain side.
    fn read_wire(&mut self) -> io::Result<()> {
        match self.tls.read_tls(&mut self.wire) {
            Ok(0) => self.wire_eof = true,
            Ok(_) => {
                if let Err(e) = self.tls.process_new_packets() {
                    // Tell the peer why (the alert is queued by rustls), then give up.
                    let _ = self.tls.write_tls(&mut self.wire);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                loop {
                    match self.tls.reader().read(&mut self.buf) {
                        Ok(0) => {
                            self.wire_eof = true; // close_notify
                            break;
                        }
                        Ok(n) => self.to_plain.extend_from_slice(&self.buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Reads plaintext and hands it to TLS; the plain side's end becomes close_notify.
    fn read_plain(&mut self) -> io::Result<()> {
        match self.plain.read(&mut self.buf) {
            Ok(0) => {
                self.plain_eof = true;
                self.tls.send_close_notify();
            }
            Ok(n) => self.tls.writer().write_all(&self.buf[..n])?,
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
