//! The server side of fixed-newstyle option haggling.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::{Export, Server};
use crate::address::Stream;
use crate::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("client sent unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("client sent more than {0} options")]
    TooManyOptions(usize),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

/// Most options a client may send before choosing an export.
const MAX_OPTIONS: usize = 256;

/// What one option leads to.
enum Step {
    /// Wait for the next option.
    Next,
    /// End the session (the client aborted, or must be hung up on).
    Close,
    /// Transmission on this export.
    Export(Arc<Export>),
    /// STARTTLS was acknowledged: switch the stream to TLS, then wait for the next option.
    StartTls,
}

/// The handshake's stream: plain, or after STARTTLS a TLS session run by rustls.
enum Wire {
    Plain(Stream),
    Tls(Box<crate::tls::Session>),
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.flush(),
            Wire::Tls(s) => s.flush(),
        }
    }
}

/// Runs the handshake. `Ok(None)`: the client aborted or went away cleanly. With TLS, the
/// stream returned is the socket with the session in the kernel, or a relay's plain end.
pub(super) fn negotiate(
    server: &Arc<Server>,
    stream: Stream,
    id: u64,
) -> Result<Option<(Stream, Arc<Export>)>, HandshakeError> {
    stream.set_read_timeout(Some(server.config.handshake_timeout))?;
    let mut stream = Wire::Plain(stream);
    let cflags = greet(&mut stream)?;
    let mut session = Session {
        server,
        id,
        fixed: cflags & client_flags::FIXED_NEWSTYLE != 0,
        no_zeroes: cflags & client_flags::NO_ZEROES != 0,
        tls_active: false,
    };
    for _ in 0..MAX_OPTIONS {
        let Some((hdr, data)) = read_option(&mut stream, id)? else {
            return Ok(None);
        };
        match session.option(&mut stream, &hdr, &data)? {
            Step::Next => {}
            Step::Close => return Ok(None),
            Step::Export(export) => {
                let stream = match stream {
                    Wire::Plain(s) => s,
                    Wire::Tls(tls) => {
                        let relay = server.config.tls_relay;
                        // A relay's thread ends with the connection: not joined.
                        tls.into_transmission(relay, &format!("conn {id}"))?.0
                    }
                };
                return Ok(Some((stream, export)));
            }
            Step::StartTls => stream = session.start_tls(stream)?,
        }
    }
    Err(HandshakeError::TooManyOptions(MAX_OPTIONS))
}

/// Sends the fixed-newstyle greeting and reads the client's flags.
fn greet(stream: &mut Wire) -> Result<u32, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    stream.write_all(&greeting)?;
    let mut cf = [0u8; 4];
    stream.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(cflags));
    }
    Ok(cflags)
}

/// The next option and its data; `None` if the client went away before sending one.
fn read_option(
    stream: &mut Wire,
    id: u64,
) -> Result<Option<(OptionHeader, Vec<u8>)>, HandshakeError> {
    let mut h = [0u8; OptionHeader::LEN];
    match stream.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let hdr = OptionHeader::decode(&h)?;
    let mut data = vec![0u8; hdr.length as usize];
    stream.read_exact(&mut data)?;
    log::debug!("conn {id}: option {} ({} bytes)", hdr.option, data.len());
    Ok(Some((hdr, data)))
}

/// One option reply (header and payload in one write).
fn reply(stream: &mut Wire, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let mut m = OptionReplyHeader {
        option,
        reply: kind,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    m.extend_from_slice(payload);
    stream.write_all(&m)
}

/// What the haggling knows between options.
struct Session<'a> {
    server: &'a Arc<Server>,
    id: u64,
    /// The client speaks fixed newstyle (otherwise only EXPORT_NAME).
    fixed: bool,
    no_zeroes: bool,
    tls_active: bool,
}

