//! The link against hostile and broken targets, over a socketpair. A thread plays queue 0,
//! the owner of connection 0 (`test_ring.rs`): it drives the connection on its own io_uring
//! (the same `RingConn` the queues use) and serves what is forwarded to it; the test is
//! submitter 1 and forwards to it, so the forwarding hop is covered too.

use super::*;
use crate::mirror::test_ring::{own_connections, RingOwner};
use nbd_proxy::proto::{tx_flags, BlockSize, SimpleReply, STRUCTURED_REPLY_MAGIC};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

struct Rig {
    mirror: Arc<Mirror>,
    server: UnixStream,
    mail: Arc<Mailboxes>,
    /// Calls of the mirror's `on_failure`.
    failures: Arc<AtomicU64>,
    _owner: RingOwner,
    _bells: Vec<UnixStream>,
}

fn export(flags: u16) -> Export {
    Export {
        name: "x".into(),
        size: 1 << 30,
        flags: tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | flags,
        block_size: BlockSize::from_array([1, 4096, 32 << 20]),
    }
}

fn rig(timeout: Option<Duration>) -> Rig {
    rig_with(timeout, tx_flags::SEND_FUA)
}

fn rig_with(timeout: Option<Duration>, flags: u16) -> Rig {
    let (ours, server) = UnixStream::pair().expect("pair");
    let bells: Vec<UnixStream> = (0..2)
        .flat_map(|_| {
            let (a, b) = UnixStream::pair().expect("pair");
            [a, b]
        })
        .collect();
    let mail = Arc::new(Mailboxes::new(vec![
        bells[0].as_raw_fd(),
        bells[2].as_raw_fd(),
    ]));
    let failures = Arc::new(AtomicU64::new(0));
    let counted = failures.clone();
    let mirror = Mirror::new(
        vec![("t".into(), OwnedFd::from(ours))],
        export(flags),
        timeout,
        mail.clone(),
        Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }),
    );
    mirror.set_active();
    let m = mirror.clone();
    let owner = own_connections(move || Some(m.clone()));
    Rig {
        mirror,
        server,
        mail,
        failures,
        _owner: owner,
        _bells: bells,
    }
}

fn write_op() -> MirrorOp {
    MirrorOp::Write {
        offset: 0,
        data: vec![7u8; 4096],
        fua: false,
    }
}

/// Submitter 1 forwards `op` for its tag 3 to connection 0.
fn forward(r: &Rig, op: MirrorOp) {
    r.mirror.forward(0, 1, 3, op);
}

/// Reads one request the mirror sent (28-byte header, and `data` payload bytes); returns its
/// header.
fn read_request(s: &mut UnixStream, data: usize) -> RequestHeader {
    let mut h = vec![0u8; 28 + data];
    s.read_exact(&mut h).expect("request");
    RequestHeader::decode(&h[..28]).expect("a request header")
}

