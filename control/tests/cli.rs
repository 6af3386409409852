//! `ublk-mirror-ctl` as a user runs it: its --help names the defaults, verbs refuse options
//! they do not use, and what it sends a daemon (a stand-in socket here) carries the defaults
//! and the 0-timeout rule. Output is plain: no ANSI escape anywhere.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror-ctl"))
        .args(args)
        .output()
        .expect("run ublk-mirror-ctl")
}

fn text(o: &Output) -> (String, String) {
    assert!(
        !o.stdout.contains(&0x1b) && !o.stderr.contains(&0x1b),
        "ANSI escape in the output: {o:?}"
    );
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The help line (with its continuation) of `option` in `help`.
fn option_help<'a>(help: &'a str, option: &str) -> &'a str {
    let start = help
        .find(&format!("{option} "))
        .unwrap_or_else(|| panic!("no {option} in:\n{help}"));
    let rest = &help[start..];
    let end = rest[2..].find("\n  -").map_or(rest.len(), |e| e + 2);
    &rest[..end]
}

#[test]
fn help_shows_the_defaults() {
    for (verb, option, default) in [
        ("mirror-start", "--timeout", "[default: 10]"),
        ("mirror-start", "--export", "[default: \"\""),
        ("mirror-start", "--speed", "[default: 0]"),
        ("pause", "--timeout", "[default: 30]"),
        ("wait-idle", "--timeout", "[default: 30]"),
        ("mirror-wait-ready", "--timeout", "[default: 86400]"),
        ("wait-ready", "--timeout", "[default: 86400]"),
        ("unpause", "--image", "[default: the current path]"),
    ] {
        let o = ctl(&[verb, "--help"]);
        assert!(o.status.success(), "{verb} --help: {o:?}");
        let (out, _) = text(&o);
        let line = option_help(&out, option);
        assert!(
            line.contains(default),
            "{verb} {option} lacks {default}: {line}"
        );
    }
    // The unit rule and the 0 rule are stated once, in the top help.
    let (out, _) = text(&ctl(&["--help"]));
    for want in [
        "powers of 1000",
        "powers of 1024",
        "a timeout of 0 means no limit",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
    let (out, _) = text(&ctl(&["mirror-start", "--help"]));
    assert!(
        option_help(&out, "--timeout").contains("0 for no limit"),
        "{out}"
    );
    assert!(
        option_help(&out, "--speed").contains("20MiB is 20971520"),
        "{out}"
    );
    let (out, _) = text(&ctl(&["--help"]));
    assert!(
        out.contains("mirror-wait-ready") && out.contains("[alias: wait-ready]"),
        "{out}"
    );
}

#[test]
fn list_takes_no_daemon() {
    for args in [
        &["list", "--dev-id", "0"][..],
        &["--dev-id", "0", "list"],
        &["list", "--socket", "/tmp/x.sock"],
        &["--socket", "/tmp/x.sock", "list"],
    ] {
        let o = ctl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?} was not refused: {o:?}");
        let (_, err) = text(&o);
        assert!(
            err.contains("--dev-id") || err.contains("--socket"),
            "{err}"
        );
    }
    let o = ctl(&["--json", "raw", "--dev-id", "0", "{}"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(text(&o).1.contains("takes no --json"));
}

#[test]
fn bad_timeouts_are_refused_before_connecting() {
    for t in ["-1", "86401", "soon"] {
        let o = ctl(&["pause", "--timeout", t, "--socket", "/nonexistent.sock"]);
        assert_eq!(o.status.code(), Some(2), "--timeout {t}: {o:?}");
        let (_, err) = text(&o);
        assert!(err.contains("--timeout"), "{err}");
    }
}

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ublk-mirror-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The result a daemon sends for `cmd` (the keys of `control::protocol`'s reply types).
fn result_of(cmd: &str) -> serde_json::Value {
    match cmd {
        "mirror-start" => serde_json::json!({"state": "active", "export": "", "size": 4096}),
        "pause" => serde_json::json!({"drain_ms": 0.5}),
        "wait-idle" => serde_json::json!({"reqs_outstanding": 0, "nbd_mirror_failed": 0}),
        _ => serde_json::json!({}),
    }
}

/// Runs the CLI with `args` (`{sock}` is the socket) against a daemon stand-in that answers
/// one request as a daemon would (`result_of`); returns that request (null if none came
/// within 10 s).
fn one_request(dir: &Path, args: &[&str]) -> (serde_json::Value, Output) {
    let sock = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let daemon = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return serde_json::Value::Null,
            }
        };
        conn.set_nonblocking(false).expect("blocking");
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).expect("read");
        let req: serde_json::Value = serde_json::from_str(&line).expect("json request");
        let result = result_of(req["cmd"].as_str().unwrap_or(""));
        let reply = serde_json::json!({"v": 1, "id": req["id"], "ok": true, "result": result});
        writeln!(&conn, "{reply}").expect("reply");
        req
    });
    let sock = sock.to_string_lossy().into_owned();
    let args: Vec<String> = args.iter().map(|a| a.replace("{sock}", &sock)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ctl(&args);
    (daemon.join().expect("daemon thread"), o)
}

