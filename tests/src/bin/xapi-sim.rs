//! `xapi-sim`: does what xapi does to a tapdisk, for the VM scenarios, without xapi.
//!
//! - `pass-fd SOCKET NAME HOST:PORT`: xapi's `mirror_pass_fds` (storage_smapiv1_migrate.ml):
//!   connect to the NBD server, then to tapdisk's `nbdclient<pid>` socket, send NAME as the
//!   payload of one sendmsg carrying the connected socket (SCM_RIGHTS), and close without
//!   reading anything.
//! - `pass-garbage SOCKET NAME`: the same hand-off of a socket whose peer answers garbage
//!   (an HTTP error, then EOF), as a wrong server behind the address would.
//! - `serve-oldstyle PORT IMAGE`: an NBD server that greets exactly as tapdisk's
//!   `nbdserver<pid>.<minor>` (oldstyle, transmission flags 0: nothing optional offered, not even
//!   HAS_FLAGS) and serves READ, WRITE and DISC on IMAGE, one thread per connection. Every
//!   request is logged on stdout as nbdkit's log filter names them (`Read id=..`, `Write id=..
//!   fua=0|1`, `Flush id=..`, `Trim id=..`, `Zero id=..`, `Cache id=..`); anything but READ,
//!   WRITE and DISC is answered EINVAL, as a server that never offered it.
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
        ["serve-oldstyle", port, image] => serve_oldstyle(port, image).map_err(|e| (2, e)),
        ["stats"] => stdin().and_then(|s| stats(&s).map_err(|e| (1, e))),
        ["list", pid, minor] => stdin().and_then(|s| list(&s, pid, minor).map_err(|e| (1, e))),
        _ => Err((
            2,
            "usage: xapi-sim pass-fd SOCKET NAME HOST:PORT | pass-garbage SOCKET NAME | serve-oldstyle PORT IMAGE | stats | \
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

fn serve_oldstyle(port: &str, image: &str) -> Result<String, String> {
    use std::sync::Arc;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| format!("{image}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{image}: {e}"))?.len();
    let file = Arc::new(file);
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().map_err(|e| e.to_string())?))
            .map_err(|e| format!("bind {port}: {e}"))?;
    println!("listening on 127.0.0.1:{port}, {size} bytes, flags 0");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let file = file.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_conn(conn, &file, size) {
                println!("connection ended: {e}");
            }
        });
    }
    Ok(String::new())
}

/// One oldstyle connection: the greeting, then requests until DISC or EOF.
fn serve_conn(mut c: TcpStream, file: &std::fs::File, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut greeting = Vec::with_capacity(152);
    greeting.extend_from_slice(b"NBDMAGIC");
    greeting.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    greeting.extend_from_slice(&size.to_be_bytes());
    greeting.extend_from_slice(&0u32.to_be_bytes()); // tapdisk's flags: none
    greeting.extend_from_slice(&[0u8; 124]);
    c.write_all(&greeting)?;
    let mut hdr = [0u8; 28];
    loop {
        if c.read_exact(&mut hdr).is_err() {
            return Ok(());
        }
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let flags = u16::from_be_bytes([hdr[4], hdr[5]]);
        let ty = u16::from_be_bytes([hdr[6], hdr[7]]);
        let handle = &hdr[8..16];
        let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap_or([0; 8]));
        let len = be32(&hdr[24..28]);
        if be32(&hdr[0..4]) != 0x2560_9513 {
            return Err(std::io::Error::other("bad request magic"));
        }
        let id = u64::from_be_bytes(handle.try_into().unwrap_or([0; 8]));
        let name = ["Read", "Write", "Disc", "Flush", "Trim", "Cache", "Zero"]
            .get(usize::from(ty))
            .copied()
            .unwrap_or("Other");
        println!(
            "{name} id={id} offset={offset:#x} count={len:#x} fua={}",
            flags & 1
        );
        let mut reply = Vec::with_capacity(16);
        reply.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        let mut data = Vec::new();
        let error: u32 = match ty {
            0 => {
                data.resize(len as usize, 0);
                file.read_exact_at(&mut data, offset).map_or(5, |()| 0)
            }
            1 => {
                let mut buf = vec![0u8; len as usize];
                c.read_exact(&mut buf)?;
                file.write_all_at(&buf, offset).map_or(5, |()| 0)
            }
            2 => return Ok(()),
            _ => 22, // EINVAL: never offered
        };
        reply.extend_from_slice(&error.to_be_bytes());
        reply.extend_from_slice(handle);
        if error == 0 {
            reply.extend_from_slice(&data);
        }
        c.write_all(&reply)?;
    }
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
