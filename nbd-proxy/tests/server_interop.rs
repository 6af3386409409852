//! `nbd-proxy serve` against real clients (nbdinfo, nbdcopy, qemu-io, qemu-img) and ours:
//! advertised flags, data, concurrency, reordering, garbage, run-time export removal.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command as Cmd;
use std::time::{Duration, Instant};

use common::*;
use nbd_proxy::client::Negotiator;
use nbd_proxy::proto::{cmd_flags, tx_flags, Command};

fn nbd_uri(socket: &std::path::Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

fn run(program: &str, args: &[&str]) -> String {
    require(program);
    let out = Cmd::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        common::peer_version(program),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdinfo_sees_size_and_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 48 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let json = run("nbdinfo", &["--json", &nbd_uri(&srv.socket, "disk")]);
    for want in [
        "\"export-size\": 50331648",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"can_multi_conn\": true",
        "\"is_read_only\": false",
    ] {
        assert!(json.contains(want), "nbdinfo lacks {want}:\n{json}");
    }
    let list = run("nbdinfo", &["--list", "--json", &nbd_uri(&srv.socket, "")]);
    assert!(list.contains("\"export-name\": \"disk\""), "{list}");
}

#[test]
fn nbdcopy_in_and_out_of_256_mib() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(42, 256 << 20)).expect("write source");
    let dst = image(dir.path(), "dst.img", 256 << 20);
    let srv = our_server(&[("disk", &dst)], &[]);
    let uri = nbd_uri(&srv.socket, "disk");
    run("nbdcopy", &[src.to_str().expect("path"), &uri]);
    let back = dir.path().join("back.img");
    run("nbdcopy", &[&uri, back.to_str().expect("path")]);
    let want = std::fs::read(&src).expect("read src");
    assert!(
        std::fs::read(&dst).expect("read dst") == want,
        "export differs from the source"
    );
    assert!(
        std::fs::read(&back).expect("read back") == want,
        "copy out differs"
    );
}

#[test]
fn qemu_io_write_discard_zero_matches_a_local_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 8 << 20);
    let reference = image(dir.path(), "ref.img", 8 << 20);
    let ops = [
        "write -P 0xab 0 2M",
        "write -P 0xcd -f 3M 1M",
        "discard 512k 256k",
        "write -z 1M 512k",
        "write -z -u 6M 1M",
        "flush",
    ];
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for op in ops {
        args.push("-c".into());
        args.push(op.into());
    }
    let srv = our_server(&[("disk", &img)], &[]);
    let mut remote = args.clone();
    remote.push(nbd_uri(&srv.socket, "disk"));
    run(
        "qemu-io",
        &remote.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut local = args;
    local.push(reference.to_string_lossy().into_owned());
    run(
        "qemu-io",
        &local.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 512k 256k",
            "-c",
            "read -P 0 1M 512k",
            "-c",
            "read -P 0xab 0 512k",
            &nbd_uri(&srv.socket, "disk"),
        ],
    );
    drop(srv);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().expect("p"),
            reference.to_str().expect("p"),
        ],
    );
}

#[test]
fn concurrent_clients_on_disjoint_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 64 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let region = 16u64 << 20;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let sock = srv.socket.clone();
            std::thread::spawn(move || {
                let mut c = connect(&sock, "disk");
                for i in 0..16u64 {
                    let data = pattern(t * 100 + i, 1 << 20);
                    c.send(
                        Command::Write,
                        0,
                        t * region + i * (1 << 20),
                        1 << 20,
                        Some(&data),
                    )
                    .expect("send");
                }
                for _ in 0..16 {
                    assert_eq!(c.recv().expect("reply").result, Ok(vec![]));
                }
                c.call(Command::Flush, 0, 0, 0, None)
                    .expect("flush")
                    .expect("flush ok");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let bytes = std::fs::read(&img).expect("read");
    for t in 0..4u64 {
        for i in 0..16u64 {
            let at = (t * region + i * (1 << 20)) as usize;
            assert!(
                bytes[at..at + (1 << 20)] == pattern(t * 100 + i, 1 << 20)[..],
                "client {t} chunk {i}"
            );
        }
    }
}

#[test]
fn reorder_jitter_answers_out_of_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(
        &[("disk", &img)],
        &["--reorder-jitter", "20", "--workers", "8"],
    );
    let mut c = connect(&srv.socket, "disk");
    let sent: Vec<u64> = (0..32)
        .map(|i| {
            c.send(Command::Read, 0, i * 4096, 4096, None)
                .expect("send")
        })
        .collect();
    let got: Vec<u64> = (0..32).map(|_| c.recv().expect("reply").cookie).collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, sent, "every request answered once");
    assert_ne!(
        got, sent,
        "32 jittered replies came back in order: jitter is not working"
    );
}