#[test]
fn requests_carry_the_defaults_and_zero_timeouts() {
    let dir = TempDir::new("requests");
    let dir = dir.0.as_path();
    let (req, o) = one_request(dir, &["--socket", "{sock}", "mirror-start", "target"]);
    assert!(o.status.success(), "{o:?}");
    text(&o);
    assert_eq!(req["cmd"], "mirror-start");
    assert_eq!(
        req["args"],
        serde_json::json!({"name": "target", "export": "", "timeout": 10.0})
    );
    let (req, o) = one_request(
        dir,
        &[
            "mirror-start",
            "t",
            "--timeout",
            "0",
            "--copy",
            "--speed",
            "20MiB",
            "--socket",
            "{sock}",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(req["args"]["timeout"], 0.0);
    assert_eq!(req["args"]["copy"], true);
    assert_eq!(req["args"]["speed"], 20 << 20);
    let (req, o) = one_request(dir, &["--socket", "{sock}", "pause", "--timeout", "0"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(req["cmd"], "pause");
    assert_eq!(
        req["args"]["timeout"], 0.0,
        "pause --timeout 0 is sent as no limit"
    );
    let (req, o) = one_request(dir, &["pause", "--socket", "{sock}"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(req["args"]["timeout"], 30.0);
    let (req, o) = one_request(dir, &["wait-idle", "--json", "--socket", "{sock}"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(req["args"]["timeout"], 30.0);
    assert_eq!(
        text(&o).0.trim(),
        "{\n  \"nbd_mirror_failed\": 0,\n  \"reqs_outstanding\": 0\n}"
    );
    // Text: one `key: value` line per key, sorted, as scenarios parse them.
    let (_, o) = one_request(dir, &["mirror-start", "t", "--socket", "{sock}"]);
    assert_eq!(text(&o).0, "export: \nsize: 4096\nstate: active\n");
    let (_, o) = one_request(dir, &["pause", "--socket", "{sock}"]);
    assert_eq!(text(&o).0, "drain_ms: 0.5\n");
}

/// A reply that lacks a key of the command's reply type is refused, not printed half.
#[test]
fn a_malformed_reply_is_an_error() {
    let dir = TempDir::new("malformed");
    let (_, o) = one_request(dir.0.as_path(), &["stats", "--socket", "{sock}"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(text(&o).1.contains("malformed reply"), "{o:?}");
}

#[test]
fn the_daemon_is_named_once() {
    let o = ctl(&["--socket", "/nonexistent.sock", "stats", "--dev-id", "1"]);
    assert_eq!(o.status.code(), Some(1), "the daemon named twice: {o:?}");
    assert!(text(&o).1.contains("say which daemon once"), "{o:?}");
    let o = ctl(&["stats"]);
    assert_eq!(o.status.code(), Some(1), "no daemon named: {o:?}");
    assert!(text(&o).1.contains("--socket PATH or --dev-id N"), "{o:?}");
}
