//! The NBD client: the handshake ([`Negotiator`]) over any blocking `Read + Write` stream (TCP,
//! Unix, TLS), and a pipelined transmission-phase [`Connection`].
//!
//! The handshake is blocking on purpose: it runs once per connection, before the socket is
//! handed to whatever drives the transmission phase: a thread here ([`Connection`], matching
//! replies with [`Inflight`]); in the daemon, its queues' rings (`ublk-mirror/src/mirror/
//! ring_conn.rs`), which use the codec in [`crate::proto`] but keep their own table of requests
//! in flight, because each entry there also holds the waiting task's waker and whether the
//! kernel still reads the request's buffer (a send not yet reaped), which `Inflight` has no
//! place for.

use std::io::{self, Read, Write};

pub use crate::inflight::Inflight;
use crate::inflight::{InflightError, Refused};
use crate::proto::{self, *};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("NBD protocol violation by the server: {0}")]
    Proto(#[from] ProtoError),
    #[error("the server uses the oldstyle handshake, which has no options (list, info, starttls)")]
    Oldstyle,
    #[error("the server has no export named {name:?}{}", fmt_msg(.message))]
    NoSuchExport { name: String, message: String },
    #[error("the server requires TLS{}", fmt_msg(.message))]
    TlsRequired { message: String },
    #[error("the server refused option {option} with reply {reply:#x}{}", fmt_msg(.message))]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("the server accepted GO for {0:?} without sending NBD_INFO_EXPORT")]
    NoExportInfo(String),
    #[error("request refused before sending: {0}")]
    BadRequest(&'static str),
    #[error("too many requests in flight ({0})")]
    TooManyInFlight(usize),
}

impl From<InflightError> for ClientError {
    fn from(e: InflightError) -> ClientError {
        match e {
            InflightError::Full(limit) => ClientError::TooManyInFlight(limit),
            InflightError::DuplicateCookie(c) => ProtoError::DuplicateCookie(c).into(),
        }
    }
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`proto::tx_flags`).
    pub flags: u16,
    pub block_size: BlockSize,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(tx_flags::READ_ONLY)
    }

    /// Why the export cannot take `command` with these command flags (by its transmission
    /// flags alone; lengths and offsets are checked elsewhere), or `None` if it can. One list
    /// for the client's per-request check and the daemon's check before it mirrors.
    pub fn refusal(&self, command: Command, flags: u16) -> Option<&'static str> {
        let lacks = |flag: u16| !self.has(flag);
        let why = match command {
            Command::Flush if lacks(tx_flags::SEND_FLUSH) => "the export does not take FLUSH",
            Command::Trim if lacks(tx_flags::SEND_TRIM) => "the export does not take TRIM",
            Command::WriteZeroes if lacks(tx_flags::SEND_WRITE_ZEROES) => {
                "the export does not take WRITE_ZEROES"
            }
            Command::Write | Command::Trim | Command::WriteZeroes if self.read_only() => {
                "the export is read-only"
            }
            _ if flags & cmd_flags::FUA != 0 && lacks(tx_flags::SEND_FUA) => {
                "the export does not take FUA"
            }
            _ if flags & cmd_flags::FAST_ZERO != 0 && lacks(tx_flags::SEND_FAST_ZERO) => {
                "the export does not take FAST_ZERO"
            }
            _ => return None,
        };
        Some(why)
    }
}

/// The oldstyle greeting's second magic ("cliserv magic").
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Handshake flags both sides agreed on; they survive STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgreedFlags {
    pub fixed: bool,
    pub no_zeroes: bool,
}

/// The client side of the handshake. Created by reading the server's greeting.
pub struct Negotiator<S> {
    stream: S,
    fixed: bool,
    no_zeroes: bool,
    /// An oldstyle server (tapdisk's `nbdserver<pid>.<minor>`, `nbdkit -o`) sends its one
    /// export in the greeting and goes straight to transmission: no options.
    oldstyle: Option<Export>,
}

