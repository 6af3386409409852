//! The daemon's command line on this host: bad input is refused with a clear message and a
//! non-zero exit before any device could be created. (Device behavior is tested in the VM.)

use std::path::Path;
use std::process::{Command, Output};

fn serve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .arg("serve")
        .args(args)
        .output()
        .expect("run ublk-mirror")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn image(dir: &Path, name: &str, len: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(len).expect("size image");
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_image_is_named() {
    let o = serve(&["--image", "/nonexistent/disk.img"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("/nonexistent/disk.img") && e.contains("cannot open"),
        "{e}"
    );
}

#[test]
fn empty_and_unaligned_images_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = serve(&["--image", &image(dir.path(), "empty.img", 0)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is empty (0 bytes)"), "{}", stderr(&o));

    let o = serve(&["--image", &image(dir.path(), "odd.img", 1000)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a multiple of the 512-byte"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_max_io_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 1 << 20);
    let o = serve(&["--image", &img, "--max-io", "1000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("multiple of 4096"), "{}", stderr(&o));
}

#[test]
fn missing_driver_says_how_to_load_it() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this host has the ublk driver (the VM scenario bad-input covers it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 1 << 20);
    let o = serve(&["--image", &img]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("modprobe ublk_drv"), "{}", stderr(&o));
}

#[test]
fn help_explains_the_flags() {
    let o = Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(["serve", "--help"])
        .output()
        .expect("run ublk-mirror");
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--image",
        "--dev-id",
        "--queues",
        "--depth",
        "--direct",
        "--label",
        "--ready-fd",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}:\n{out}");
    }
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
fn help_shows_defaults_and_units() {
    let help = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
            .args(args)
            .output()
            .expect("run ublk-mirror");
        assert!(o.status.success(), "{args:?}: {o:?}");
        assert!(!o.stdout.contains(&0x1b), "ANSI escape in {args:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = help(&["serve", "--help"]);
    for (option, default) in [
        ("--dev-id", "[default: a free one"),
        ("--queues", "[default: 1]"),
        ("--depth", "[default: 128]"),
        ("--max-io", "[default: 524288]"),
        ("--direct", "[default: auto]"),
        ("--label", "[default: \"\""),
        ("--ready-fd", "[default: none]"),
        ("--control", "[default: /run/ublk-mirror/<dev-id>.sock]"),
        ("--bitmap", "[default: none"),
        ("--granularity", "[default: 65536]"),
    ] {
        let line = option_help(&out, option);
        assert!(
            line.contains(default),
            "serve {option} lacks {default}: {line}"
        );
    }
    assert!(
        out.contains("powers of 1000") && out.contains("powers of 1024"),
        "serve --help does not say what K and KiB mean:\n{out}"
    );
    let out = help(&["recover", "--help"]);
    assert!(
        option_help(&out, "--ready-fd").contains("[default: none]"),
        "{out}"
    );
    let out = help(&["--help"]);
    assert!(out.contains("never coloured"), "{out}");
}

#[test]
fn sizes_take_units() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 1 << 20);
    // 1000 bytes is no multiple of 4096; 4K is 4000 bytes, not 4096.
    for bad in ["1000", "4K"] {
        let o = serve(&["--image", &img, "--max-io", bad]);
        assert_eq!(o.status.code(), Some(1), "--max-io {bad}");
        assert!(stderr(&o).contains("multiple of 4096"), "{}", stderr(&o));
    }
    let o = serve(&["--image", &img, "--max-io", "4Q"]);
    assert_eq!(o.status.code(), Some(2), "unknown unit");
    assert!(stderr(&o).contains("unknown unit"), "{}", stderr(&o));
}

/// The log is plain lines, "TIME LEVEL ublk-mirror[PID]: message", never colour, even when
/// RUST_LOG_STYLE asks for it. (An image is opened and logged before a bad --granularity
/// stops the daemon, driver or not.)
#[test]
fn logs_are_plain_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path(), "disk.img", 1 << 20);
    let child = Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args([
            "serve",
            "--image",
            &img,
            "--granularity",
            "3",
            "--label",
            "vm1",
        ])
        .env("RUST_LOG_STYLE", "always")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ublk-mirror");
    let pid = child.id();
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(1));
    assert!(!o.stderr.contains(&0x1b), "ANSI escape in the log: {o:?}");
    let e = stderr(&o);
    let line = e
        .lines()
        .find(|l| l.contains(" INFO "))
        .unwrap_or_else(|| panic!("no INFO line: {e}"));
    let (time, rest) = line.split_once(' ').expect("time");
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "timestamp {time:?} in {line:?}"
    );
    let want = format!("INFO ublk-mirror[{pid}][vm1]: image {img}: ");
    assert!(
        rest.starts_with(&want),
        "{line:?} does not start with {want:?}"
    );
}
