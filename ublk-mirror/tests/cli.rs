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
