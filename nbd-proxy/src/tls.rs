//! TLS for the migration link (NBD_OPT_STARTTLS), with rustls.
//!
//! After STARTTLS, rustls runs the TLS handshake and the rest of the option haggling on the
//! socket itself ([`Session`]). For the transmission phase the session then moves into the
//! kernel (kTLS, `ktls.rs`) where it can, and the socket is plain to its user again: the server
//! serves it as any connection, and `nbd-proxy connect` hands the socket itself to the daemon
//! and exits. Where it cannot (no kTLS in the kernel, `--tls-relay`), the session is bridged to
//! a plain socketpair by [`spawn_pump`], a thread per connection, and the plain end is what is
//! served or handed over.

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
    let mut cfg = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    // So the session's keys can move into the kernel after the handshake (kTLS).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Client side: trust `ca`; present `cert`/`key` if given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    // So the session's keys can move into the kernel after the handshake (kTLS).
    cfg.enable_secret_extraction = true;
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

/// A TLS session on a blocking socket, from the end of its handshake to the transmission
/// phase: reads and writes go through rustls, record by record.
pub struct Session {
    tls: rustls::Connection,
    wire: Stream,
    cut: RecordCut,
}

/// Where the socket's byte stream is in its TLS records, for [`RecordIo`].
#[derive(Default)]
struct RecordCut {
    header: [u8; 5],
    header_have: usize,
    body_left: usize,
}

impl RecordCut {
    /// Some of a record is read, not all of it.
    fn inside_a_record(&self) -> bool {
        self.header_have > 0 || self.body_left > 0
    }
}

/// The socket for rustls, read one TLS record at a time and never past the end of the record
/// it is in: what rustls has taken from the socket is then whole records, so when the session
/// moves into the kernel nothing of a following record is stranded in rustls' buffer (the
/// kernel reads it from the socket). Writes go straight through.
struct RecordIo<'a> {
    wire: &'a mut Stream,
    cut: &'a mut RecordCut,
}

impl Read for RecordIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let c = &mut *self.cut;
        if c.body_left == 0 {
            // In a record's 5-byte header: read only what is left of it.
            let want = (c.header.len() - c.header_have).min(buf.len());
            let n = self.wire.read(&mut buf[..want])?;
            c.header[c.header_have..c.header_have + n].copy_from_slice(&buf[..n]);
            c.header_have += n;
            if c.header_have == c.header.len() {
                c.header_have = 0;
                c.body_left = usize::from(u16::from_be_bytes([c.header[3], c.header[4]]));
            }
            return Ok(n);
        }
        let want = c.body_left.min(buf.len());
        let n = self.wire.read(&mut buf[..want])?;
        c.body_left -= n;
        Ok(n)
    }
}

impl Write for RecordIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wire.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.wire.flush()
    }
}

/// How the transmission phase's stream carries TLS.
pub enum Carrier {
    /// The kernel (kTLS): the stream is the TCP socket itself.
    Kernel,
    /// A pump thread between the session and the stream, a plain socketpair end; it ends when
    /// either side closes.
    Relay(std::thread::JoinHandle<()>),
}

impl Session {
    /// Runs the TLS handshake on `wire` to its end (the socket's read timeout applies).
    pub fn handshake(mut tls: rustls::Connection, mut wire: Stream) -> io::Result<Session> {
        let mut cut = RecordCut::default();
        while tls.is_handshaking() {
            tls.complete_io(&mut RecordIo {
                wire: &mut wire,
                cut: &mut cut,
            })?;
        }
        let mut s = Session { tls, wire, cut };
        s.send_records()?;
        Ok(s)
    }

