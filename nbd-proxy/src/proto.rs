//! NBD wire format (NetworkBlockDevice `doc/proto.md`), without I/O.
//!
//! Everything here encodes into or decodes from byte slices, so the same code serves a blocking
//! socket, a TLS stream, or the daemon's io_uring. Every decoder validates every field and
//! returns a typed error; none allocates more than a caller-given bound.

/// "NBDMAGIC", the first 8 bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": follows NBDMAGIC (newstyle) and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Largest payload of one request this implementation sends or accepts (the spec's advice).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake (names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest string (export name, error message) accepted.
pub const MAX_STRING: usize = 4096;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Handshake flags (server -> client).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client -> server).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags, sent with the export's size.
pub mod tx_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags, in a request header.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types. Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub fn is_error(t: u32) -> bool {
        t & (1 << 31) != 0
    }
}

/// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Error values in replies.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command number this implementation does not know.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

/// Why bytes from a peer could not be accepted. Every parser failure is one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad magic {found:#x} (expected {expected:#x}) in {what}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("reply for cookie {0:#x}, which has no request in flight")]
    UnknownCookie(u64),
    #[error("cookie {0:#x} is already in flight")]
    DuplicateCookie(u64),
    #[error("structured reply received but structured replies were not negotiated")]
    UnexpectedStructuredReply,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        Err(ProtoError::Truncated {
            what,
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes the 28-byte header. Semantic checks (range, flags the export allows) are the
    /// server's: see [`RequestHeader::check`].
    pub fn decode(b: &[u8]) -> Result<RequestHeader, ProtoError> {
        need("request header", b, REQUEST_HEADER_LEN)?;
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        Ok(RequestHeader {
            flags: be_u16(b, 4),
            command: Command::from_wire(be_u16(b, 6)),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    /// Bytes of payload that follow this header on the wire (WRITE data).
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Whether the stream can be kept in sync after this header: a WRITE whose payload is
    /// larger than we accept cannot be skipped safely, so the connection must end.
    pub fn check_framing(&self) -> Result<(), ProtoError> {
        if self.payload_len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLong {
                what: "write payload",
                len: self.length.into(),
                max: MAX_PAYLOAD.into(),
            });
        }
        Ok(())
    }

    /// Checks a request against an export of `size` bytes with transmission flags `tx`;
    /// returns the NBD error to reply with. The request is well framed already.
    pub fn check(&self, size: u64, tx: u16) -> Result<(), u32> {
        use cmd_flags::*;
        let known = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
        if self.flags & !known != 0 {
            return Err(errno::EINVAL);
        }
        let in_range = || {
            self.offset
                .checked_add(u64::from(self.length))
                .is_some_and(|end| end <= size)
        };
        let writable = tx & tx_flags::READ_ONLY == 0;
        let allowed = |flag: u16, tx_flag: u16| self.flags & flag == 0 || tx & tx_flag != 0;
        if !allowed(FUA, tx_flags::SEND_FUA) || !allowed(DF, tx_flags::SEND_DF) {
            return Err(errno::EINVAL);
        }
        match self.command {
            Command::Read | Command::Cache => {
                if self.length > MAX_PAYLOAD {
                    return Err(errno::EOVERFLOW);
                }
                if in_range() {
                    Ok(())
                } else {
                    Err(errno::EINVAL)
                }
            }
            Command::Write | Command::Trim | Command::WriteZeroes => {
                if !in_range() {
                    return Err(errno::EINVAL);
                }
                if !writable {
                    return Err(errno::EPERM);
                }
                match self.command {
                    Command::Trim if tx & tx_flags::SEND_TRIM == 0 => Err(errno::EINVAL),
                    Command::WriteZeroes if tx & tx_flags::SEND_WRITE_ZEROES == 0 => {
                        Err(errno::EINVAL)
                    }
                    Command::WriteZeroes
                        if self.flags & FAST_ZERO != 0 && tx & tx_flags::SEND_FAST_ZERO == 0 =>
                    {
                        Err(errno::EINVAL)
                    }
                    _ => Ok(()),
                }
            }
            Command::Flush => {
                if tx & tx_flags::SEND_FLUSH == 0 {
                    Err(errno::EINVAL)
                } else {
                    Ok(())
                }
            }
            Command::Disc => Ok(()),
            Command::BlockStatus | Command::Unknown(_) => Err(errno::EINVAL),
        }
    }
}

/// A simple reply header (the data of a successful READ follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SimpleReply, ProtoError> {
        need("simple reply", b, SIMPLE_REPLY_LEN)?;
        match be_u32(b, 0) {
            SIMPLE_REPLY_MAGIC => Ok(SimpleReply {
                error: be_u32(b, 4),
                cookie: be_u64(b, 8),
            }),
            STRUCTURED_REPLY_MAGIC => Err(ProtoError::UnexpectedStructuredReply),
            other => Err(ProtoError::BadMagic {
                what: "reply",
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: other.into(),
            }),
        }
    }
}

