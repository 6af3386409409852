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

/// Runs the handshake. `Ok(None)`: the client aborted or went away cleanly.
pub(super) fn negotiate(
    server: &Arc<Server>,
    mut stream: Stream,
    id: u64,
) -> Result<Option<(Stream, Arc<Export>)>, HandshakeError> {
    stream.set_read_timeout(Some(server.config.handshake_timeout))?;
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
    let fixed = cflags & client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & client_flags::NO_ZEROES != 0;
    let tls_required = server.config.tls.is_some();
    let mut tls_active = false;

    for _ in 0..MAX_OPTIONS {
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
        let mut reply = |kind: u32, payload: &[u8]| -> io::Result<()> {
            let mut m = OptionReplyHeader {
                option: hdr.option,
                reply: kind,
                length: payload.len() as u32,
            }
            .encode()
            .to_vec();
            m.extend_from_slice(payload);
            stream.write_all(&m)
        };
        if tls_required && !tls_active {
            match hdr.option {
                opt::STARTTLS | opt::ABORT => {}
                // EXPORT_NAME cannot answer an error: the spec says hang up.
                opt::EXPORT_NAME => return Ok(None),
                _ => {
                    reply(
                        rep::ERR_TLS_REQD,
                        b"this server requires TLS (NBD_OPT_STARTTLS)",
                    )?;
                    continue;
                }
            }
        }
        match hdr.option {
            opt::EXPORT_NAME => {
                let name = decode_string(&data)?;
                let export = server
                    .lookup(&name)
                    .ok_or(HandshakeError::UnknownExport(name))?;
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&export.size.to_be_bytes());
                m.extend_from_slice(&export.tx_flags().to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&m)?;
                return Ok(Some((stream, export)));
            }
            _ if !fixed => {
                // Plain newstyle knows only EXPORT_NAME; anything else ends the session.
                return Ok(None);
            }
            opt::ABORT => {
                let _ = reply(rep::ACK, &[]);
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for name in server.export_names() {
                    let mut p = (name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    reply(rep::SERVER, &p)?;
                }
                reply(rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let req = match GoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(rep::ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                let Some(export) = server.lookup(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    reply(rep::ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let export_info = Info::Export {
                    size: export.size,
                    flags: export.tx_flags(),
                };
                reply(rep::INFO, &export_info.encode())?;
                if req.info.contains(&info::NAME) {
                    reply(rep::INFO, &Info::Name(export.name.clone()).encode())?;
                }
                let bs = BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: MAX_PAYLOAD,
                };
                reply(rep::INFO, &Info::BlockSize(bs).encode())?;
                reply(rep::ACK, &[])?;
                if hdr.option == opt::GO {
                    return Ok(Some((stream, export)));
                }
            }
            opt::STRUCTURED_REPLY => {
                reply(rep::ERR_UNSUP, b"simple replies only")?;
            }
            opt::STARTTLS => {
                let Some(cfg) = &server.config.tls else {
                    reply(rep::ERR_UNSUP, b"TLS is not configured on this server")?;
                    continue;
                };
                if tls_active || !data.is_empty() {
                    reply(
                        rep::ERR_INVALID,
                        b"TLS already started, or STARTTLS with data",
                    )?;
                    continue;
                }
                reply(rep::ACK, &[])?;
                let session = crate::tls::server_session(cfg).map_err(io::Error::other)?;
                let (plain, _pump) = crate::tls::spawn_pump(session, stream, format!("conn {id}"))?;
                plain.set_read_timeout(Some(server.config.handshake_timeout))?;
                stream = plain;
                tls_active = true;
                log::info!("conn {id}: TLS started");
            }
            other => {
                let msg = format!("option {other} is not supported");
                reply(rep::ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
    Err(HandshakeError::TooManyOptions(MAX_OPTIONS))
}
