//! The control server against a temp-file device: framing, fds, errors and timeouts.
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use control::protocol::{code, Reply, MAX_FDS, MAX_LINE};

use crate::ctl::socket::serve_client;
use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;
use control::fdpass::send_with_fd;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;

/// A control connection served by the real handler, with the device side replaced by a
/// Daemon on a temp file (no ublk needed).
fn session() -> (
    tempfile::NamedTempFile,
    Arc<Daemon>,
    UnixStream,
    BufReader<UnixStream>,
) {
    let (f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let (s2, info) = (daemon.clone(), test_info());
    std::thread::spawn(move || serve_client(theirs, &s2, &info));
    let reader = BufReader::new(ours.try_clone().expect("clone"));
    (f, daemon, ours, reader)
}

/// What the handler is told of the (absent) device.
pub(crate) fn test_info() -> DeviceInfo {
    DeviceInfo {
        dev_id: 0,
        bdev: "/dev/ublkb0".into(),
        queues: 1,
        depth: 1,
        max_io_bytes: 4096,
    }
}

fn reply(r: &mut BufReader<UnixStream>) -> Reply {
    let mut line = String::new();
    r.read_line(&mut line).expect("reply");
    serde_json::from_str(line.trim_end()).expect("reply json")
}

fn code_of(r: &Reply) -> &str {
    r.error.as_ref().map(|e| e.code.as_str()).unwrap_or("ok")
}

#[test]
fn errors_are_replies_and_the_connection_survives() {
    let (_f, _s, mut c, mut r) = session();
    c.write_all(b"garbage\n").expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_REQUEST);
    c.write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"frob\"}\n")
        .expect("send");
    let rep = reply(&mut r);
    assert_eq!((code_of(&rep), rep.id), (code::UNKNOWN_COMMAND, 3));
    c.write_all(b"{\"v\":2,\"id\":4,\"cmd\":\"stats\"}\n")
        .expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_VERSION);
    c.write_all(&vec![b'x'; MAX_LINE + 10]).expect("send");
    c.write_all(b"\n").expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_REQUEST, "oversized line");
    // The same line split across reads, with the newline in the last part.
    c.write_all(&vec![b'y'; 40_000]).expect("send");
    std::thread::sleep(std::time::Duration::from_millis(50));
    c.write_all(&vec![b'y'; 30_000]).expect("send");
    c.write_all(b"\n").expect("send");
    let rep = reply(&mut r);
    assert!(
        rep.error
            .as_ref()
            .is_some_and(|e| e.message.contains("line longer")),
        "split oversized line: {rep:?}"
    );
    c.write_all(b"{\"v\":1,\"id\":9,\"cmd\":\"stats\"}\n")
        .expect("send");
    let rep = reply(&mut r);
    assert!(
        rep.ok && rep.id == 9,
        "still serving after the errors: {rep:?}"
    );
    let v = rep.result.expect("stats");
    assert_eq!(v["reqs_outstanding"], 0);
    assert_eq!(v["nbd_mirror_failed"], 0);
}

#[test]
fn fds_bind_to_their_line_and_bad_ones_are_closed() {
    let (_f, daemon, c, mut r) = session();
    let (sock, _peer) = UnixStream::pair().expect("pair");
    let file = std::fs::File::open("/dev/null").expect("file");
    // An fd on the wrong command.
    send_with_fd(&c, b"{\"v\":1,\"id\":1,\"cmd\":\"stats\"}\n", sock.as_fd()).expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
    // Not a socket.
    send_with_fd(
        &c,
        b"{\"v\":1,\"id\":2,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"f\"}}\n",
        file.as_fd(),
    )
    .expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
    // pass-fd without an fd.
    (&c).write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"f\"}}\n")
        .expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
    // A good one, then its replacement.
    let line = b"{\"v\":1,\"id\":4,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"m\"}}\n";
    send_with_fd(&c, line, sock.as_fd()).expect("send");
    let rep = reply(&mut r);
    assert!(rep.ok, "{rep:?}");
    send_with_fd(&c, line, sock.as_fd()).expect("send");
    assert_eq!(reply(&mut r).result.expect("ok")["replaced"], true);
    assert_eq!(daemon.fds.lock().len(), 1);
    (&c).write_all(b"{\"v\":1,\"id\":5,\"cmd\":\"list-fds\"}\n")
        .expect("send");
    let fds = reply(&mut r).result.expect("list");
    assert_eq!(fds["fds"][0]["name"], "m");
    assert_eq!(fds["fds"][0]["family"], "unix");
    (&c).write_all(b"{\"v\":1,\"id\":6,\"cmd\":\"close-fd\",\"args\":{\"name\":\"m\"}}\n")
        .expect("send");
    assert!(reply(&mut r).ok);
    assert!(daemon.fds.lock().is_empty());
}

