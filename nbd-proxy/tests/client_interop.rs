//! Our NBD client against real servers: qemu-nbd and nbdkit (memory, file, error filter).

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;

use common::*;
use nbd_proxy::client::{ClientError, Connection, Negotiator};
use nbd_proxy::proto::{cmd_flags, errno, tx_flags, Command};

const CHUNK: u32 = 64 << 10;

/// Pipelined writes (some FUA), flush, pipelined reads checked, trim and write-zeroes read
/// back as zeros where the server says they will.
fn exercise(c: &mut Connection<UnixStream>) {
    let e = c.export().clone();
    assert!(e.size >= 16 << 20, "export too small: {}", e.size);
    let n = 64u64;
    let mut sent = HashMap::new();
    for i in 0..n {
        let data = pattern(i, CHUNK as usize);
        let flags = if i % 8 == 0 && e.has(tx_flags::SEND_FUA) {
            cmd_flags::FUA
        } else {
            0
        };
        let cookie = c
            .send(
                Command::Write,
                flags,
                i * u64::from(CHUNK),
                CHUNK,
                Some(&data),
            )
            .expect("send write");
        sent.insert(cookie, i);
    }
    assert_eq!(c.in_flight(), n as usize, "writes are pipelined");
    for _ in 0..n {
        let done = c.recv().expect("write reply");
        assert!(
            sent.remove(&done.cookie).is_some(),
            "reply for a cookie we sent"
        );
        assert_eq!(done.result, Ok(vec![]));
    }
    assert_eq!(
        c.call(Command::Flush, 0, 0, 0, None).expect("flush"),
        Ok(vec![])
    );

    let mut reads = HashMap::new();
    for i in 0..n {
        let cookie = c
            .send(Command::Read, 0, i * u64::from(CHUNK), CHUNK, None)
            .expect("send read");
        reads.insert(cookie, i);
    }
    for _ in 0..n {
        let done = c.recv().expect("read reply");
        let i = reads.remove(&done.cookie).expect("known cookie");
        assert_eq!(done.result, Ok(pattern(i, CHUNK as usize)), "chunk {i}");
    }

    let zeros = vec![0u8; CHUNK as usize];
    if e.has(tx_flags::SEND_WRITE_ZEROES) {
        let r = c.call(Command::WriteZeroes, 0, u64::from(CHUNK), CHUNK, None);
        assert_eq!(r.expect("write zeroes"), Ok(vec![]));
        let back = c.call(Command::Read, 0, u64::from(CHUNK), CHUNK, None);
        assert_eq!(
            back.expect("read"),
            Ok(zeros.clone()),
            "write-zeroes reads back zeros"
        );
    }
    if e.has(tx_flags::SEND_TRIM) {
        let r = c.call(Command::Trim, 0, 2 * u64::from(CHUNK), CHUNK, None);
        assert_eq!(r.expect("trim"), Ok(vec![]));
    }
    // A request beyond the end is refused before anything is sent.
    assert!(matches!(
        c.send(Command::Read, 0, e.size, 512, None),
        Err(ClientError::BadRequest(_))
    ));
}

#[test]
fn against_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 32 << 20);
    let peer = spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-t",
            "-x",
            "disk",
            "--discard=unmap",
            "-k",
            "{sock}",
            img.to_str().expect("path"),
        ],
    );
    let mut c = connect(&peer.socket, "disk");
    assert_eq!(c.export().size, 32 << 20);
    exercise(&mut c);
    c.disconnect().expect("disc");
    // What the server stored is what we wrote.
    let bytes = std::fs::read(&img).expect("read image");
    assert_eq!(&bytes[..CHUNK as usize], &pattern(0, CHUNK as usize)[..]);
    assert!(bytes[CHUNK as usize..2 * CHUNK as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &bytes[3 * CHUNK as usize..4 * CHUNK as usize],
        &pattern(3, CHUNK as usize)[..]
    );
}

#[test]
fn against_nbdkit_memory() {
    let peer = spawn("nbdkit", &["-f", "-U", "{sock}", "memory", "64M"]);
    let mut c = connect(&peer.socket, "");
    exercise(&mut c);
}

