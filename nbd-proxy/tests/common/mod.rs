//! Helpers for the interop tests: real peer processes that are killed on drop, sockets, data.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_proxy::client::{Connection, Export, Negotiator};

/// A peer process, killed when dropped.
pub struct Peer {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a program is installed; tests that need it say so and fail when it is missing
/// (scripts/setup-host installs them), so a missing peer is never a silent pass.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "{program} is not installed: run scripts/setup-host");
}

pub fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("peer exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never accepted connections", path.display());
}

/// Starts `program args...`; `{sock}` in an argument is replaced by the socket path.
pub fn spawn(program: &str, args: &[&str]) -> Peer {
    require(program);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{sock}", &socket.to_string_lossy()))
        .collect();
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    wait_for_socket(&socket, &mut child);
    Peer { child, socket, dir }
}

/// Our own server on a Unix socket, with `extra` arguments; waits for "listening on".
pub fn our_server(exports: &[(&str, &Path)], extra: &[&str]) -> Peer {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-proxy"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()));
    for (name, path) in exports {
        cmd.arg("--export")
            .arg(format!("{name}={}", path.display()));
    }
    cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn nbd-proxy serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    assert!(line.starts_with("listening on"), "unexpected: {line:?}");
    Peer { child, socket, dir }
}

pub fn connect(socket: &Path, export: &str) -> Connection<UnixStream> {
    let s = UnixStream::connect(socket).expect("connect");
    let (s, e) = Negotiator::start(s)
        .expect("greeting")
        .go(export)
        .expect("go");
    Connection::new(s, e)
}

pub fn export_of(c: &Connection<UnixStream>) -> Export {
    c.export().clone()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(len).expect("size image");
    p
}