impl<S: Read + Write> Negotiator<S> {
    /// Reads the greeting and sends our client flags.
    pub fn start(mut stream: S) -> Result<Negotiator<S>, ClientError> {
        let mut b = [0u8; 18];
        stream.read_exact(&mut b[..16])?;
        let magic = u64::from_be_bytes(b[0..8].try_into().map_err(|_| malformed("greeting"))?);
        let second = u64::from_be_bytes(b[8..16].try_into().map_err(|_| malformed("greeting"))?);
        if magic != NBDMAGIC {
            return Err(ProtoError::BadMagic {
                what: "greeting",
                expected: NBDMAGIC,
                found: magic,
            }
            .into());
        }
        if second == OLDSTYLE_MAGIC {
            return Self::oldstyle(stream);
        }
        if second != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "greeting",
                expected: IHAVEOPT,
                found: second,
            }
            .into());
        }
        stream.read_exact(&mut b[16..18])?;
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        let fixed = hflags & handshake_flags::FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
        let mut cflags = 0;
        if fixed {
            cflags |= client_flags::FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= client_flags::NO_ZEROES;
        }
        stream.write_all(&cflags.to_be_bytes())?;
        Ok(Negotiator {
            stream,
            fixed,
            no_zeroes,
            oldstyle: None,
        })
    }

    /// The rest of an oldstyle greeting: size (u64), flags (u32, the transmission flags in
    /// the low 16 bits), 124 zero bytes. Flags may be 0, as tapdisk's are (not even
    /// HAS_FLAGS): nothing optional is offered. There is no block-size information, so
    /// `BlockSize::DEFAULT` applies (min 512, preferred 4 KiB, max `MAX_PAYLOAD`).
    fn oldstyle(mut stream: S) -> Result<Negotiator<S>, ClientError> {
        let mut b = [0u8; 8 + 4 + 124];
        stream.read_exact(&mut b)?;
        let size = u64::from_be_bytes(b[0..8].try_into().map_err(|_| malformed("greeting"))?);
        let flags = u32::from_be_bytes(b[8..12].try_into().map_err(|_| malformed("greeting"))?);
        let flags = u16::try_from(flags).map_err(|_| malformed("oldstyle flags above 16 bits"))?;
        let export = Export {
            name: String::new(),
            size,
            flags,
            block_size: BlockSize::DEFAULT,
        };
        Ok(Negotiator {
            stream,
            fixed: false,
            no_zeroes: false,
            oldstyle: Some(export),
        })
    }

    /// Whether the server spoke the oldstyle handshake (its one export is what `go` returns,
    /// whatever name is asked for).
    pub fn is_oldstyle(&self) -> bool {
        self.oldstyle.is_some()
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| ClientError::BadRequest("option"))?;
        let mut msg = OptionHeader {
            option,
            length: len,
        }
        .encode()
        .to_vec();
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// Reads one option reply for `option`; its data is bounded by `MAX_OPTION_LEN`.
    fn read_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut h = [0u8; OptionReplyHeader::LEN];
        self.stream.read_exact(&mut h)?;
        let hdr = OptionReplyHeader::decode(&h)?;
        if hdr.option != option {
            return Err(malformed("option reply for another option"));
        }
        let mut data = vec![0u8; hdr.length as usize];
        self.stream.read_exact(&mut data)?;
        Ok((hdr.reply, data))
    }

    fn refusal(option: u32, reply: u32, data: &[u8], name: &str) -> ClientError {
        let message = String::from_utf8_lossy(data).into_owned();
        match reply {
            rep::ERR_UNKNOWN => ClientError::NoSuchExport {
                name: name.to_owned(),
                message,
            },
            rep::ERR_TLS_REQD => ClientError::TlsRequired { message },
            _ => ClientError::Refused {
                option,
                reply,
                message,
            },
        }
    }

    /// NBD_OPT_LIST: the names of the server's exports.
    pub fn list(&mut self) -> Result<Vec<String>, ClientError> {
        self.require_fixed()?;
        self.send_option(opt::LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let (reply, data) = self.read_reply(opt::LIST)?;
            match reply {
                rep::ACK => return Ok(names),
                rep::SERVER => {
                    if data.len() < 4 {
                        return Err(malformed("NBD_REP_SERVER"));
                    }
                    let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                    if n > data.len() - 4 {
                        return Err(malformed("NBD_REP_SERVER name length"));
                    }
                    names.push(decode_string(&data[4..4 + n])?);
                    if names.len() > 65536 {
                        return Err(malformed("endless export list"));
                    }
                }
                r if rep::is_error(r) => return Err(Self::refusal(opt::LIST, r, &data, "")),
                _ => return Err(malformed("reply type to NBD_OPT_LIST")),
            }
        }
    }

    /// NBD_OPT_INFO: describe `name` without entering transmission.
    pub fn info(&mut self, name: &str) -> Result<Export, ClientError> {
        self.require_fixed()?;
        self.info_or_go(opt::INFO, name)?
            .ok_or_else(|| Self::refusal(opt::INFO, rep::ERR_UNSUP, b"", name))
    }

    /// Ends the handshake on `name`: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME where the server lacks
    /// GO. Returns the stream, now in the transmission phase, and the export.
    /// An oldstyle server's one export is returned whatever `name` is.
    pub fn go(mut self, name: &str) -> Result<(S, Export), ClientError> {
        if let Some(export) = self.oldstyle.take() {
            return Ok((self.stream, export));
        }
        if self.fixed {
            if let Some(export) = self.info_or_go(opt::GO, name)? {
                return Ok((self.stream, export));
            }
        }
        self.export_name(name)
    }

    /// NBD_OPT_STARTTLS. On success the caller wraps the returned stream in TLS and continues
    /// with [`Negotiator::with_flags`] on the TLS stream, passing the returned flags.
    pub fn starttls(mut self) -> Result<(S, AgreedFlags), ClientError> {
        self.require_fixed()?;
        self.send_option(opt::STARTTLS, &[])?;
        let (reply, data) = self.read_reply(opt::STARTTLS)?;
        if reply != rep::ACK {
            return Err(Self::refusal(opt::STARTTLS, reply, &data, ""));
        }
        let flags = AgreedFlags {
            fixed: self.fixed,
            no_zeroes: self.no_zeroes,
        };
        Ok((self.stream, flags))
    }

    /// A negotiator on `stream` (the TLS stream after STARTTLS) with the flags agreed before.
    pub fn with_flags(stream: S, flags: AgreedFlags) -> Negotiator<S> {
        Negotiator {
            stream,
            fixed: flags.fixed,
            no_zeroes: flags.no_zeroes,
            oldstyle: None,
        }
    }

    /// NBD_OPT_ABORT: end the session politely.
    pub fn abort(mut self) -> Result<(), ClientError> {
        if self.fixed {
            self.send_option(opt::ABORT, &[])?;
            // The server should ACK; some close at once. Either is fine.
            let _ = self.read_reply(opt::ABORT);
        }
        Ok(())
    }

    fn require_fixed(&self) -> Result<(), ClientError> {
        if self.oldstyle.is_some() {
            return Err(ClientError::Oldstyle);
        }
        if self.fixed {
            Ok(())
        } else {
            Err(ProtoError::NotFixedNewstyle.into())
        }
    }

    /// `Ok(None)`: the server does not know the option (fall back to EXPORT_NAME).
    fn info_or_go(&mut self, option: u32, name: &str) -> Result<Option<Export>, ClientError> {
        let req = GoRequest {
            name: name.to_owned(),
            info: vec![proto::info::BLOCK_SIZE],
        };
        self.send_option(option, &req.encode())?;
        let mut size_flags = None;
        let mut block_size = BlockSize::DEFAULT;
        loop {
            let (reply, data) = self.read_reply(option)?;
            match reply {
                rep::INFO => match Info::decode(&data)? {
                    Info::Export { size, flags } => size_flags = Some((size, flags)),
                    Info::BlockSize(bs) => block_size = bs,
                    Info::Name(_) | Info::Description(_) | Info::Unknown(_) => {}
                },
                rep::ACK => {
                    let (size, flags) =
                        size_flags.ok_or_else(|| ClientError::NoExportInfo(name.to_owned()))?;
                    return Ok(Some(Export {
                        name: name.to_owned(),
                        size,
                        flags,
                        block_size,
                    }));
                }
                rep::ERR_UNSUP => return Ok(None),
                r if rep::is_error(r) => return Err(Self::refusal(option, r, &data, name)),
                _ => return Err(malformed("reply type to NBD_OPT_GO")),
            }
        }
    }

    fn export_name(mut self, name: &str) -> Result<(S, Export), ClientError> {
        self.send_option(opt::EXPORT_NAME, name.as_bytes())?;
        let mut b = [0u8; 10 + 124];
        let n = if self.no_zeroes { 10 } else { 134 };
        self.stream.read_exact(&mut b[..n]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                // The only way EXPORT_NAME can say "no such export" is to hang up.
                ClientError::NoSuchExport {
                    name: name.to_owned(),
                    message: "the server closed the connection on NBD_OPT_EXPORT_NAME".into(),
                }
            } else {
                e.into()
            }
        })?;
        let size = u64::from_be_bytes(b[0..8].try_into().map_err(|_| malformed("export"))?);
        let flags = u16::from_be_bytes([b[8], b[9]]);
        Ok((
            self.stream,
            Export {
                name: name.to_owned(),
                size,
                flags,
                block_size: BlockSize::DEFAULT,
            },
        ))
    }
}