#[test]
fn garbage_client_is_dropped_and_others_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let mut good = connect(&srv.socket, "disk");
    let bad = connect(&srv.socket, "disk");
    let mut raw = bad.into_inner();
    raw.write_all(&[0xde; 28]).expect("send garbage");
    let mut buf = [0u8; 1];
    assert_eq!(
        raw.read(&mut buf).expect("read after garbage"),
        0,
        "server closes on garbage"
    );
    let data = pattern(9, 4096);
    let r = good
        .call(Command::Write, cmd_flags::FUA, 0, 4096, Some(&data))
        .expect("write");
    assert_eq!(r, Ok(vec![]));
    assert_eq!(
        good.call(Command::Read, 0, 0, 4096, None).expect("read"),
        Ok(data)
    );
}

#[test]
fn out_of_range_and_read_only_are_errors_not_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(&[("disk", &img)], &["--read-only"]);
    let c = connect(&srv.socket, "disk");
    assert!(c.export().has(tx_flags::READ_ONLY));
    // Bypass the client's own checks to see the server's answers.
    let mut raw = c.into_inner();
    let hdr = |command, cookie, offset, length| nbd_proxy::proto::RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    raw.write_all(&hdr(Command::Read, 1, 1 << 20, 4096).encode())
        .expect("send");
    raw.write_all(&hdr(Command::Write, 2, 0, 4).encode())
        .expect("send");
    raw.write_all(&[1, 2, 3, 4]).expect("payload");
    raw.write_all(&hdr(Command::Read, 3, 0, 512).encode())
        .expect("send");
    let mut errors = std::collections::HashMap::new();
    for _ in 0..3 {
        let mut h = [0u8; 16];
        raw.read_exact(&mut h).expect("reply");
        let r = nbd_proxy::proto::SimpleReply::decode(&h).expect("decode");
        if r.error == 0 {
            let mut d = [0u8; 512];
            raw.read_exact(&mut d).expect("data");
        }
        errors.insert(r.cookie, r.error);
    }
    assert_eq!(
        errors[&1],
        nbd_proxy::proto::errno::EINVAL,
        "read beyond the end"
    );
    assert_eq!(
        errors[&2],
        nbd_proxy::proto::errno::EPERM,
        "write to a read-only export"
    );
    assert_eq!(errors[&3], 0);
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(&[("disk", &img)], &["--handshake-timeout", "1"]);
    let mut s = UnixStream::connect(&srv.socket).expect("connect");
    let start = Instant::now();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.read_to_end(&mut buf).expect("server closes");
    assert_eq!(buf.len(), 18, "greeting only");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(Negotiator::start(UnixStream::connect(&srv.socket).expect("c")).is_ok());
}