fn outcome(r: &Rig, within: Duration) -> Outcome {
    let start = Instant::now();
    loop {
        let got = r.mail.take(1);
        if let Some(&(tag, o)) = got.first() {
            assert_eq!((got.len(), tag), (1, 3), "one outcome, for tag 3");
            return o;
        }
        assert!(start.elapsed() < within, "no outcome within {within:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_failed(r: &Rig, within: Duration) -> String {
    assert_eq!(
        outcome(r, within),
        Outcome::Failed,
        "the request comes back Failed"
    );
    assert!(r.mirror.failed());
    r.mirror.failure().expect("a reason").0
}

fn hostile(reply: &[u8]) -> String {
    let mut r = rig(Some(Duration::from_secs(5)));
    forward(&r, write_op());
    let _ = read_request(&mut r.server, 4096);
    r.server.write_all(reply).expect("reply");
    wait_failed(&r, Duration::from_secs(2))
}

#[test]
fn a_write_is_sent_whole_and_done_when_answered() {
    let mut r = rig(Some(Duration::from_secs(5)));
    forward(&r, write_op());
    let h = read_request(&mut r.server, 4096);
    assert_eq!((h.command, h.length, h.flags), (Command::Write, 4096, 0));
    let reply = SimpleReply {
        error: 0,
        cookie: h.cookie,
    };
    r.server.write_all(&reply.encode()).expect("reply");
    assert_eq!(outcome(&r, Duration::from_secs(2)), Outcome::Done);
    assert_eq!(r.mirror.in_flight(), 0);
    assert_eq!(r.mirror.ops.load(Ordering::SeqCst), 1);
}

#[test]
fn a_fua_write_to_a_target_without_fua_is_flushed_only_after_it_is_answered() {
    let mut r = rig_with(Some(Duration::from_secs(5)), 0);
    let op = MirrorOp::Write {
        offset: 0,
        data: vec![7u8; 4096],
        fua: true,
    };
    forward(&r, op);
    let w = read_request(&mut r.server, 4096);
    assert_eq!((w.command, w.flags), (Command::Write, 0));
    // Nothing more may come before the write is answered: a FLUSH sent alongside could be
    // served first, and the write would not be durable.
    r.server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(
        r.server.read(&mut b).is_err(),
        "a FLUSH came before the write's reply"
    );
    r.server.set_read_timeout(None).expect("timeout");
    let reply = |cookie| SimpleReply { error: 0, cookie }.encode();
    r.server.write_all(&reply(w.cookie)).expect("reply");
    let f = read_request(&mut r.server, 0);
    assert_eq!(f.command, Command::Flush);
    r.server.write_all(&reply(f.cookie)).expect("reply");
    assert_eq!(outcome(&r, Duration::from_secs(2)), Outcome::Done);
}

#[test]
fn garbage_structured_and_unknown_replies_fail_the_mirror() {
    let why = hostile(&[0xffu8; 16]);
    assert!(why.contains("bad reply"), "{why}");
    let mut structured = [0u8; 16];
    structured[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    let why = hostile(&structured);
    assert!(why.contains("bad reply"), "{why}");
    let unknown = SimpleReply {
        error: 0,
        cookie: 0xdead,
    }
    .encode();
    let why = hostile(&unknown);
    assert!(why.contains("unknown cookie"), "{why}");
}

#[test]
fn an_error_reply_fails_the_mirror_and_its_request() {
    let mut r = rig(Some(Duration::from_secs(5)));
    forward(&r, write_op());
    let cookie = read_request(&mut r.server, 4096).cookie;
    let reply = SimpleReply { error: 5, cookie }.encode();
    r.server.write_all(&reply).expect("reply");
    let why = wait_failed(&r, Duration::from_secs(2));
    assert!(why.contains("NBD error 5"), "{why}");
    // Later requests come back Failed at once.
    forward(&r, write_op());
    assert_eq!(outcome(&r, Duration::from_secs(2)), Outcome::Failed);
    assert_eq!(r.mirror.in_flight(), 0);
}

#[test]
fn on_failure_runs_once_after_a_failure_and_never_on_a_clean_stop() {
    let mut r = rig(Some(Duration::from_secs(5)));
    forward(&r, write_op());
    let cookie = read_request(&mut r.server, 4096).cookie;
    let reply = SimpleReply { error: 5, cookie }.encode();
    r.server.write_all(&reply).expect("reply");
    wait_failed(&r, Duration::from_secs(2));
    assert_eq!(r.failures.load(Ordering::SeqCst), 1, "on_failure ran");
    r.mirror.fail("and again".into());
    assert_eq!(r.failures.load(Ordering::SeqCst), 1, "run once");

    let mut r = rig(Some(Duration::from_secs(5)));
    r.mirror.stop(Duration::from_secs(1));
    let disc = read_request(&mut r.server, 0);
    assert_eq!(
        disc.command,
        Command::Disc,
        "a clean stop says NBD_CMD_DISC"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.mirror.state(), MirrorState::Stopping);
    assert_eq!(
        r.failures.load(Ordering::SeqCst),
        0,
        "a clean stop is no failure"
    );
}

#[test]
fn a_silent_target_is_dropped_at_the_timeout() {
    let mut r = rig(Some(Duration::from_millis(300)));
    let start = Instant::now();
    forward(&r, write_op());
    let _ = read_request(&mut r.server, 4096);
    let why = wait_failed(&r, Duration::from_secs(2));
    let took = start.elapsed();
    assert!(why.contains("mirror timeout"), "{why}");
    assert!(
        took < Duration::from_millis(300) + 3 * super::super::ring_conn::TICK,
        "gave up after {took:?}"
    );
}

#[test]
fn a_target_that_stops_reading_is_dropped_at_the_timeout_mid_send() {
    // 8 MiB the target never reads: the send blocks, the timeout fails the mirror, the
    // shutdown ends the send, and only then does the request come back (its buffer is free).
    let r = rig(Some(Duration::from_millis(300)));
    let op = MirrorOp::Write {
        offset: 0,
        data: vec![7u8; 8 << 20],
        fua: false,
    };
    forward(&r, op);
    let why = wait_failed(&r, Duration::from_secs(3));
    assert!(why.contains("mirror timeout"), "{why}");
}

#[test]
fn a_flood_of_bytes_is_refused_without_buffering_it() {
    let mut r = rig(Some(Duration::from_secs(5)));
    forward(&r, write_op());
    let _ = read_request(&mut r.server, 4096);
    let mut server = r.server.try_clone().expect("clone");
    // The mirror stops reading at the first bad reply; the flood's writes then fail.
    std::thread::spawn(move || {
        let junk = vec![0x5au8; 1 << 20];
        for _ in 0..64 {
            if server.write_all(&junk).is_err() {
                return;
            }
        }
    });
    let why = wait_failed(&r, Duration::from_secs(2));
    assert!(why.contains("bad reply"), "{why}");
}

#[test]
fn an_orphaned_connection_fails_what_is_forwarded_to_it_at_once() {
    // No owner thread here: queue 0 has stopped.
    let (ours, _server) = UnixStream::pair().expect("pair");
    let bells: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::pair().expect("pair").0)
        .collect();
    let mail = Arc::new(Mailboxes::new(
        bells.iter().map(|b| b.as_raw_fd()).collect(),
    ));
    let mirror = Mirror::new(
        vec![("t".into(), OwnedFd::from(ours))],
        export(tx_flags::SEND_FUA),
        None,
        mail.clone(),
        Box::new(|| {}),
    );
    mirror.set_active();
    mirror.forward(0, 1, 3, write_op());
    assert!(mail.take(1).is_empty(), "waits in the inbox for its owner");
    mirror.orphan(0);
    assert_eq!(
        mail.take(1),
        vec![(3, Outcome::Failed)],
        "drained when orphaned"
    );
    mirror.forward(0, 1, 4, write_op());
    assert_eq!(
        mail.take(1),
        vec![(4, Outcome::Failed)],
        "failed at once afterwards"
    );
    assert_eq!(mirror.in_flight(), 0);
}
