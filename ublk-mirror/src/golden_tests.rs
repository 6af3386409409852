//! Golden tests of the daemon's formats, so that moving code around cannot change them: the
//! control protocol's reply keys (every command, with and without a mirror), the state file
//! and the bitmap file's header. The files under `tests/golden/` were generated from the code
//! before the restructuring (issue 14) and are never edited to make a test pass: a difference
//! is a change of the wire or file format. `UBLK_MIRROR_BLESS=1` rewrites them (only for a
//! deliberate format change, reviewed as such).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ctl::dispatch::handle_line;
use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares `got` with the golden file `name` (or rewrites it under `UBLK_MIRROR_BLESS=1`).
fn check_golden(name: &str, got: &str) {
    let path = golden_path(name);
    if std::env::var_os("UBLK_MIRROR_BLESS").is_some() {
        std::fs::write(&path, got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UBLK_MIRROR_BLESS=1 creates it)", path.display()));
    if want != got {
        let want_lines: BTreeSet<&str> = want.lines().collect();
        let got_lines: BTreeSet<&str> = got.lines().collect();
        let missing: Vec<_> = want_lines.difference(&got_lines).collect();
        let extra: Vec<_> = got_lines.difference(&want_lines).collect();
        panic!(
            "{} differs from today's output: a format changed.\nmissing: {missing:#?}\nextra: \
             {extra:#?}\nfull output:\n{got}",
            path.display()
        );
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key path under `v` with the kind of its value; array elements are `[]`.
fn key_paths(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    out.insert(format!("{prefix}: {}", kind(v)));
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                key_paths(&format!("{prefix}.{k}"), x, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                key_paths(&format!("{prefix}[]"), x, out);
            }
        }
        _ => {}
    }
}

/// A stand-in NBD target on a socketpair: answers every request with success (a simple reply)
/// until NBD_CMD_DISC or EOF. Returns our end, to be stored as a negotiated fd.
fn fake_target() -> (OwnedFd, std::thread::JoinHandle<()>) {
    let (ours, mut theirs) = UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || loop {
        let mut h = [0u8; 28];
        if theirs.read_exact(&mut h).is_err() {
            return;
        }
        let ty = u16::from_be_bytes([h[6], h[7]]);
        let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
        if ty == 2 {
            return; // NBD_CMD_DISC
        }
        if ty == 1 {
            let mut data = vec![0u8; len as usize];
            if theirs.read_exact(&mut data).is_err() {
                return;
            }
        }
        let mut r = [0u8; 16];
        r[0..4].copy_from_slice(&nbd_proxy::proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[8..16].copy_from_slice(&h[8..16]);
        if theirs.write_all(&r).is_err() {
            return;
        }
    });
    (OwnedFd::from(ours), server)
}

struct Driver {
    daemon: Arc<Daemon>,
    info: DeviceInfo,
    lines: BTreeSet<String>,
    id: u64,
}

impl Driver {
    /// Sends one request through the real handler and records the reply's key paths under
    /// `label`; returns the reply's result (or error) as JSON.
    fn call(&mut self, label: &str, cmd: &str, args: Value, fd: Option<OwnedFd>) -> Value {
        self.id += 1;
        let mut req = serde_json::json!({ "v": 1, "id": self.id, "cmd": cmd });
        if !args.is_null() {
            req["args"] = args;
        }
        let line = serde_json::to_vec(&req).expect("json");
        let reply = handle_line(&line, fd, false, &self.daemon, &self.info);
        let v = serde_json::to_value(&reply).expect("reply json");
        let expect_ok = !label.starts_with("error(");
        assert_eq!(v["ok"], expect_ok, "{label}: {v}");
        let mut paths = BTreeSet::new();
        key_paths(label, &v, &mut paths);
        self.lines.extend(paths);
        v
    }
}

fn negotiated(size: u64) -> Value {
    use nbd_proxy::proto::tx_flags;
    serde_json::json!({
        "export": "golden",
        "size": size,
        "flags": tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA
            | tx_flags::SEND_WRITE_ZEROES,
        "block_size": [1, 4096, 32 << 20],
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The commands of a device without a mirror, from `info` to `unpause --mirror null`.
fn no_mirror_commands(d: &mut Driver) {
    let none = Value::Null;
    d.call("info", "info", none.clone(), None);
    d.call("stats(no-mirror)", "stats", none.clone(), None);
    d.call("error(unknown-command)", "frob", none.clone(), None);
    d.call(
        "error(mirror-wait-ready-no-copy)",
        "mirror-wait-ready",
        serde_json::json!({}),
        None,
    );
    d.call("mirror-stop(none)", "mirror-stop", none.clone(), None);
    d.call(
        "error(mirror-set-speed-no-copy)",
        "mirror-set-speed",
        serde_json::json!({"speed": 1}),
        None,
    );
    // The snapshot only: the events that follow are lines of their own (ctl/watch.rs).
    d.call("watch", "watch", none.clone(), None);
    d.daemon.io.dirty.mark(64 << 10, 4096);
    d.call("dirty-map(marked)", "dirty-map", none.clone(), None);
    d.call(
        "wait-idle",
        "wait-idle",
        serde_json::json!({"timeout": 1}),
        None,
    );
    d.call("pause", "pause", serde_json::json!({}), None);
    d.call("info(paused)", "info", none.clone(), None);
    d.call("unpause", "unpause", serde_json::json!({}), None);
    d.call(
        "unpause(mirror-null)",
        "unpause",
        serde_json::json!({"mirror": "null"}),
        None,
    );
}

/// Stored fds, a mirror with a full copy, and a mirror that fails.
fn fd_and_mirror_commands(d: &mut Driver) {
    let none = Value::Null;
    // Stored fds: one plain, one negotiated.
    let (plain, _peer) = UnixStream::pair().expect("pair");
    let args = serde_json::json!({"name": "plain"});
    d.call("pass-fd", "pass-fd", args, Some(OwnedFd::from(plain)));
    let (fd, target) = fake_target();
    let args = serde_json::json!({"name": "dest", "nbd": negotiated(1 << 20)});
    d.call("pass-fd(negotiated)", "pass-fd", args, Some(fd));
    d.call("list-fds", "list-fds", none.clone(), None);
    let args = serde_json::json!({"name": "plain"});
    d.call("close-fd", "close-fd", args, None);
    let args = serde_json::json!({"name": "plain"});
    d.call("error(close-fd-missing)", "close-fd", args, None);

    // A mirror with a full copy, once the copy is done.
    let args = serde_json::json!({"name": "dest", "copy": true, "timeout": 10});
    let started = d.call("mirror-start", "mirror-start", args, None);
    assert_eq!(started["ok"], true, "{started}");
    let args = serde_json::json!({"timeout": 20});
    let ready = d.call("mirror-wait-ready", "mirror-wait-ready", args, None);
    assert_eq!(ready["ok"], true, "{ready}");
    d.call("stats(mirror-copy-ready)", "stats", none.clone(), None);
    d.call("mirror-stop", "mirror-stop", none.clone(), None);
    target.join().expect("target");
    d.call("stats(after-stop)", "stats", none.clone(), None);

    // A mirror that fails: its target goes away.
    let (fd, target) = {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        (OwnedFd::from(ours), theirs)
    };
    let args = serde_json::json!({"name": "dying", "nbd": negotiated(1 << 20)});
    d.call("pass-fd(negotiated)", "pass-fd", args, Some(fd));
    let args = serde_json::json!({"name": "dying", "timeout": 10});
    let started = d.call("mirror-start(no-copy)", "mirror-start", args, None);
    assert_eq!(started["ok"], true, "{started}");
    d.call("stats(mirror-no-copy)", "stats", none.clone(), None);
    drop(target);
    wait_until("the mirror did not fail when its target went away", || {
        d.daemon.mirror_failed()
    });
    d.call("stats(mirror-failed)", "stats", none.clone(), None);
    d.call("mirror-stop(failed)", "mirror-stop", none.clone(), None);
}

/// Every command of the control protocol, in the states whose replies differ in shape: no
/// mirror, a failure inherited from a previous daemon, a mirror with a finished copy, a failed
/// mirror, and after mirror-stop; plus error replies.
#[test]
fn control_reply_keys_match_the_golden_file() {
    let (_img, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
    // No ublk device here, so no queue threads: this plays queue 0's ring for the mirror.
    let io = daemon.io.clone();
    let _queue0 = crate::mirror::test_ring::own_connections(move || io.mirror());
    let mut d = Driver {
        daemon: daemon.clone(),
        info: crate::ctl::tests::test_info(),
        lines: BTreeSet::new(),
        id: 0,
    };
    no_mirror_commands(&mut d);
    fd_and_mirror_commands(&mut d);
    let none = Value::Null;

    // A failure inherited from a previous daemon (after recover).
    daemon.mirroring.inherit_failure("golden".into());
    d.call("stats(inherited-failure)", "stats", none.clone(), None);
    d.call("shutdown", "shutdown", serde_json::json!({}), None);
    d.call(
        "shutdown(keep)",
        "shutdown",
        serde_json::json!({"keep": true}),
        None,
    );

    let mut text = String::new();
    for l in &d.lines {
        text.push_str(l);
        text.push('\n');
    }
    check_golden("control-reply-keys.txt", &text);
}

/// The state file exactly as the writer produces it for a fixed record.
#[test]
fn the_state_file_matches_the_golden_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("3.state");
    let rec = crate::device::state::DaemonState {
        version: crate::device::state::DaemonState::CURRENT_VERSION,
        dev_id: 3,
        pid: 42,
        image: "/images/disk.img".into(),
        direct: crate::device::image::DirectMode::Auto,
        queues: 2,
        depth: 128,
        max_io: 512 << 10,
        label: "vm1-xvda".into(),
        control: Some("/run/ublk-mirror/3.sock".into()),
        bitmap: Some("/var/lib/ublk-mirror/disk.bitmap".into()),
        granularity: 65536,
        al_extents: None,
        mirror: Some(crate::device::state::MirrorRecord {
            target: "dest".into(),
            targets: Vec::new(),
            export: "disk".into(),
        }),
        detached: true,
        tapdisk_dir: Some("/run/blktap-control".into()),
    };
    rec.save(&p).expect("save");
    let text = std::fs::read_to_string(&p).expect("read");
    check_golden("state-file.json", &text);
    let mut bare = rec;
    (bare.control, bare.bitmap, bare.mirror, bare.detached) = (None, None, None, false);
    bare.tapdisk_dir = None;
    bare.direct = crate::device::image::DirectMode::Off;
    bare.save(&p).expect("save");
    let text = std::fs::read_to_string(&p).expect("read");
    check_golden("state-file-bare.json", &text);
}

/// The bitmap file's header (magic, version, granularity, device size, image device and inode
/// (masked: they depend on the machine), generation), its length and where the bits go, for a
/// fixed small map, after a second open (generation 2).
#[test]
fn the_bitmap_header_matches_the_golden_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, [0u8; 4096]).expect("image");
    let bm = dir.path().join("disk.bitmap");
    let size = 8 << 20;
    let m = crate::mirror::dirty::DirtyMap::open_file(&bm, &img, size, 64 << 10).expect("create");
    m.mark(0, 4096); // granule 0
    m.mark(5 << 20, 64 << 10); // granule 80
    m.flush().expect("flush");
    drop(m);
    let m = crate::mirror::dirty::DirtyMap::open_file(&bm, &img, size, 64 << 10).expect("reopen");
    m.flush().expect("flush");
    drop(m);
    let mut bytes = std::fs::read(&bm).expect("read");
    bytes[32..48].fill(0xee); // image device and inode
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut text = String::new();
    text.push_str(&format!("file length: {}\n", bytes.len()));
    for (at, what) in [
        (0, "magic"),
        (8, "version+pad"),
        (16, "granularity"),
        (24, "device size"),
        (32, "image device (masked)"),
        (40, "image inode (masked)"),
        (48, "generation"),
    ] {
        text.push_str(&format!("{at:>4} {what}: {}\n", hex(&bytes[at..at + 8])));
    }
    let rest_zero = bytes[56..4096].iter().all(|&b| b == 0);
    text.push_str(&format!("56..4096 all zero: {rest_zero}\n"));
    // The bits: the first words after the header page, and every nonzero word after them.
    for (i, w) in bytes[4096..].chunks(8).enumerate() {
        if w.iter().any(|&b| b != 0) {
            text.push_str(&format!("word at {}: {}\n", 4096 + i * 8, hex(w)));
        }
    }
    check_golden("bitmap-header.txt", &text);
}