#[test]
fn export_removed_at_run_time_drains_and_releases_the_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 4 << 20);
    let ctl = dir.path().join("ctl.sock");
    let srv = our_server(&[("disk", &img)], &["--control", ctl.to_str().expect("p")]);
    let mut c = connect(&srv.socket, "disk");
    for i in 0..8u64 {
        let data = pattern(i, 65536);
        c.send(Command::Write, 0, i * 65536, 65536, Some(&data))
            .expect("send");
    }
    let ask = |line: &str| {
        let mut s = UnixStream::connect(&ctl).expect("control");
        writeln!(s, "{line}").expect("send");
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).expect("answer");
        answer
    };
    // The operator's client, as at a migration's cutover.
    let cli = |args: &[&str]| {
        Cmd::new(env!("CARGO_BIN_EXE_nbd-proxy"))
            .args(["control", "--socket", ctl.to_str().expect("p")])
            .args(args)
            .output()
            .expect("nbd-proxy control")
    };
    let out = cli(&["remove", "disk"]);
    assert!(out.status.success(), "{out:?}");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("removed disk"), "{answer}");
    // Everything sent before the removal was answered, then the connection closed.
    for _ in 0..8 {
        assert_eq!(c.recv().expect("reply before close").result, Ok(vec![]));
    }
    assert!(c.recv().is_err(), "connection closed after the drain");
    // The image is flushed and unlocked: a daemon could take it over now.
    nbd_proxy::server::Export::open("again", &img, false).expect("image lock released");
    assert_eq!(
        &std::fs::read(&img).expect("read")[..65536],
        &pattern(0, 65536)[..]
    );
    assert!(ask("list").trim_end() == "ok", "no exports left");
    let s = UnixStream::connect(&srv.socket).expect("connect");
    assert!(Negotiator::start(s).expect("greeting").go("disk").is_err());
    assert!(ask("add disk=/nonexistent").starts_with("error"));
    let out = cli(&["remove", "disk"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disk"),
        "{out:?}"
    );
    assert!(ask("frobnicate").starts_with("error unknown command"));
}

#[test]
fn tcp_listen_outside_loopback_needs_insecure_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let out = Cmd::new(env!("CARGO_BIN_EXE_nbd-proxy"))
        .args(["serve", "--listen", "tcp:0.0.0.0:0", "--export"])
        .arg(format!("disk={}", img.display()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-listen"), "{err}");
}

#[test]
fn unknown_options_get_err_unsup_and_the_session_goes_on() {
    use nbd_proxy::proto::{client_flags, opt, rep, OptionHeader, OptionReplyHeader};
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 1 << 20);
    let srv = our_server(&[("disk", &img)], &[]);
    let mut s = UnixStream::connect(&srv.socket).expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
        .expect("flags");
    for option in [99u32, opt::STRUCTURED_REPLY, opt::STARTTLS] {
        s.write_all(&OptionHeader { option, length: 0 }.encode())
            .expect("option");
        let mut h = [0u8; OptionReplyHeader::LEN];
        s.read_exact(&mut h).expect("reply");
        let r = OptionReplyHeader::decode(&h).expect("decode");
        assert_eq!((r.option, r.reply), (option, rep::ERR_UNSUP));
        let mut msg = vec![0u8; r.length as usize];
        s.read_exact(&mut msg).expect("message");
    }
    // Still negotiating: LIST works afterwards.
    let mut n = Negotiator::with_flags(
        s,
        nbd_proxy::client::AgreedFlags {
            fixed: true,
            no_zeroes: true,
        },
    );
    assert_eq!(n.list().expect("list"), vec!["disk".to_string()]);
}

#[test]
fn sigterm_answers_everything_in_flight_then_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "d.img", 16 << 20);
    let mut srv = our_server(&[("disk", &img)], &["--reorder-jitter", "50"]);
    let mut c = connect(&srv.socket, "disk");
    for i in 0..32u64 {
        let data = pattern(i, 65536);
        c.send(Command::Write, 0, i * 65536, 65536, Some(&data))
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(100));
    // kill(1) rather than libc::kill: no unsafe code in tests.
    let pid = srv.child.id().to_string();
    assert!(Cmd::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    for _ in 0..32 {
        assert_eq!(c.recv().expect("every write answered").result, Ok(vec![]));
    }
    let status = srv.child.wait().expect("exit");
    assert!(status.success(), "exit {status}");
    let bytes = std::fs::read(&img).expect("read");
    assert!(bytes[31 * 65536..32 * 65536] == pattern(31, 65536)[..]);
}
