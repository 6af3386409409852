use super::*;

fn sample() -> DaemonState {
    DaemonState {
        version: VERSION,
        dev_id: 3,
        pid: 42,
        image: "/images/disk.img".into(),
        direct: DirectMode::Auto,
        queues: 2,
        depth: 128,
        max_io: 512 << 10,
        label: "vm1-xvda".into(),
        control: Some("/run/ublk-mirror/3.sock".into()),
        bitmap: None,
        granularity: 65536,
        al_extents: None,
        mirror: Some(MirrorRecord {
            target: "dest".into(),
            targets: Vec::new(),
            export: "disk".into(),
        }),
        detached: false,
        tapdisk_dir: None,
    }
}

#[test]
fn round_trips_and_replaces_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("3.state");
    let mut s = sample();
    s.save(&p).expect("save");
    assert_eq!(DaemonState::load(&p).expect("load"), s);
    let text = std::fs::read_to_string(&p).expect("read");
    assert!(
        text.contains("\"direct\": \"auto\""),
        "as on the command line: {text}"
    );
    s.mirror = None;
    s.save(&p).expect("save again");
    assert_eq!(DaemonState::load(&p).expect("load"), s);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("3.state")],
        "no temp file left"
    );
}

#[test]
fn refuses_missing_foreign_and_newer_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("9.state");
    assert!(matches!(DaemonState::load(&p), Err(StateError::Missing(_))));
    std::fs::write(&p, "not json").expect("write");
    assert!(matches!(
        DaemonState::load(&p),
        Err(StateError::Parse { .. })
    ));
    let mut s = sample();
    s.version = 99;
    std::fs::write(&p, serde_json::to_string(&s).expect("json")).expect("write");
    assert!(matches!(
        DaemonState::load(&p),
        Err(StateError::Version { found: 99, .. })
    ));
}
