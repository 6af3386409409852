use super::*;
use nbd_proxy::proto::{BlockSize, STRUCTURED_REPLY_MAGIC};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

struct Rig {
    mirror: Arc<Mirror>,
    server: UnixStream,
    mail: Arc<Mailboxes>,
    /// Calls of the mirror's `on_failure`.
    failures: Arc<AtomicU64>,
    _bell: (UnixStream, UnixStream),
}

fn rig(timeout: Option<Duration>) -> Rig {
    let (ours, server) = UnixStream::pair().expect("pair");
    let bell = UnixStream::pair().expect("pair");
    let mail = Arc::new(Mailboxes::new(vec![bell.0.as_raw_fd()]));
    let export = Export {
        name: "x".into(),
        size: 1 << 30,
        flags: tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA,
        block_size: BlockSize::from_array([1, 4096, 32 << 20]),
    };
    let failures = Arc::new(AtomicU64::new(0));
    let counted = failures.clone();
    let mirror = Mirror::start(
        "t".into(),
        Stream::Unix(ours),
        export,
        timeout,
        mail.clone(),
        Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .expect("start");
    mirror.set_active();
    Rig {
        mirror,
        server,
        mail,
        failures,
        _bell: bell,
    }
}

fn write_op() -> MirrorOp {
    MirrorOp::Write {
        offset: 0,
        data: vec![7u8; 4096],
        fua: false,
    }
}

/// Reads the request the mirror sent (28-byte header + 4096 bytes) and returns its cookie.
fn read_request(s: &mut UnixStream) -> u64 {
    let mut h = [0u8; 28 + 4096];
    s.read_exact(&mut h).expect("request");
    u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"))
}

fn wait_failed(r: &Rig, within: Duration) -> String {
    let start = Instant::now();
    while !r.mirror.failed() {
        assert!(
            start.elapsed() < within,
            "mirror did not fail within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    loop {
        let got = r.mail.take(0);
        if !got.is_empty() {
            assert_eq!(
                got,
                vec![(3, Outcome::Failed)],
                "the request comes back Failed"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no outcome delivered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    r.mirror.failure().expect("a reason").0
}

fn hostile(reply: &[u8]) -> String {
    let mut r = rig(Some(Duration::from_secs(5)));
    r.mirror.submit(0, 3, write_op());
    let _cookie = read_request(&mut r.server);
    r.server.write_all(reply).expect("reply");
    wait_failed(&r, Duration::from_secs(2))
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
    r.mirror.submit(0, 3, write_op());
    let cookie = read_request(&mut r.server);
    let reply = SimpleReply { error: 5, cookie }.encode();
    r.server.write_all(&reply).expect("reply");
    let why = wait_failed(&r, Duration::from_secs(2));
    assert!(why.contains("NBD error 5"), "{why}");
}

#[test]
fn on_failure_runs_once_after_a_failure_and_never_on_a_clean_stop() {
    let mut r = rig(Some(Duration::from_secs(5)));
    r.mirror.submit(0, 3, write_op());
    let cookie = read_request(&mut r.server);
    let reply = SimpleReply { error: 5, cookie }.encode();
    r.server.write_all(&reply).expect("reply");
    wait_failed(&r, Duration::from_secs(2));
    let start = Instant::now();
    while r.failures.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "on_failure not run"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    r.mirror.fail("and again".into());
    assert_eq!(r.failures.load(Ordering::SeqCst), 1, "run once");

    let r = rig(Some(Duration::from_secs(5)));
    r.mirror.stop(Duration::from_secs(1));
    drop(r.server); // the target hangs up after NBD_CMD_DISC
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
    r.mirror.submit(0, 3, write_op());
    let _ = read_request(&mut r.server);
    let why = wait_failed(&r, Duration::from_secs(2));
    let took = start.elapsed();
    assert!(why.contains("mirror timeout"), "{why}");
    assert!(
        took < Duration::from_millis(300 + 400),
        "gave up after {took:?}"
    );
}

#[test]
fn a_flood_of_bytes_is_refused_without_buffering_it() {
    let mut r = rig(Some(Duration::from_secs(5)));
    r.mirror.submit(0, 3, write_op());
    let _ = read_request(&mut r.server);
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
    r.server = UnixStream::pair().expect("pair").0;
}