#[test]
fn two_fds_in_one_message_are_rejected() {
    let (_f, daemon, c, mut r) = session();
    let (a, _pa) = UnixStream::pair().expect("pair");
    let (b, _pb) = UnixStream::pair().expect("pair");
    let line = b"{\"v\":1,\"id\":7,\"cmd\":\"pass-fd\",\"args\":{\"name\":\"two\"}}\n";
    control::fdpass::send_with_fds(&c, line, &[a.as_fd(), b.as_fd()]).expect("send");
    assert_eq!(code_of(&reply(&mut r)), code::BAD_FD);
    assert!(
        daemon.fds.lock().is_empty(),
        "nothing stored from a message with two fds"
    );
}

/// `pause` and `wait-idle` with `timeout: 0` wait as long as it takes (as `mirror-start`'s
/// 0 does); they do not fail at once.
#[test]
fn a_zero_timeout_is_no_limit() {
    let (_f, daemon, mut c, mut r) = session();
    let mut busy = daemon.io.stats.queue(0).try_start(|| false); // one request being served
    for (id, cmd) in [(1, "wait-idle"), (2, "pause")] {
        let line =
            format!("{{\"v\":1,\"id\":{id},\"cmd\":\"{cmd}\",\"args\":{{\"timeout\":0}}}}\n");
        c.write_all(line.as_bytes()).expect("send");
        r.get_ref()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut early = String::new();
        assert!(
            r.read_line(&mut early).is_err(),
            "{cmd} with timeout 0 answered while a request was outstanding: {early}"
        );
        r.get_ref().set_read_timeout(None).expect("timeout");
        drop(busy.take()); // completed
        let rep = reply(&mut r);
        assert!(rep.ok && rep.id == id, "{cmd}: {rep:?}");
        busy = daemon.io.stats.queue(0).try_start(|| false);
    }
    assert_eq!(
        daemon.device.state(),
        crate::device::lifecycle::DeviceState::Paused
    );
    drop(busy);
    // Out of range is refused, with the rule.
    c.write_all(b"{\"v\":1,\"id\":3,\"cmd\":\"wait-idle\",\"args\":{\"timeout\":-1}}\n")
        .expect("send");
    let rep = reply(&mut r);
    assert_eq!(code_of(&rep), code::BAD_REQUEST);
    assert!(rep
        .error
        .is_some_and(|e| e.message.contains("0 (no limit)")));
}

#[test]
fn wait_ready_is_served_as_mirror_wait_ready() {
    let (_f, _s, mut c, mut r) = session();
    for (id, cmd) in [(1, "mirror-wait-ready"), (2, "wait-ready")] {
        let line = format!("{{\"v\":1,\"id\":{id},\"cmd\":\"{cmd}\",\"args\":{{}}}}\n");
        c.write_all(line.as_bytes()).expect("send");
        let rep = reply(&mut r);
        // Known, and answered: no copy is running.
        assert_eq!(
            (code_of(&rep), rep.id),
            (code::BAD_STATE, id),
            "{cmd}: {rep:?}"
        );
    }
}

#[test]
fn at_most_sixteen_fds() {
    let (_f, _s, c, mut r) = session();
    let (sock, _peer) = UnixStream::pair().expect("pair");
    for i in 0..=MAX_FDS {
        let line =
            format!("{{\"v\":1,\"id\":{i},\"cmd\":\"pass-fd\",\"args\":{{\"name\":\"n{i}\"}}}}\n");
        send_with_fd(&c, line.as_bytes(), sock.as_fd()).expect("send");
        let rep = reply(&mut r);
        if i < MAX_FDS {
            assert!(rep.ok, "{rep:?}");
        } else {
            assert_eq!(code_of(&rep), code::TOO_MANY_FDS);
        }
    }
}