/// The header of a client option (the option's data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<OptionHeader, ProtoError> {
        need("option header", b, Self::LEN)?;
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let length = be_u32(b, 12);
        if length > MAX_OPTION_LEN {
            return Err(ProtoError::TooLong {
                what: "option",
                len: length.into(),
                max: MAX_OPTION_LEN.into(),
            });
        }
        Ok(OptionHeader {
            option: be_u32(b, 8),
            length,
        })
    }
}

/// The header of a server's option reply (the reply's data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
        need("option reply header", b, Self::LEN)?;
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        let length = be_u32(b, 16);
        if length > MAX_OPTION_LEN {
            return Err(ProtoError::TooLong {
                what: "option reply",
                len: length.into(),
                max: MAX_OPTION_LEN.into(),
            });
        }
        Ok(OptionReplyHeader {
            option: be_u32(b, 8),
            reply: be_u32(b, 12),
            length,
        })
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO: an export name and the info types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub info: Vec<u16>,
}

impl GoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.info.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.info.len() as u16).to_be_bytes());
        for i in &self.info {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<GoRequest, ProtoError> {
        need("GO request", b, 6)?;
        let name_len = be_u32(b, 0) as usize;
        if name_len > MAX_STRING || name_len > b.len() - 6 {
            return Err(ProtoError::Malformed("GO request name length"));
        }
        let name = decode_string(&b[4..4 + name_len])?;
        let rest = &b[4 + name_len..];
        let n = usize::from(be_u16(rest, 0));
        if rest.len() != 2 + 2 * n {
            return Err(ProtoError::Malformed("GO request info list"));
        }
        let info = (0..n).map(|i| be_u16(rest, 2 + 2 * i)).collect();
        Ok(GoRequest { name, info })
    }
}