impl Session<'_> {
    /// Answers one option: the TLS gate first, then one handler per option.
    fn option(
        &mut self,
        stream: &mut Wire,
        hdr: &OptionHeader,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        let tls_pending = self.server.config.tls.is_some() && !self.tls_active;
        if tls_pending && !matches!(hdr.option, opt::STARTTLS | opt::ABORT) {
            // EXPORT_NAME cannot answer an error: the spec says hang up.
            if hdr.option == opt::EXPORT_NAME {
                return Ok(Step::Close);
            }
            let msg = b"this server requires TLS (NBD_OPT_STARTTLS)";
            reply(stream, hdr.option, rep::ERR_TLS_REQD, msg)?;
            return Ok(Step::Next);
        }
        match hdr.option {
            opt::EXPORT_NAME => self.export_name(stream, data),
            // Plain newstyle knows only EXPORT_NAME; anything else ends the session.
            _ if !self.fixed => Ok(Step::Close),
            opt::ABORT => {
                let _ = reply(stream, opt::ABORT, rep::ACK, &[]);
                Ok(Step::Close)
            }
            opt::LIST => self.list(stream, data),
            opt::INFO | opt::GO => self.info_or_go(stream, hdr.option, data),
            opt::STRUCTURED_REPLY => {
                let msg = b"simple replies only";
                reply(stream, opt::STRUCTURED_REPLY, rep::ERR_UNSUP, msg)?;
                Ok(Step::Next)
            }
            opt::STARTTLS => self.starttls(stream, data),
            other => {
                let msg = format!("option {other} is not supported");
                reply(stream, other, rep::ERR_UNSUP, msg.as_bytes())?;
                Ok(Step::Next)
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME: the export's size and flags, then transmission; an unknown name
    /// cannot be answered, so it ends the session with an error.
    fn export_name(&self, stream: &mut Wire, data: &[u8]) -> Result<Step, HandshakeError> {
        let name = decode_string(data)?;
        let export = self
            .server
            .lookup(&name)
            .ok_or(HandshakeError::UnknownExport(name))?;
        let mut m = Vec::with_capacity(134);
        m.extend_from_slice(&export.size.to_be_bytes());
        m.extend_from_slice(&export.tx_flags().to_be_bytes());
        if !self.no_zeroes {
            m.extend_from_slice(&[0u8; 124]);
        }
        stream.write_all(&m)?;
        Ok(Step::Export(export))
    }

    /// NBD_OPT_LIST: one SERVER reply per export, then ACK.
    fn list(&self, stream: &mut Wire, data: &[u8]) -> Result<Step, HandshakeError> {
        if !data.is_empty() {
            reply(
                stream,
                opt::LIST,
                rep::ERR_INVALID,
                b"NBD_OPT_LIST takes no data",
            )?;
            return Ok(Step::Next);
        }
        for name in self.server.export_names() {
            let mut p = (name.len() as u32).to_be_bytes().to_vec();
            p.extend_from_slice(name.as_bytes());
            reply(stream, opt::LIST, rep::SERVER, &p)?;
        }
        reply(stream, opt::LIST, rep::ACK, &[])?;
        Ok(Step::Next)
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: the export's INFO replies and ACK; GO then transmits.
    fn info_or_go(
        &self,
        stream: &mut Wire,
        option: u32,
        data: &[u8],
    ) -> Result<Step, HandshakeError> {
        let req = match GoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                reply(stream, option, rep::ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(Step::Next);
            }
        };
        let Some(export) = self.server.lookup(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            reply(stream, option, rep::ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(Step::Next);
        };
        let export_info = Info::Export {
            size: export.size,
            flags: export.tx_flags(),
        };
        reply(stream, option, rep::INFO, &export_info.encode())?;
        if req.info.contains(&info::NAME) {
            let name = Info::Name(export.name.clone());
            reply(stream, option, rep::INFO, &name.encode())?;
        }
        let bs = BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        };
        reply(stream, option, rep::INFO, &Info::BlockSize(bs).encode())?;
        reply(stream, option, rep::ACK, &[])?;
        Ok(if option == opt::GO {
            Step::Export(export)
        } else {
            Step::Next
        })
    }

    /// NBD_OPT_STARTTLS: refused without a TLS configuration, once TLS runs, or with data;
    /// otherwise acknowledged, and the caller switches the stream ([`Session::start_tls`]).
    fn starttls(&self, stream: &mut Wire, data: &[u8]) -> Result<Step, HandshakeError> {
        if self.server.config.tls.is_none() {
            let msg = b"TLS is not configured on this server";
            reply(stream, opt::STARTTLS, rep::ERR_UNSUP, msg)?;
            return Ok(Step::Next);
        }
        if self.tls_active || !data.is_empty() {
            let msg = b"TLS already started, or STARTTLS with data";
            reply(stream, opt::STARTTLS, rep::ERR_INVALID, msg)?;
            return Ok(Step::Next);
        }
        reply(stream, opt::STARTTLS, rep::ACK, &[])?;
        Ok(Step::StartTls)
    }

    /// Runs the TLS handshake over `stream` (acknowledged STARTTLS); the rest of the haggling
    /// goes through the session.
    fn start_tls(&mut self, stream: Wire) -> Result<Wire, HandshakeError> {
        let id = self.id;
        let cfg =
            self.server.config.tls.as_ref().ok_or_else(|| {
                io::Error::other("STARTTLS acknowledged without a TLS configuration")
            })?;
        let Wire::Plain(plain) = stream else {
            return Err(io::Error::other("STARTTLS inside TLS").into());
        };
        let session = crate::tls::server_session(cfg).map_err(io::Error::other)?;
        let session = crate::tls::Session::handshake(session, plain)?;
        self.tls_active = true;
        log::info!("conn {id}: TLS started");
        Ok(Wire::Tls(Box::new(session)))
    }
}