/// The oldstyle handshake, as tapdisk's `nbdserver<pid>.<minor>` speaks it: nbdkit `-o`.
/// Writes and reads only: nbdkit 1.32's oldstyle mode advertises FLUSH and FUA (flags
/// 0xd6d) yet answers both with EINVAL ("flush operation not supported", "FUA flag not
/// supported"; qemu-io gets the same), a server the daemon would fail its mirror on.
#[test]
fn against_nbdkit_oldstyle() {
    let peer = spawn("nbdkit", &["-f", "-o", "-U", "{sock}", "memory", "64M"]);
    let s = UnixStream::connect(&peer.socket).expect("connect");
    let n = Negotiator::start(s).expect("oldstyle greeting");
    assert!(n.is_oldstyle());
    let (s, e) = n.go("ignored").expect("the one export");
    assert_eq!(e.size, 64 << 20);
    let mut c = Connection::new(s, e);
    let mut sent = HashMap::new();
    for i in 0..16u64 {
        let data = pattern(i, CHUNK as usize);
        let at = i * u64::from(CHUNK);
        let cookie = c
            .send(Command::Write, 0, at, CHUNK, Some(&data))
            .expect("send write");
        sent.insert(cookie, i);
    }
    for _ in 0..16 {
        let done = c.recv().expect("write reply");
        assert!(sent.remove(&done.cookie).is_some());
        assert_eq!(done.result, Ok(vec![]));
    }
    for i in 0..16u64 {
        let back = c.call(Command::Read, 0, i * u64::from(CHUNK), CHUNK, None);
        assert_eq!(
            back.expect("read"),
            Ok(pattern(i, CHUNK as usize)),
            "chunk {i}"
        );
    }
}

#[test]
fn against_nbdkit_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 32 << 20);
    let file = format!("file={}", img.display());
    let peer = spawn("nbdkit", &["-f", "-U", "{sock}", "file", &file]);
    let mut c = connect(&peer.socket, "");
    exercise(&mut c);
    c.disconnect().expect("disc");
    let bytes = std::fs::read(&img).expect("read image");
    assert_eq!(
        &bytes[5 * CHUNK as usize..6 * CHUNK as usize],
        &pattern(5, CHUNK as usize)[..]
    );
}

/// The error filter fails every write with EIO: each write's cookie gets EIO, and the reads
/// pipelined between them still succeed.
#[test]
fn injected_eio_is_reported_for_that_cookie_only() {
    let peer = spawn(
        "nbdkit",
        &[
            "-f",
            "-U",
            "{sock}",
            "--filter=error",
            "memory",
            "16M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        ],
    );
    let mut c = connect(&peer.socket, "");
    let data = pattern(1, 4096);
    let r1 = c.send(Command::Read, 0, 0, 4096, None).expect("read");
    let w = c
        .send(Command::Write, 0, 0, 4096, Some(&data))
        .expect("write");
    let r2 = c.send(Command::Read, 0, 8192, 4096, None).expect("read");
    let mut results = HashMap::new();
    for _ in 0..3 {
        let done = c.recv().expect("reply");
        results.insert(done.cookie, done.result);
    }
    assert_eq!(results[&w], Err(errno::EIO));
    assert_eq!(results[&r1], Ok(vec![0u8; 4096]));
    assert_eq!(results[&r2], Ok(vec![0u8; 4096]));
}

#[test]
fn unknown_export_and_listing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 1 << 20);
    let peer = spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-t",
            "-x",
            "disk",
            "-k",
            "{sock}",
            img.to_str().expect("path"),
        ],
    );
    let s = UnixStream::connect(&peer.socket).expect("connect");
    let mut n = Negotiator::start(s).expect("greeting");
    assert_eq!(n.list().expect("list"), vec!["disk".to_string()]);
    assert_eq!(n.info("disk").expect("info").size, 1 << 20);
    let err = n.go("nope").expect_err("unknown export");
    assert!(matches!(err, ClientError::NoSuchExport { .. }), "{err}");
}
