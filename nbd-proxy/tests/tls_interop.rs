//! TLS on the migration link: our server with libnbd's nbdinfo/nbdcopy over nbds://, and the
//! `connect` relay against qemu-nbd's and our own TLS servers. Certificates are made here with
//! openssl, client certificates included.

mod common;

use std::io::{BufRead, BufReader, Read as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command as Cmd, Stdio};

use common::*;
use control::fdpass::recv_with_fd;
use control::protocol::{Command, Request};
use nbd_proxy::client::{Connection, Export};
use nbd_proxy::proto::{BlockSize, Command as Nbd};

fn tls_server_args(dir: &Path) -> Vec<String> {
    [
        "--tls-cert",
        "server-cert.pem",
        "--tls-key",
        "server-key.pem",
        "--tls-client-ca",
        "ca-cert.pem",
    ]
    .iter()
    .map(|a| {
        if a.ends_with(".pem") {
            dir.join(a).display().to_string()
        } else {
            a.to_string()
        }
    })
    .collect()
}

fn run_ok(program: &str, args: &[&str]) -> String {
    require(program);
    let out = Cmd::new(program).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let img = image(dir.path(), "d.img", 32 << 20);
    let args = tls_server_args(dir.path());
    let (_srv, port) = our_server_tcp(
        &[("disk", &img)],
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let certs = dir.path().display().to_string();
    let uri = format!("nbds://localhost:{port}/disk?tls-certificates={certs}");
    let info = run_ok("nbdinfo", &["--json", &uri]);
    assert!(info.contains("\"export-size\": 33554432"), "{info}");
    assert!(
        info.contains("\"TLS\": true"),
        "nbdinfo did not negotiate TLS:\n{info}"
    );

    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(7, 32 << 20)).expect("src");
    run_ok("nbdcopy", &[src.to_str().expect("p"), &uri]);
    let back = dir.path().join("back.img");
    run_ok("nbdcopy", &[&uri, back.to_str().expect("p")]);
    assert!(std::fs::read(&back).expect("back") == std::fs::read(&src).expect("src"));

    // Without TLS the server refuses to describe or serve the export.
    let out = Cmd::new("nbdinfo")
        .arg(format!("nbd://localhost:{port}/disk"))
        .output()
        .expect("nbdinfo");
    assert!(
        !out.status.success(),
        "plain NBD was served by a TLS-only server"
    );
    // A TLS client without a certificate is refused in the TLS handshake.
    let nocert = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        dir.path().join("ca-cert.pem"),
        nocert.path().join("ca-cert.pem"),
    )
    .expect("copy");
    let uri = format!(
        "nbds://localhost:{port}/disk?tls-certificates={}",
        nocert.path().display()
    );
    let out = Cmd::new("nbdinfo").arg(&uri).output().expect("nbdinfo");
    assert!(
        !out.status.success(),
        "a client without a certificate was served"
    );
}

/// Runs `connect` with TLS against the server on `port`, with a stand-in daemon; proves the
/// relayed socket carries data both ways, then that the relay exits when the daemon closes.
fn relay_round_trip(dir: &Path, port: u16, export: &str) {
    let ctl = dir.join("ctl.sock");
    let l = UnixListener::bind(&ctl).expect("bind");
    let mut proxy = Cmd::new(env!("CARGO_BIN_EXE_nbd-proxy"))
        .args([
            "connect",
            "--to",
            &format!("tcp:localhost:{port}"),
            "--export",
            export,
        ])
        .args(["--handoff", ctl.to_str().expect("p"), "--name", "mirror0"])
        .arg("--tls-ca")
        .arg(dir.join("ca-cert.pem"))
        .arg("--tls-cert")
        .arg(dir.join("client-cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("client-key.pem"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("connect");
    let (conn, _) = l.accept().expect("accept");
    let mut buf = vec![0u8; 65536];
    let r = recv_with_fd(&conn, &mut buf).expect("recvmsg");
    let req: Request =
        serde_json::from_str(std::str::from_utf8(&buf[..r.len]).expect("utf8").trim_end())
            .expect("json");
    std::io::Write::write_all(
        &mut &conn,
        format!("{{\"v\":1,\"id\":{},\"ok\":true}}\n", req.id).as_bytes(),
    )
    .expect("reply");
    let Command::PassFd { nbd: Some(n), .. } = req.command else {
        panic!("TLS hand-off must be negotiated: {req:?}")
    };
    let export = Export {
        name: n.export,
        size: n.size,
        flags: n.flags,
        block_size: BlockSize::from_array(n.block_size),
    };
    let mut c = Connection::new(UnixStream::from(r.fd.expect("fd")), export);
    for i in 0..16u64 {
        let data = pattern(i, 65536);
        c.send(Nbd::Write, 0, i * 65536, 65536, Some(&data))
            .expect("send");
    }
    for _ in 0..16 {
        assert_eq!(c.recv().expect("reply").result, Ok(vec![]));
    }
    assert_eq!(
        c.call(Nbd::Read, 0, 3 * 65536, 65536, None).expect("read"),
        Ok(pattern(3, 65536))
    );
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("line");
    assert!(line.contains("TLS, negotiated"), "{line}");
    drop(c.disconnect().expect("disc"));
    let status = proxy.wait().expect("relay exits");
    assert!(status.success(), "relay exit {status}");
}

#[test]
fn connect_relays_to_our_tls_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let img = image(dir.path(), "d.img", 8 << 20);
    let args = tls_server_args(dir.path());
    let (_srv, port) = our_server_tcp(
        &[("disk", &img)],
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    relay_round_trip(dir.path(), port, "disk");
    let mut f = std::fs::File::open(&img).expect("img");
    let mut first = vec![0u8; 65536];
    f.read_exact(&mut first).expect("read");
    assert_eq!(first, pattern(0, 65536));
}

#[test]
fn connect_relays_to_qemu_nbd_with_x509() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let img = image(dir.path(), "d.img", 8 << 20);
    let port = free_port();
    require("qemu-nbd");
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
        dir.path().display()
    );
    let mut qemu = Cmd::new("qemu-nbd")
        .args([
            "--object",
            &creds,
            "--tls-creds",
            "tls0",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-t", "-f", "raw", "-x", "disk", img.to_str().expect("p")])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    relay_round_trip(dir.path(), port, "disk");
    let _ = qemu.kill();
    let _ = qemu.wait();
    let bytes = std::fs::read(&img).expect("img");
    assert!(bytes[..65536] == pattern(0, 65536)[..]);
}