fn malformed(what: &'static str) -> ClientError {
    ProtoError::Malformed(what).into()
}

/// A completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub cookie: u64,
    /// Ok(data) (empty unless READ), or the NBD error the server replied with.
    pub result: Result<Vec<u8>, u32>,
}

/// A blocking, pipelined transmission-phase connection: send many requests, then collect their
/// replies in whatever order the server sends them.
pub struct Connection<S> {
    stream: S,
    export: Export,
    inflight: Inflight,
    next_cookie: u64,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S, export: Export) -> Connection<S> {
        Connection {
            stream,
            export,
            inflight: Inflight::new(4096),
            next_cookie: 1,
        }
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Sends one request; `data` is the WRITE payload. Requests the export cannot take are
    /// refused here, before anything is sent.
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: Option<&[u8]>,
    ) -> Result<u64, ClientError> {
        let e = &self.export;
        if let Some(why) = e.refusal(command, flags) {
            return Err(ClientError::BadRequest(why));
        }
        if command == Command::Write && data.map(<[u8]>::len) != Some(length as usize) {
            return Err(ClientError::BadRequest(
                "WRITE data does not match its length",
            ));
        }
        let max = e.block_size.maximum.min(MAX_PAYLOAD);
        if matches!(command, Command::Read | Command::Write) && length > max {
            return Err(ClientError::BadRequest(
                "request larger than the export allows",
            ));
        }
        if command != Command::Flush
            && command != Command::Disc
            && offset
                .checked_add(length.into())
                .is_none_or(|end| end > e.size)
        {
            return Err(ClientError::BadRequest(
                "request beyond the end of the export",
            ));
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let read_len = if command == Command::Read { length } else { 0 };
        if command != Command::Disc {
            self.inflight
                .insert(cookie, read_len, ())
                .map_err(|r: Refused<()>| ClientError::from(r.error))?;
        }
        let hdr = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&hdr.encode())?;
        if let Some(d) = data {
            self.stream.write_all(d)?;
        }
        Ok(cookie)
    }

    /// Waits for the next reply, whichever request it answers.
    pub fn recv(&mut self) -> Result<Completion, ClientError> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut h)?;
        let reply = SimpleReply::decode(&h)?;
        let data_len = self.inflight.complete(&reply)?.data_len;
        let mut data = vec![0u8; data_len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(Completion {
            cookie: reply.cookie,
            result: if reply.error == 0 {
                Ok(data)
            } else {
                Err(reply.error)
            },
        })
    }

    /// Sends one request and waits for its reply (no other request may be in flight).
    pub fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: Option<&[u8]>,
    ) -> Result<Result<Vec<u8>, u32>, ClientError> {
        if !self.inflight.is_empty() {
            return Err(ClientError::BadRequest("call() with requests in flight"));
        }
        let cookie = self.send(command, flags, offset, length, data)?;
        let c = self.recv()?;
        debug_assert_eq!(c.cookie, cookie);
        Ok(c.result)
    }

    /// NBD_CMD_DISC: asks the server to close after the requests in flight.
    pub fn disconnect(mut self) -> Result<S, ClientError> {
        self.send(Command::Disc, 0, 0, 0, None)?;
        self.stream.flush()?;
        Ok(self.stream)
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Replays a server's bytes; records what the client sends.
    struct Script {
        input: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// tapdisk's oldstyle greeting: flags 0, not even HAS_FLAGS. The client sends nothing
    /// during the handshake, and options are refused without touching the stream.
    #[test]
    fn an_oldstyle_greeting_with_flags_zero_is_one_export_offering_nothing() {
        let mut server = NBDMAGIC.to_be_bytes().to_vec();
        server.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        server.extend_from_slice(&(64u64 << 20).to_be_bytes());
        server.extend_from_slice(&0u32.to_be_bytes());
        server.extend_from_slice(&[0u8; 124]);
        let script = Script {
            input: Cursor::new(server),
            sent: Vec::new(),
        };
        let mut n = Negotiator::start(script).expect("oldstyle greeting");
        assert!(n.is_oldstyle());
        assert!(matches!(n.list(), Err(ClientError::Oldstyle)));
        assert!(matches!(n.info("disk"), Err(ClientError::Oldstyle)));
        let (s, e) = n.go("whatever").expect("oldstyle export");
        assert_eq!((e.size, e.flags), (64 << 20, 0));
        assert_eq!(e.block_size, BlockSize::DEFAULT);
        assert!(s.sent.is_empty(), "the client sent {:?}", s.sent);
        for (command, flags) in [
            (Command::Flush, 0),
            (Command::Trim, 0),
            (Command::WriteZeroes, 0),
            (Command::Write, cmd_flags::FUA),
        ] {
            assert!(
                e.refusal(command, flags).is_some(),
                "{command:?} {flags:#x}"
            );
        }
        assert_eq!(e.refusal(Command::Write, 0), None);
        assert_eq!(e.refusal(Command::Read, 0), None);
    }

    #[test]
    fn go_falls_back_to_export_name_when_the_server_lacks_it() {
        let mut server = NBDMAGIC.to_be_bytes().to_vec();
        server.extend_from_slice(&IHAVEOPT.to_be_bytes());
        server.extend_from_slice(&handshake_flags::FIXED_NEWSTYLE.to_be_bytes());
        // GO -> NBD_REP_ERR_UNSUP
        let unsup = OptionReplyHeader {
            option: opt::GO,
            reply: rep::ERR_UNSUP,
            length: 0,
        };
        server.extend_from_slice(&unsup.encode());
        // EXPORT_NAME -> size, flags, 124 zeroes (NO_ZEROES was not offered)
        server.extend_from_slice(&(1u64 << 30).to_be_bytes());
        server.extend_from_slice(&(tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH).to_be_bytes());
        server.extend_from_slice(&[0u8; 124]);
        let script = Script {
            input: Cursor::new(server),
            sent: Vec::new(),
        };
        let (s, e) = Negotiator::start(script)
            .expect("greeting")
            .go("disk")
            .expect("fallback");
        assert_eq!(e.size, 1 << 30);
        assert!(e.has(tx_flags::SEND_FLUSH));
        assert_eq!(e.block_size, BlockSize::DEFAULT);
        // Client flags, then GO, then EXPORT_NAME "disk".
        let sent = s.sent;
        assert_eq!(&sent[0..4], &client_flags::FIXED_NEWSTYLE.to_be_bytes());
        let go = OptionHeader::decode(&sent[4..20]).expect("GO header");
        assert_eq!(go.option, opt::GO);
        let at = 20 + go.length as usize;
        let en = OptionHeader::decode(&sent[at..at + 16]).expect("EXPORT_NAME header");
        assert_eq!(
            (en.option, &sent[at + 16..]),
            (opt::EXPORT_NAME, &b"disk"[..])
        );
    }
}
