//! `nbd-proxy connect` hands a connected socket to a control socket with pass-fd. A small
//! listener stands in for the daemon (whose control server is another issue) and proves the
//! received fd works: untouched (the receiver runs the handshake) or already negotiated.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command as Cmd;
use std::thread::JoinHandle;

use common::*;
use control::fdpass::recv_with_fd;
use control::protocol::{Command, Request};
use nbd_proxy::client::{Connection, Export, Negotiator};
use nbd_proxy::proto::{BlockSize, Command as Nbd};

/// Accepts one pass-fd request, replies ok, returns the request and the fd as a stream.
fn fake_daemon(path: &std::path::Path) -> JoinHandle<(Request, UnixStream)> {
    let l = UnixListener::bind(path).expect("bind control");
    std::thread::spawn(move || {
        let (conn, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let r = recv_with_fd(&conn, &mut buf).expect("recvmsg");
        assert!(!r.excess_fds);
        let line = std::str::from_utf8(&buf[..r.len]).expect("utf8");
        assert!(
            line.ends_with('\n'),
            "the whole line came with its fd: {line:?}"
        );
        let req: Request = serde_json::from_str(line.trim_end()).expect("json");
        let fd = r.fd.expect("an fd came with the pass-fd line");
        let reply = format!("{{\"v\":1,\"id\":{},\"ok\":true}}\n", req.id);
        std::io::Write::write_all(&mut &conn, reply.as_bytes()).expect("reply");
        (req, UnixStream::from(fd))
    })
}

fn connect_cmd(srv: &Peer, ctl: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Cmd::new(env!("CARGO_BIN_EXE_nbd-proxy"))
        .args([
            "connect",
            "--to",
            &format!("unix:{}", srv.socket.display()),
            "--export",
            "disk",
        ])
        .args(["--handoff", ctl.to_str().expect("p"), "--name", "mirror0"])
        .args(extra)
        .output()
        .expect("run connect")
}

#[test]
fn raw_handoff_leaves_the_greeting_to_the_receiver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 8 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let ctl = dir.path().join("ctl.sock");
    let daemon = fake_daemon(&ctl);
    let out = connect_cmd(&srv, &ctl, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("handed off"));
    let (req, sock) = daemon.join().expect("daemon");
    assert!(matches!(req.command, Command::PassFd { ref name, nbd: None } if name == "mirror0"));
    // The greeting is still unread: the receiver negotiates and uses the export.
    let (s, e) = Negotiator::start(sock)
        .expect("greeting")
        .go("disk")
        .expect("go");
    let mut c = Connection::new(s, e);
    let data = pattern(3, 4096);
    assert_eq!(
        c.call(Nbd::Write, 0, 0, 4096, Some(&data)).expect("write"),
        Ok(vec![])
    );
    assert_eq!(c.call(Nbd::Read, 0, 0, 4096, None).expect("read"), Ok(data));
}

#[test]
fn negotiated_handoff_is_in_transmission_with_the_export_described() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 8 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let ctl = dir.path().join("ctl.sock");
    let daemon = fake_daemon(&ctl);
    let out = connect_cmd(&srv, &ctl, &["--negotiate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (req, sock) = daemon.join().expect("daemon");
    let Command::PassFd { nbd: Some(n), .. } = req.command else {
        panic!("negotiated hand-off without the export: {req:?}");
    };
    assert_eq!((n.export.as_str(), n.size), ("disk", 8 << 20));
    let export = Export {
        name: n.export,
        size: n.size,
        flags: n.flags,
        block_size: BlockSize::from_array(n.block_size),
    };
    let mut c = Connection::new(sock, export);
    let data = pattern(4, 8192);
    assert_eq!(
        c.call(Nbd::Write, 0, 4096, 8192, Some(&data))
            .expect("write"),
        Ok(vec![])
    );
    assert_eq!(
        c.call(Nbd::Read, 0, 4096, 8192, None).expect("read"),
        Ok(data)
    );
}

#[test]
fn connect_explains_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let ctl = dir.path().join("ctl.sock");
    let run = |args: &[&str]| {
        let out = Cmd::new(env!("CARGO_BIN_EXE_nbd-proxy"))
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let to = format!("unix:{}", srv.socket.display());
    let _daemon = fake_daemon(&ctl);
    let e = run(&[
        "connect",
        "--to",
        &to,
        "--export",
        "nope",
        "--handoff",
        ctl.to_str().expect("p"),
        "--name",
        "m",
    ]);
    assert!(e.contains("no export named \"nope\""), "{e}");
    let e = run(&[
        "connect",
        "--to",
        &to,
        "--export",
        "disk",
        "--handoff",
        "/nonexistent.sock",
        "--name",
        "m",
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let gone = dir.path().join("gone.sock");
    let e = run(&[
        "connect",
        "--to",
        &format!("unix:{}", gone.display()),
        "--export",
        "disk",
        "--handoff",
        ctl.to_str().expect("p"),
        "--name",
        "m",
    ]);
    assert!(e.contains("cannot connect"), "{e}");
}
