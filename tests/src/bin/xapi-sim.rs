//! `xapi-sim`: does what xapi does to a tapdisk, for the VM scenarios, without xapi.
//!
//! - `pass-fd SOCKET NAME HOST:PORT`: xapi's `mirror_pass_fds` (storage_smapiv1_migrate.ml):
//!   connect to the NBD server, then to tapdisk's `nbdclient<pid>` socket, send NAME as the
//!   payload of one sendmsg carrying the connected socket (SCM_RIGHTS), and close without
//!   reading anything.
//! - `pass-garbage SOCKET NAME`: the same hand-off of a socket whose peer answers garbage
//!   (an HTTP error, then EOF), as a wrong server behind the address would.
//! - `stats`: reads `tap-ctl stats` output on stdin and parses it as xapi's `Tapctl.Stats`
//!   does (ocaml/tapctl/tapctl.ml): `name` string, `secs` [int, int], `images` [{`name`,
//!   `hits` [int, int], `fail` [int, int], `driver` {`type` int, `name` string}}],
//!   `nbd_mirror_failed` int, `reqs_outstanding` int, `tap` optional; other keys ignored.
//!   Prints `nbd_mirror_failed=N reqs_outstanding=N images=TYPE:NAME,...`.
//! - `list PID MINOR`: reads `tap-ctl list` output on stdin and finds the line as xapi's
//!   `Tapctl.list` does (fields split on single spaces, `pid=%u minor=%u state=%s`, then
//!   everything after `args=`); prints `state=S paused=BOOL args=ARGS` (`is_paused`: state is
//!   exactly `0x2a`).
//!
//! Exit 0 on success, 1 when the input is not what xapi accepts, 2 on a usage or I/O error.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use serde_json::Value;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match argv.as_slice() {
        ["pass-fd", socket, name, addr] => pass_fd(socket, name, addr).map_err(|e| (2, e)),
        ["pass-garbage", socket, name] => pass_garbage(socket, name).map_err(|e| (2, e)),
        ["stats"] => stdin().and_then(|s| stats(&s).map_err(|e| (1, e))),
        ["list", pid, minor] => stdin().and_then(|s| list(&s, pid, minor).map_err(|e| (1, e))),
        _ => Err((
            2,
            "usage: xapi-sim pass-fd SOCKET NAME HOST:PORT | pass-garbage SOCKET NAME | stats | \
             list PID MINOR"
                .into(),
        )),
    };
    match res {
        Ok(out) => println!("{out}"),
        Err((code, e)) => {
            eprintln!("xapi-sim: {e}");
            std::process::exit(code);
        }
    }
}

fn stdin() -> Result<String, (i32, String)> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| (2, format!("stdin: {e}")))?;
    Ok(s)
}

fn pass_fd(socket: &str, name: &str, addr: &str) -> Result<String, String> {
    let nbd = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let sock = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    control::fdpass::send_with_fd(&sock, name.as_bytes(), nbd.as_fd())
        .map_err(|e| format!("sendmsg: {e}"))?;
    Ok(format!("passed {addr} as {name:?}"))
}

fn pass_garbage(socket: &str, name: &str) -> Result<String, String> {
    use std::io::Write;
    let (ours, mut peer) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    peer.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    drop(peer);
    let sock = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    control::fdpass::send_with_fd(&sock, name.as_bytes(), ours.as_fd())
        .map_err(|e| format!("sendmsg: {e}"))?;
    Ok(format!("passed a garbage peer as {name:?}"))
}

fn field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("{at}: no {key:?}"))
}

fn int(v: &Value, key: &str, at: &str) -> Result<i64, String> {
    field(v, key, at)?
        .as_i64()
        .ok_or_else(|| format!("{at}.{key}: not an int"))
}

fn string<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a str, String> {
    field(v, key, at)?
        .as_str()
        .ok_or_else(|| format!("{at}.{key}: not a string"))
}

/// An OCaml `int64 * int64`: a JSON array of exactly two ints.
fn pair(v: &Value, key: &str, at: &str) -> Result<(i64, i64), String> {
    match field(v, key, at)?.as_array().map(Vec::as_slice) {
        Some([a, b]) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("{at}.{key}: not two ints")),
        },
        _ => Err(format!("{at}.{key}: not a pair")),
    }
}

fn stats(text: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("not JSON: {e}"))?;
    string(&v, "name", "stats")?;
    pair(&v, "secs", "stats")?;
    let images = field(&v, "images", "stats")?
        .as_array()
        .ok_or("stats.images: not a list")?;
    let mut names = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let at = format!("stats.images[{i}]");
        let name = string(img, "name", &at)?;
        pair(img, "hits", &at)?;
        pair(img, "fail", &at)?;
        let driver = field(img, "driver", &at)?;
        let ty = int(driver, "type", &format!("{at}.driver"))?;
        string(driver, "name", &format!("{at}.driver"))?;
        names.push(format!("{ty}:{name}"));
    }
    if let Some(tap) = v.get("tap").filter(|t| !t.is_null()) {
        int(tap, "minor", "stats.tap")?;
        pair(tap, "reqs", "stats.tap")?;
        pair(tap, "kicks", "stats.tap")?;
    }
    let failed = int(&v, "nbd_mirror_failed", "stats")?;
    let outstanding = int(&v, "reqs_outstanding", "stats")?;
    Ok(format!(
        "nbd_mirror_failed={failed} reqs_outstanding={outstanding} images={}",
        names.join(",")
    ))
}

fn list(text: &str, pid: &str, minor: &str) -> Result<String, String> {
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [p, m, s, rest @ ..] = fields.as_slice() else {
            continue;
        };
        let (Some(p), Some(m), Some(s)) = (
            p.strip_prefix("pid="),
            m.strip_prefix("minor="),
            s.strip_prefix("state="),
        ) else {
            continue;
        };
        if p.parse::<u32>().is_err() || m.parse::<u32>().is_err() {
            continue;
        }
        let Some((_, args)) = rest
            .join(" ")
            .split_once("args=")
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        else {
            continue; // xapi drops lines without args=
        };
        if p == pid && m == minor {
            return Ok(format!("state={s} paused={} args={args}", s == "0x2a"));
        }
    }
    Err(format!(
        "no line for pid {pid} minor {minor} (xapi: Unknown device)"
    ))
}