/// A string from the wire: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
pub fn decode_string(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING {
        return Err(ProtoError::TooLong {
            what: "string",
            len: b.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    if b.contains(&0) {
        return Err(ProtoError::Malformed("string with NUL"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}

/// An export's size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSize {
    /// From [minimum, preferred, maximum], the order the control protocol carries them in.
    pub fn from_array([minimum, preferred, maximum]: [u32; 3]) -> BlockSize {
        BlockSize {
            minimum,
            preferred,
            maximum,
        }
    }

    pub fn to_array(&self) -> [u32; 3] {
        [self.minimum, self.preferred, self.maximum]
    }

    /// What the spec says a client must assume without the information.
    pub const DEFAULT: BlockSize = BlockSize {
        minimum: 512,
        preferred: 4096,
        maximum: MAX_PAYLOAD,
    };
}

/// One NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    /// An info type we do not know; the client must ignore it.
    Unknown(u16),
}

impl Info {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Info::Export { size, flags } => {
                b.extend_from_slice(&info::EXPORT.to_be_bytes());
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    info::NAME
                } else {
                    info::DESCRIPTION
                };
                b.extend_from_slice(&t.to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize(bs) => {
                b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                b.extend_from_slice(&bs.minimum.to_be_bytes());
                b.extend_from_slice(&bs.preferred.to_be_bytes());
                b.extend_from_slice(&bs.maximum.to_be_bytes());
            }
            Info::Unknown(t) => b.extend_from_slice(&t.to_be_bytes()),
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Info, ProtoError> {
        need("info reply", b, 2)?;
        let t = be_u16(b, 0);
        let body = &b[2..];
        Ok(match t {
            info::EXPORT => {
                if body.len() != 10 {
                    return Err(ProtoError::Malformed("NBD_INFO_EXPORT length"));
                }
                Info::Export {
                    size: be_u64(body, 0),
                    flags: be_u16(body, 8),
                }
            }
            info::NAME => Info::Name(decode_string(body)?),
            info::DESCRIPTION => Info::Description(decode_string(body)?),
            info::BLOCK_SIZE => {
                if body.len() != 12 {
                    return Err(ProtoError::Malformed("NBD_INFO_BLOCK_SIZE length"));
                }
                let bs = BlockSize {
                    minimum: be_u32(body, 0),
                    preferred: be_u32(body, 4),
                    maximum: be_u32(body, 8),
                };
                // proto.md "Size constraints": minimum a power of 2 up to 64 KiB; preferred a
                // power of 2 at least max(minimum, 512); maximum at least preferred.
                if !bs.minimum.is_power_of_two()
                    || bs.minimum > 65536
                    || !bs.preferred.is_power_of_two()
                    || bs.preferred < bs.minimum.max(512)
                    || bs.maximum < bs.preferred
                {
                    return Err(ProtoError::Malformed("NBD_INFO_BLOCK_SIZE values"));
                }
                Info::BlockSize(bs)
            }
            other => Info::Unknown(other),
        })
    }
}

/// Converts an errno from a local operation to the NBD error that may be sent for it.
pub fn nbd_error_from_errno(e: i32) -> u32 {
    match e {
        libc_errno::EPERM | libc_errno::EROFS | libc_errno::EACCES => errno::EPERM,
        libc_errno::ENOMEM => errno::ENOMEM,
        libc_errno::EINVAL => errno::EINVAL,
        libc_errno::ENOSPC | libc_errno::EDQUOT | libc_errno::EFBIG => errno::ENOSPC,
        libc_errno::EOVERFLOW => errno::EOVERFLOW,
        libc_errno::EOPNOTSUPP => errno::ENOTSUP,
        libc_errno::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

/// Linux errno values, so the protocol module needs no libc.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: cmd_flags::FUA,
            command: Command::Write,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            length: 4096,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        assert_eq!(h.payload_len(), 4096);
    }

    #[test]
    fn request_checks_follow_the_export() {
        let tx = tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA;
        let req = |command, flags, offset, length| RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        };
        assert_eq!(req(Command::Write, 0, 0, 512).check(4096, tx), Ok(()));
        assert_eq!(
            req(Command::Write, 0, 4000, 512).check(4096, tx),
            Err(errno::EINVAL)
        );
        assert_eq!(
            req(Command::Read, 0, u64::MAX, 1).check(4096, tx),
            Err(errno::EINVAL)
        );
        assert_eq!(
            req(Command::Trim, 0, 0, 512).check(4096, tx),
            Err(errno::EINVAL),
            "TRIM was not advertised"
        );
        assert_eq!(
            req(Command::Write, 1 << 7, 0, 512).check(4096, tx),
            Err(errno::EINVAL),
            "unknown flag"
        );
        assert_eq!(
            req(Command::Write, 0, 0, 512).check(4096, tx | tx_flags::READ_ONLY),
            Err(errno::EPERM)
        );
        assert_eq!(
            req(Command::Unknown(99), 0, 0, 0).check(4096, tx),
            Err(errno::EINVAL)
        );
        let huge = req(Command::Write, 0, 0, MAX_PAYLOAD + 1);
        assert!(huge.check_framing().is_err());
    }

    #[test]
    fn reply_decoding_rejects_bad_magic_and_truncation() {
        let r = SimpleReply {
            error: errno::EIO,
            cookie: 7,
        };
        assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
        assert!(matches!(
            SimpleReply::decode(&[0u8; 16]),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            SimpleReply::decode(&r.encode()[..15]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn go_request_round_trips_and_rejects_lies() {
        let g = GoRequest {
            name: "disk0".into(),
            info: vec![info::EXPORT, info::BLOCK_SIZE],
        };
        assert_eq!(GoRequest::decode(&g.encode()), Ok(g.clone()));
        let mut lying = g.encode();
        lying[3] = 200; // name length beyond the data
        assert!(GoRequest::decode(&lying).is_err());
        let mut short = g.encode();
        short.pop();
        assert!(GoRequest::decode(&short).is_err());
    }

    #[test]
    fn info_round_trips() {
        for i in [
            Info::Export {
                size: 1 << 30,
                flags: 0x1ff,
            },
            Info::Name("x".into()),
            Info::Description("d".into()),
            Info::BlockSize(BlockSize::DEFAULT),
        ] {
            assert_eq!(Info::decode(&i.encode()), Ok(i.clone()));
        }
        assert!(Info::decode(&[0, 3, 0, 0, 0, 3, 0, 0, 16, 0, 0, 0, 0, 0]).is_err());
    }
}