/// Sends `line` and returns its reply.
fn call(c: &mut UnixStream, r: &mut BufReader<UnixStream>, line: &str) -> Reply {
    c.write_all(line.as_bytes()).expect("send");
    c.write_all(b"\n").expect("send");
    reply(r)
}

fn state_of(c: &mut UnixStream, r: &mut BufReader<UnixStream>) -> String {
    let rep = call(c, r, r#"{"v":1,"id":90,"cmd":"info"}"#);
    rep.result
        .unwrap_or_else(|| panic!("info: {:?}", rep.error))["state"]
        .as_str()
        .expect("state")
        .to_owned()
}

/// A paused session holding the fd `name`, whose peer is returned. The name is as xapi gives
/// it (`/` and longer than 64 bytes).
fn paused_with_fd(
    name: &str,
    nbd: &str,
) -> (
    tempfile::NamedTempFile,
    Arc<Daemon>,
    UnixStream,
    BufReader<UnixStream>,
    UnixStream,
) {
    let (f, daemon, mut c, mut r) = session();
    let rep = call(&mut c, &mut r, r#"{"v":1,"id":1,"cmd":"pause","args":{}}"#);
    assert!(rep.ok, "{rep:?}");
    let (sock, peer) = UnixStream::pair().expect("pair");
    let line =
        format!("{{\"v\":1,\"id\":2,\"cmd\":\"pass-fd\",\"args\":{{\"name\":{name:?}{nbd}}}}}\n");
    send_with_fd(&c, line.as_bytes(), sock.as_fd()).expect("send");
    let rep = reply(&mut r);
    assert!(rep.ok, "{rep:?}");
    (f, daemon, c, r, peer)
}

const XAPI_NAME: &str =
    "mirror_vbd/0e5e4b0c-2a4e-4d5e-9d3f-2b6a3c1d9e01/7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f";

/// tapdisk's rule: a secondary that cannot be opened does not hold the guest. The disk
/// resumes, `nbd_mirror_failed` reads 1 with the reason, and `-2 null` clears it.
#[test]
fn unpause_with_an_unreachable_mirror_resumes_and_reports_it_failed() {
    let (_f, daemon, mut c, mut r, mut peer) = paused_with_fd(XAPI_NAME, "");
    peer.write_all(b"this is not an NBD server\n")
        .expect("garbage");
    let line = format!(r#"{{"v":1,"id":3,"cmd":"unpause","args":{{"mirror":{XAPI_NAME:?}}}}}"#);
    let rep = call(&mut c, &mut r, &line);
    let res = rep.result.expect("unpause answers ok");
    assert_eq!(res["state"], "running");
    assert_eq!(res["nbd_mirror_failed"], 1);
    assert!(
        res["mirror_error"]
            .as_str()
            .is_some_and(|e| e.contains("handshake")),
        "{res}"
    );
    let stats = call(&mut c, &mut r, r#"{"v":1,"id":4,"cmd":"stats"}"#)
        .result
        .expect("stats");
    assert_eq!(stats["nbd_mirror_failed"], 1);
    assert_eq!(stats["mirror"]["state"], "failed");
    assert!(stats["mirror"]["last_error"].is_string(), "{stats}");
    assert!(daemon.mirror_record().is_some(), "recorded for a successor");
    let rep = call(
        &mut c,
        &mut r,
        r#"{"v":1,"id":5,"cmd":"unpause","args":{"mirror":"null"}}"#,
    );
    assert_eq!(rep.result.expect("null")["nbd_mirror_failed"], 0);
    assert!(daemon.mirror_record().is_none());
}

/// An unknown name, or an export too small for the device, fails the unpause: the disk stays
/// paused and a later plain unpause still works.
#[test]
fn unpause_with_an_unknown_or_unfit_mirror_stays_paused() {
    // Negotiated already (no handshake), with an export of 4 KiB for a 1 MiB device.
    let small = r#","nbd":{"export":"e","size":4096,"flags":1,"block_size":[1,4096,33554432]}"#;
    let (_f, daemon, mut c, mut r, _peer) = paused_with_fd("small", small);
    let rep = call(
        &mut c,
        &mut r,
        r#"{"v":1,"id":3,"cmd":"unpause","args":{"mirror":"nope"}}"#,
    );
    assert_eq!(code_of(&rep), code::NO_SUCH_FD, "{rep:?}");
    assert_eq!(state_of(&mut c, &mut r), "paused");
    let rep = call(
        &mut c,
        &mut r,
        r#"{"v":1,"id":4,"cmd":"unpause","args":{"mirror":"small"}}"#,
    );
    assert_eq!(code_of(&rep), code::MIRROR_REFUSED, "{rep:?}");
    assert!(rep
        .error
        .is_some_and(|e| e.message.contains("smaller") && e.message.contains("stays paused")),);
    assert_eq!(state_of(&mut c, &mut r), "paused");
    assert!(!daemon.mirror_failed());
    let rep = call(
        &mut c,
        &mut r,
        r#"{"v":1,"id":5,"cmd":"unpause","args":{}}"#,
    );
    assert_eq!(rep.result.expect("plain unpause")["state"], "running");
}

/// A reopen that fails after the target attached gives the connection back, negotiated, so
/// the same unpause can be retried.
#[test]
fn a_failed_reopen_gives_the_attached_connection_back() {
    let fits = r#","nbd":{"export":"e","size":1048576,"flags":5,"block_size":[1,4096,33554432]}"#;
    let (_f, daemon, mut c, mut r, _peer) = paused_with_fd("m", fits);
    let rep = call(
        &mut c,
        &mut r,
        r#"{"v":1,"id":3,"cmd":"unpause","args":{"image":"/nonexistent/x.img","mirror":"m"}}"#,
    );
    assert!(
        rep.error
            .as_ref()
            .is_some_and(|e| e.message.contains("/nonexistent/x.img")),
        "{rep:?}"
    );
    assert_eq!(state_of(&mut c, &mut r), "paused");
    let fds = daemon.fds.lock();
    assert!(
        fds.get("m")
            .is_some_and(|f| f.nbd.as_ref().is_some_and(|n| n.size == 1 << 20)),
        "the connection is back, negotiated"
    );
}

/// `watch`: the reply is the snapshot (seq 0); then one line per event, numbered, as the
/// accept loop serves a watcher; a closed watcher frees its place.
#[test]
fn watch_pushes_a_snapshot_then_numbered_events() {
    let (_f, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
    let (mut c, theirs) = UnixStream::pair().expect("pair");
    let (d2, info) = (daemon.clone(), test_info());
    let served = std::thread::spawn(move || {
        if let Some((conn, sub)) = serve_client(theirs, &d2, &info) {
            crate::ctl::watch::serve(conn, &d2, sub);
        }
    });
    let mut r = BufReader::new(c.try_clone().expect("clone"));
    let rep = call(&mut c, &mut r, r#"{"v":1,"id":1,"cmd":"watch"}"#);
    let snap = rep.result.expect("snapshot");
    assert_eq!(
        (
            &snap["event"],
            &snap["seq"],
            &snap["state"],
            &snap["mirror"]
        ),
        (
            &serde_json::json!("snapshot"),
            &serde_json::json!(0),
            &serde_json::json!("running"),
            &serde_json::json!("off")
        )
    );
    daemon.device.pause(Duration::from_secs(5)).expect("pause");
    daemon.unpause(None).expect("unpause");
    daemon
        .mirroring
        .fail_unlinked("the target went away".into());
    let mut events = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        r.read_line(&mut line).expect("event");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        events.push((v["seq"].as_u64(), v["event"].as_str().map(str::to_owned)));
        if v["event"] == "mirror-failed" {
            assert_eq!(v["reason"], "the target went away");
        }
    }
    let want: Vec<_> = [(1, "paused"), (2, "unpaused"), (3, "mirror-failed")]
        .iter()
        .map(|(s, e)| (Some(*s), Some((*e).to_owned())))
        .collect();
    assert_eq!(events, want);
    drop((c, r));
    served.join().expect("watcher ends when the client closes");
    let subs: Vec<_> = (0..crate::events::MAX_WATCHERS)
        .map(|_| daemon.events.subscribe())
        .collect();
    assert!(
        subs.iter().all(Option::is_some),
        "the closed watcher freed its place"
    );
}