    /// The stream for the transmission phase: the socket with the session moved into the
    /// kernel, unless `relay` or the kernel cannot ([`Session::kernel_refusal`]), in which case
    /// the session is pumped to a socketpair. Why it was relayed is logged under `label`.
    pub fn into_transmission(mut self, relay: bool, label: &str) -> io::Result<(Stream, Carrier)> {
        self.flush()?;
        let why_not = if relay {
            Some("--tls-relay".to_owned())
        } else {
            self.kernel_refusal()
        };
        if let Some(why) = why_not {
            log::info!("{label}: TLS relayed by a thread ({why})");
            let (plain, pump) = spawn_pump(self.tls, self.wire, label.to_owned())?;
            return Ok((plain, Carrier::Relay(pump)));
        }
        let fd = self.wire.as_raw_fd();
        let version = self.tls.protocol_version();
        let suite = self.tls.negotiated_cipher_suite();
        let secrets = self
            .tls
            .dangerous_extract_secrets()
            .map_err(|e| io::Error::other(format!("kernel TLS: extracting the keys: {e}")))?;
        let version = version.ok_or_else(|| io::Error::other("kernel TLS: no protocol version"))?;
        let (seq, keys) = &secrets.tx;
        crate::ktls::install(fd, crate::ktls::Direction::Send, version, *seq, keys)?;
        let (seq, keys) = &secrets.rx;
        crate::ktls::install(fd, crate::ktls::Direction::Receive, version, *seq, keys)?;
        log::info!(
            "{label}: TLS in the kernel ({version:?}, {:?})",
            suite.map(|s| s.suite())
        );
        Ok((self.wire, Carrier::Kernel))
    }

    /// Why the session cannot move into the kernel; None when it can, and then the socket has
    /// the "tls" upper-layer protocol already (the one step that fails where kTLS is missing).
    fn kernel_refusal(&mut self) -> Option<String> {
        let Stream::Tcp(_) = &self.wire else {
            return Some("not a TCP socket".to_owned());
        };
        let chacha = matches!(
            self.tls.negotiated_cipher_suite().map(|s| s.suite()),
            Some(
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            )
        );
        if self.tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2) && !chacha {
            // See ktls.rs: the kernel would reuse the handshake's last nonces.
            return Some(
                "TLS 1.2 with AES-GCM, which the kernel counts nonces for differently".into(),
            );
        }
        // Data rustls holds would be lost with its state: records are read whole (RecordIo)
        // and the peer waits for our first request now, so there should be none, but look.
        if self.cut.inside_a_record() {
            return Some("a TLS record is half read".to_owned());
        }
        match self.tls.process_new_packets() {
            Ok(io) if io.plaintext_bytes_to_read() == 0 => {}
            Ok(_) => return Some("data already read ahead".to_owned()),
            Err(e) => return Some(format!("TLS state: {e}")),
        }
        match crate::ktls::attach(self.wire.as_raw_fd()) {
            Ok(()) => None,
            Err(e) => Some(format!("the kernel has no TLS for this socket: {e}")),
        }
    }
}

impl Session {
    /// Sends every TLS record rustls has ready.
    fn send_records(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.wire)?;
        }
        Ok(())
    }
}

impl Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Ok(0) after close_notify; UnexpectedEof when the peer closed without one.
                other => return other,
            }
            let n = self.tls.read_tls(&mut RecordIo {
                wire: &mut self.wire,
                cut: &mut self.cut,
            })?;
            if let Err(e) = self.tls.process_new_packets() {
                let _ = self.send_records(); // the alert rustls queued says why
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            self.send_records()?;
            if n == 0 {
                return match self.tls.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                };
            }
        }
    }
}

impl Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        self.send_records()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tls.writer().flush()?;
        self.send_records()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_one_at_a_time_and_never_past_their_end() {
        let (mut peer, ours) = UnixStream::pair().expect("socketpair");
        // Two records back to back (type 23, version 3.3, length, body), then half a header.
        peer.write_all(b"\x17\x03\x03\x00\x03abc\x17\x03\x03\x00\x00\x17\x03")
            .expect("write");
        let mut wire = Stream::Unix(ours);
        let mut cut = RecordCut::default();
        let mut io = RecordIo {
            wire: &mut wire,
            cut: &mut cut,
        };
        let mut buf = [0u8; 64];
        let mut reads = Vec::new();
        for _ in 0..4 {
            let n = io.read(&mut buf).expect("read");
            reads.push(buf[..n].to_vec());
        }
        assert_eq!(
            reads,
            [
                b"\x17\x03\x03\x00\x03".to_vec(),
                b"abc".to_vec(),
                b"\x17\x03\x03\x00\x00".to_vec(), // an empty record ends at its header
                b"\x17\x03".to_vec(),
            ]
        );
        assert!(cut.inside_a_record(), "half a header is inside a record");
        drop(peer);
    }
}
