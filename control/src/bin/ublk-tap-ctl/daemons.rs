//! Our daemons: every control socket under [`RUN_DIR`], asked for `info` (which carries the
//! pid tap-ctl's `-p` names), as `ublk-mirror-ctl list` finds them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use control::client::{Client, ClientError};
use control::protocol::{Command, InfoReply};
use control::RUN_DIR;

/// How long `info` (and `stats`) may take: tap-ctl's own 10 s for LIST and STATS.
pub const QUICK: Duration = Duration::from_secs(10);

/// A daemon that answered, with the connection it answered on.
pub struct Daemon {
    pub socket: PathBuf,
    pub client: Client,
    pub info: InfoReply,
}

/// What a `-p PID -m MINOR` names.
pub enum Found {
    Ours(Daemon),
    /// One of our daemons has the pid, but serves another dev-id.
    OtherMinor(Daemon),
    NotOurs,
}

fn probe(socket: &Path) -> Result<Daemon, ClientError> {
    let mut client = Client::connect(socket)?;
    client.set_timeout(Some(QUICK))?;
    let info = client.request(Command::Info)?;
    Ok(Daemon {
        socket: socket.to_owned(),
        client,
        info,
    })
}

/// Every `*.sock` under RUN_DIR (none if it does not exist or cannot be read).
fn sockets() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("sock"))
        .collect();
    found.sort();
    found
}

/// Every daemon that answers, by dev-id, and the sockets that did not answer, with why.
pub fn all() -> (Vec<Daemon>, Vec<(PathBuf, ClientError)>) {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for socket in sockets() {
        match probe(&socket) {
            Ok(d) => up.push(d),
            Err(e) => down.push((socket, e)),
        }
    }
    up.sort_by_key(|d| d.info.dev_id);
    (up, down)
}

/// The daemon whose pid is `pid`: first the socket a daemon of dev-id `minor` has by default,
/// then every socket. A pid of 0 or less is never ours (0 is what a daemon too old to report
/// its pid says).
pub fn find(pid: i32, minor: i32) -> Found {
    let Ok(pid) = u32::try_from(pid) else {
        return Found::NotOurs;
    };
    if pid == 0 {
        return Found::NotOurs;
    }
    let guess = Path::new(RUN_DIR).join(format!("{minor}.sock"));
    let by_pid = |socket: &Path| probe(socket).ok().filter(|d| d.info.pid == pid);
    let found = by_pid(&guess).or_else(|| {
        sockets()
            .into_iter()
            .filter(|s| *s != guess)
            .find_map(|s| by_pid(&s))
    });
    match found {
        Some(d) if i64::from(d.info.dev_id) == i64::from(minor) => Found::Ours(d),
        Some(d) => Found::OtherMinor(d),
        None => Found::NotOurs,
    }
}
