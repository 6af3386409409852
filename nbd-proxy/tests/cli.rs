//! `nbd-proxy` as a user runs it: --help names every default, a 0 that would mean "no limit"
//! is refused where no limit is unsafe, and the log is plain lines in ublk-mirror's format,
//! never colour.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};

fn nbd_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbd-proxy"))
        .args(args)
        .output()
        .expect("run nbd-proxy")
}

/// The help line (with its continuation) of `option` in `help`.
fn option_help<'a>(help: &'a str, option: &str) -> &'a str {
    let start = help
        .find(&format!("{option} <"))
        .unwrap_or_else(|| panic!("no {option} in:\n{help}"));
    let rest = &help[start..];
    let end = rest[2..].find("\n  -").map_or(rest.len(), |e| e + 2);
    &rest[..end]
}

#[test]
fn help_shows_every_default() {
    for (verb, option, default) in [
        ("serve", "--export", "[default: none"),
        ("serve", "--tls-cert", "[default: none"),
        ("serve", "--tls-client-ca", "[default: none"),
        ("serve", "--control", "[default: none"),
        ("serve", "--handshake-timeout", "[default: 10]"),
        ("serve", "--max-connections", "[default: 64]"),
        ("serve", "--workers", "[default: 4]"),
        ("serve", "--reorder-jitter", "[default: 0]"),
        ("connect", "--export", "[default: \"\""),
        ("connect", "--tls-ca", "[default: none"),
        ("connect", "--tls-hostname", "[default: the --to host"),
    ] {
        let o = nbd_proxy(&[verb, "--help"]);
        assert!(o.status.success(), "{verb} --help: {o:?}");
        assert!(!o.stdout.contains(&0x1b), "ANSI escape in {verb} --help");
        let out = String::from_utf8_lossy(&o.stdout);
        let line = option_help(&out, option);
        assert!(
            line.contains(default),
            "{verb} {option} lacks {default}: {line}"
        );
    }
    let o = nbd_proxy(&["serve", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        option_help(&out, "--handshake-timeout").contains("at least 1"),
        "{out}"
    );
}

#[test]
fn a_handshake_without_limit_is_refused() {
    let o = nbd_proxy(&[
        "serve",
        "--listen",
        "unix:/nonexistent/s",
        "--handshake-timeout",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--handshake-timeout") && e.contains("1 or more seconds"),
        "{e}"
    );
    for (option, value) in [
        ("--max-connections", "0"),
        ("--workers", "0"),
        ("--workers", "65"),
    ] {
        let o = nbd_proxy(&["serve", "--listen", "unix:/nonexistent/s", option, value]);
        assert_eq!(o.status.code(), Some(2), "{option} {value}: {o:?}");
    }
}

/// Serves briefly (until SIGTERM) with RUST_LOG_STYLE=always, which would colour
/// env_logger's default format even on a pipe: every line is "TIME LEVEL nbd-proxy[PID]:
/// message", as ublk-mirror's, without one ESC byte.
#[test]
fn logs_are_plain_lines_in_the_daemons_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-proxy"))
        .arg("serve")
        .arg(format!("--listen=unix:{}", sock.display()))
        .arg(format!("--export=disk={}", img.display()))
        .env("RUST_LOG_STYLE", "always")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbd-proxy serve");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("listening line");
    assert!(first.starts_with("listening on unix:"), "{first:?}");
    // SAFETY: kill(2) on our own child's pid, which we have not waited for yet.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM");
    let mut log = Vec::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_end(&mut log)
        .expect("read the log");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(
        !log.contains(&0x1b),
        "ANSI escape in the log: {:?}",
        String::from_utf8_lossy(&log)
    );
    let log = String::from_utf8(log).expect("UTF-8 log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        let (time, rest) = line.split_once(' ').expect("time");
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "timestamp {time:?} in {line:?}"
        );
        let (level, rest) = rest.split_once(' ').expect("level");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{line:?}"
        );
        assert!(rest.starts_with(&format!("nbd-proxy[{pid}]: ")), "{line:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO nbd-proxy[") && l.contains("]: listening on unix:")),
        "{log}"
    );
}
