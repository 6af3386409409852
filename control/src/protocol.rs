//! Messages. One request or reply per line, UTF-8 JSON, at most [`MAX_LINE`] bytes.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest fd name.
pub const MAX_FD_NAME: usize = 64;

/// A request: `{"v":1,"id":7,"cmd":"pass-fd","args":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub id: u64,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", content = "args", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Command {
    /// Store the fd sent with this line (SCM_RIGHTS) under `name`.
    PassFd {
        name: String,
        /// Present when the sender already ran the NBD handshake: the socket is in the
        /// transmission phase and this describes the export.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd: Option<NegotiatedNbd>,
    },
}

/// An NBD export negotiated by the fd's sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiatedNbd {
    pub export: String,
    pub size: u64,
    /// NBD transmission flags.
    pub flags: u16,
    /// NBD_INFO_BLOCK_SIZE (minimum, preferred, maximum payload).
    pub block_size: [u32; 3],
}

/// A reply: `{"v":1,"id":7,"ok":true,"result":{...}}` or
/// `{"v":1,"id":7,"ok":false,"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable (see PROTOCOL.md).
    pub code: String,
    /// For humans.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_fd_wire_form_is_stable() {
        let r = Request {
            v: VERSION,
            id: 7,
            command: Command::PassFd {
                name: "mirror0".into(),
                nbd: None,
            },
        };
        let s = serde_json::to_string(&r).expect("serialize");
        assert_eq!(
            s,
            r#"{"v":1,"id":7,"cmd":"pass-fd","args":{"name":"mirror0"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).expect("parse"), r);
    }
}
