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

/// The first line of `program --version`, e.g. "qemu-nbd 10.0.2 (Debian ...)".
pub fn peer_version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program} (version unknown)"))
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
    // Which release of the peer this ran against (qemu 7.2 and 10.x both occur on our machines:
    // see scripts/setup-host); shown with `cargo test -- --nocapture` and on failure.
    eprintln!("peer: {}", peer_version(program));
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

/// Starts `nbd-proxy serve --listen LISTEN` with `exports` and `extra` arguments; waits for its
/// "listening on ADDRESS" line and returns the process and that address.
fn spawn_our_server(
    listen: &str,
    exports: &[(&str, &Path)],
    extra: &[&str],
    dir: tempfile::TempDir,
) -> (Peer, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-proxy"));
    cmd.args(["serve", "--listen", listen]);
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
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .to_owned();
    let socket = dir.path().join("nbd.sock");
    (Peer { child, socket, dir }, address)
}

/// Our own server on a Unix socket, with `extra` arguments.
pub fn our_server(exports: &[(&str, &Path)], extra: &[&str]) -> Peer {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("unix:{}", dir.path().join("nbd.sock").display());
    spawn_our_server(&listen, exports, extra, dir).0
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

/// Our server on TCP loopback with `extra` arguments; returns it and its port.
pub fn our_server_tcp(exports: &[(&str, &Path)], extra: &[&str]) -> (Peer, u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (peer, address) = spawn_our_server("tcp:127.0.0.1:0", exports, extra, dir);
    let port = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address:?}"));
    (peer, port)
}

/// A free TCP port on loopback (for peers that cannot report the one they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A CA and server and client certificates for localhost/127.0.0.1 in `dir`, named the way
/// QEMU's and libnbd's x509 directories expect (ca-cert.pem, server-*.pem, client-*.pem).
pub fn make_certs(dir: &Path) {
    require("openssl");
    let sh = |script: &str| {
        let ok = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl failed: {script}");
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "openssl req -x509 {ec} -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=test-ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    ));
    for (who, ext) in [("server", "serverAuth"), ("client", "clientAuth")] {
        sh(&format!(
            "openssl req {ec} -keyout {who}-key.pem -out {who}.csr -subj /CN={who}; \
             printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage={ext}\\n\
basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\n' > {who}.ext; \
             openssl x509 -req -in {who}.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
             -out {who}-cert.pem -days 2 -extfile {who}.ext"
        ));
    }
}
