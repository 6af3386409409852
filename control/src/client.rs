//! The orchestrator's side: connect to a daemon's control socket and send requests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;

#[cfg(doc)]
use crate::protocol::PassFdReply;
use crate::protocol::{
    Command, NegotiatedNbd, Reply, Request, Response, MAX_FD_NAME, MAX_LINE, VERSION,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The cause is the error's `source()` (so `{:#}` chains print it once).
    #[error("cannot connect to control socket {path}")]
    Connect { path: String, source: io::Error },
    #[error("control socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon closed the control connection without replying")]
    Closed,
    #[error("malformed reply from the daemon: {0}")]
    BadReply(String),
    #[error("the daemon refused: {message} ({code})")]
    Refused { code: String, message: String },
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

/// A result that is read and dropped, whatever its shape (also none): for a caller that
/// needs only to know the daemon said `ok`.
pub type Ignored = serde::de::IgnoredAny;

pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client {
            stream,
            reader,
            next_id: 1,
        })
    }

    /// Passes `fd` under `name`: the line and the fd go in one sendmsg, so the daemon binds
    /// the fd to exactly this request. The result is parsed as `R`: [`PassFdReply`], or
    /// [`Ignored`] when only the daemon's consent matters.
    pub fn pass_fd<R: DeserializeOwned>(
        &mut self,
        name: &str,
        fd: BorrowedFd<'_>,
        nbd: Option<NegotiatedNbd>,
    ) -> Result<R, ClientError> {
        if name.is_empty() || name.len() > MAX_FD_NAME {
            return Err(ClientError::Invalid("fd names are 1 to 255 bytes"));
        }
        let line = self.encode(Command::PassFd {
            name: name.to_owned(),
            nbd,
        })?;
        crate::fdpass::send_with_fd(&self.stream, line.as_bytes(), fd)?;
        typed(self.read_reply()?)
    }

    /// Sends a request without an fd and waits for its result, parsed as `R`: the command's
    /// reply type (`InfoReply` for `info`, ...), or `serde_json::Value` for the bare JSON.
    pub fn request<R: DeserializeOwned>(&mut self, command: Command) -> Result<R, ClientError> {
        if matches!(command, Command::PassFd { .. }) {
            return Err(ClientError::Invalid("pass-fd needs an fd: use pass_fd()"));
        }
        let line = self.encode(command)?;
        self.stream.write_all(line.as_bytes())?;
        typed(self.read_reply()?)
    }

    /// As [`Client::request`], with the result parsed as the type of `command`'s reply.
    pub fn call(&mut self, command: Command) -> Result<Response, ClientError> {
        let result: serde_json::Value = self.request(command.clone())?;
        Response::parse(&command, result).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// Sends `line` as it is (a newline is added) and returns the reply line, unparsed.
    pub fn raw_line(&mut self, line: &str) -> Result<String, ClientError> {
        self.stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\n")?;
        let mut reply = String::new();
        if (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut reply)?
            == 0
        {
            return Err(ClientError::Closed);
        }
        Ok(reply.trim_end().to_owned())
    }

    /// Bounds how long a reply may take (None: forever).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(t)?;
        Ok(())
    }

    /// After `watch`: the connection's lines from here on (each one [`crate::protocol::Event`]),
    /// with no read timeout, as events come when they come. Lines already read ahead stay.
    pub fn into_lines(self) -> Result<BufReader<UnixStream>, ClientError> {
        self.stream.set_read_timeout(None)?;
        Ok(self.reader)
    }

    fn encode(&mut self, command: Command) -> Result<String, ClientError> {
        let req = Request {
            v: VERSION,
            id: self.next_id,
            command,
        };
        self.next_id += 1;
        let mut line =
            serde_json::to_string(&req).map_err(|e| ClientError::BadReply(e.to_string()))?;
        line.push('\n');
        if line.len() > MAX_LINE {
            return Err(ClientError::Invalid("request longer than the line limit"));
        }
        Ok(line)
    }

    /// The next reply's result (`null` if an `ok` reply had none), or the daemon's refusal.
    fn read_reply(&mut self) -> Result<serde_json::Value, ClientError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        let reply: Reply = serde_json::from_str(line.trim_end())
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        if reply.ok {
            Ok(reply.result.unwrap_or(serde_json::Value::Null))
        } else {
            let e = reply.error.unwrap_or(crate::protocol::ErrorBody {
                code: "unknown".into(),
                message: "no error body".into(),
            });
            Err(ClientError::Refused {
                code: e.code,
                message: e.message,
            })
        }
    }
}

/// `result` as `R`, or a malformed reply that says which key or value did not fit.
fn typed<R: DeserializeOwned>(result: serde_json::Value) -> Result<R, ClientError> {
    serde_json::from_value(result).map_err(|e| ClientError::BadReply(e.to_string()))
}
