//! The reply types against the daemon's golden file of reply keys.
//!
//! `ublk-mirror/tests/golden/control-reply-keys.txt` lists, per labelled reply (`stats`,
//! `stats(mirror-failed)`, `error(unknown-command)`, ...), every key path of the whole reply
//! line with the kind of its value (`stats(no-mirror).result.mirror.requested: null`). Here each
//! label gets a sample value of our types, shaped like the daemon's reply in that state (the
//! same keys `null` or set); the sample's reply line must give exactly the golden's lines for
//! that label, no more, no fewer, and every label of the golden file must have a sample.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use super::*;
use crate::protocol::{code, Reply};

fn golden() -> BTreeMap<String, BTreeSet<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ublk-mirror/tests/golden/control-reply-keys.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut by_label: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // The label runs to the first '.' or ':' outside its parentheses.
        let mut depth = 0usize;
        let end = line
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                depth == 0 && (c == '.' || c == ':')
            })
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("no label in golden line {line:?}"));
        by_label
            .entry(line[..end].to_owned())
            .or_default()
            .insert(line.to_owned());
    }
    by_label
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

/// Every key path under `v` with the kind of its value; array elements are `[]` (the
/// golden file's own rule).
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

fn info(state: &str, image_open: bool) -> InfoReply {
    InfoReply {
        device: "/dev/ublkb0".into(),
        dev_id: 0,
        size: 1 << 20,
        image: "/images/disk.img".into(),
        image_open,
        queues: 1,
        depth: 128,
        max_io_bytes: 512 << 10,
        logical_block_size: 512,
        state: state.into(),
        label: "vm1-xvda".into(),
        pid: 4242,
    }
}

fn ops() -> OpsReport {
    OpsReport {
        read: ByteOps {
            count: 3,
            bytes: 12288,
        },
        write: WriteOps {
            count: 2,
            bytes: 8192,
            fua: 1,
        },
        flush: CountOps { count: 1 },
        discard: ByteOps { count: 0, bytes: 0 },
        write_zeroes: ByteOps { count: 0, bytes: 0 },
        errors: 0,
    }
}

fn stats(mirror: MirrorReport) -> StatsReply {
    StatsReply {
        name: "vm1-xvda".into(),
        state: "running".into(),
        reqs_outstanding: 0,
        reqs_parked: 0,
        nbd_mirror_failed: 0,
        ops: ops(),
        mirror,
        fd_receiver: None,
    }
}

fn off(state: &str, requested: Option<&str>, last_error: Option<&str>) -> MirrorReport {
    MirrorReport::Off(MirrorOff {
        state: state.into(),
        requested: requested.map(Into::into),
        target: None,
        in_flight: 0,
        ops: 0,
        bytes_mirrored: 0,
        last_error: last_error.map(Into::into),
        dirty_bytes: 65536,
        bitmap_persistent: false,
        activity_log_extents: 0,
    })
}

fn copy_ready() -> CopyReport {
    CopyReport {
        kind: "copy".into(),
        state: "ready".into(),
        bytes_done: 1 << 20,
        bytes_total: 1 << 20,
        rate: 5_242_880.0,
        eta: Some(0.0),
        elapsed: 0.2,
        speed_limit: None,
        paused: false,
    }
}

fn attached(copy: Option<CopyReport>, failure: Option<(&str, f64)>) -> MirrorReport {
    MirrorReport::Attached(Box::new(MirrorAttached {
        state: if failure.is_some() {
            "failed"
        } else {
            "active"
        }
        .into(),
        requested: Some("dest".into()),
        target: "dest".into(),
        targets: vec!["dest".into()],
        connections: 1,
        export: "golden".into(),
        export_size: 1 << 20,
        durable: true,
        timeout: Some(10.0),
        in_flight: 0,
        ops: 17,
        bytes_mirrored: 1 << 20,
        last_error: failure.map(|f| f.0.into()),
        failed_at: failure.map(|f| f.1),
        dirty_bytes: 0,
        bitmap_persistent: false,
        activity_log_extents: 0,
        activity_log_bound: 1024,
        activity_log_writes: 0,
        activity_log_waits: 0,
        activity_log_retired: 0,
        range_locks: 0,
        copy,
    }))
}

type Sample = (&'static str, Command, Response);

/// One sample per golden label: the command it answers and its result.
fn samples() -> Vec<Sample> {
    [
        device_samples(),
        fd_samples(),
        mirror_samples(),
        watch_samples(),
    ]
    .concat()
}

/// `watch`'s reply: the snapshot.
fn watch_samples() -> Vec<Sample> {
    vec![(
        "watch",
        Command::Watch,
        Response::Watch(Box::new(Event {
            seq: 0,
            time: 1.5e9,
            event: "snapshot".into(),
            state: Some("running".into()),
            mirror: Some("off".into()),
            reason: None,
            copy: None,
        })),
    )]
}

/// `info`, `stats` in each mirror shape, `pause`, `unpause`.
fn device_samples() -> Vec<Sample> {
    let timeout = None;
    vec![
        ("info", Command::Info, Response::Info(info("running", true))),
        (
            "info(paused)",
            Command::Info,
            Response::Info(info("paused", false)),
        ),
        (
            "stats(no-mirror)",
            Command::Stats,
            Response::Stats(Box::new(stats(off("off", None, None)))),
        ),
        (
            "stats(after-stop)",
            Command::Stats,
            Response::Stats(Box::new(stats(off("off", Some("dest"), None)))),
        ),
        (
            "stats(inherited-failure)",
            Command::Stats,
            Response::Stats(Box::new(stats(off(
                "failed",
                Some("dying"),
                Some("golden"),
            )))),
        ),
        (
            "stats(mirror-copy-ready)",
            Command::Stats,
            Response::Stats(Box::new(stats(attached(Some(copy_ready()), None)))),
        ),
        (
            "stats(mirror-no-copy)",
            Command::Stats,
            Response::Stats(Box::new(stats(attached(None, None)))),
        ),
        (
            "stats(mirror-failed)",
            Command::Stats,
            Response::Stats(Box::new(stats(attached(None, Some(("EOF", 1.7e9)))))),
        ),
        (
            "pause",
            Command::Pause { timeout },
            Response::Pause(PauseReply { drain_ms: 0.25 }),
        ),
        (
            "unpause",
            Command::Unpause {
                image: None,
                mirror: None,
            },
            Response::Unpause(UnpauseReply {
                state: "running".into(),
                nbd_mirror_failed: 0,
                mirror_error: None,
            }),
        ),
        (
            "unpause(mirror-null)",
            Command::Unpause {
                image: None,
                mirror: Some("null".into()),
            },
            Response::Unpause(UnpauseReply {
                state: "running".into(),
                nbd_mirror_failed: 0,
                mirror_error: None,
            }),
        ),
    ]
}

/// `pass-fd`, `list-fds`, `close-fd`.
fn fd_samples() -> Vec<Sample> {
    vec![
        (
            "pass-fd",
            Command::PassFd {
                name: "plain".into(),
                nbd: None,
            },
            Response::PassFd(PassFdReply {
                name: "plain".into(),
                replaced: false,
            }),
        ),
        (
            "pass-fd(negotiated)",
            Command::PassFd {
                name: "dest".into(),
                nbd: None,
            },
            Response::PassFd(PassFdReply {
                name: "dest".into(),
                replaced: false,
            }),
        ),
        (
            "list-fds",
            Command::ListFds,
            Response::ListFds(ListFdsReply {
                fds: vec![
                    StoredFdReport {
                        name: "dest".into(),
                        family: "unix".into(),
                        negotiated: true,
                        export: Some("golden".into()),
                    },
                    StoredFdReport {
                        name: "plain".into(),
                        family: "unix".into(),
                        negotiated: false,
                        export: None,
                    },
                ],
            }),
        ),
        (
            "close-fd",
            Command::CloseFd {
                name: "plain".into(),
            },
            Response::CloseFd(CloseFdReply {
                name: "plain".into(),
            }),
        ),
    ]
}

/// `wait-idle`, `shutdown`, `mirror-start`, `mirror-wait-ready`, `mirror-stop`, `dirty-map`.
fn mirror_samples() -> Vec<Sample> {
    let timeout = None;
    vec![
        (
            "wait-idle",
            Command::WaitIdle { timeout },
            Response::WaitIdle(WaitIdleReply {
                reqs_outstanding: 0,
                nbd_mirror_failed: 0,
            }),
        ),
        (
            "shutdown",
            Command::Shutdown { keep: false },
            Response::Shutdown(ShutdownReply {}),
        ),
        (
            "shutdown(keep)",
            Command::Shutdown { keep: true },
            Response::Shutdown(ShutdownReply {}),
        ),
        (
            "mirror-start",
            mirror_start("dest", true),
            Response::MirrorStart(MirrorStartReply {
                state: "active".into(),
                export: "golden".into(),
                size: 1 << 20,
            }),
        ),
        (
            "mirror-start(no-copy)",
            mirror_start("dying", false),
            Response::MirrorStart(MirrorStartReply {
                state: "active".into(),
                export: "golden".into(),
                size: 1 << 20,
            }),
        ),
        (
            "mirror-wait-ready",
            Command::MirrorWaitReady { timeout },
            Response::MirrorWaitReady(copy_ready()),
        ),
        (
            "mirror-stop",
            Command::MirrorStop,
            Response::MirrorStop(MirrorStopReply { stopped: true }),
        ),
        (
            "mirror-stop(none)",
            Command::MirrorStop,
            Response::MirrorStop(MirrorStopReply { stopped: false }),
        ),
        (
            "mirror-stop(failed)",
            Command::MirrorStop,
            Response::MirrorStop(MirrorStopReply { stopped: true }),
        ),
        (
            "dirty-map(marked)",
            Command::DirtyMap,
            Response::DirtyMap(DirtyMapReply {
                granularity: 65536,
                dirty_bytes: 65536,
                extents: vec![[65536, 65536]],
            }),
        ),
    ]
}

fn mirror_start(name: &str, copy: bool) -> Command {
    Command::MirrorStart {
        name: name.into(),
        names: Vec::new(),
        export: None,
        timeout: Some(10.0),
        copy,
        resync: false,
        speed: None,
        allow_no_flush: false,
        target_is_zero: false,
    }
}

fn lines_of(label: &str, reply: &Reply) -> BTreeSet<String> {
    let v = serde_json::to_value(reply).expect("reply json");
    let mut out = BTreeSet::new();
    key_paths(label, &v, &mut out);
    out
}

#[test]
fn every_reply_has_the_golden_keys_and_kinds() {
    let golden = golden();
    let mut covered = BTreeSet::new();
    let mut id = 0;
    let mut ok = |label: &str, result: &Response| {
        id += 1;
        let result = serde_json::to_value(result).expect("result json");
        (label.to_owned(), Reply::ok(id, result))
    };
    let mut replies: Vec<(String, Reply)> = samples()
        .iter()
        .map(|(label, _, response)| ok(label, response))
        .collect();
    for (label, c, m) in [
        ("error(unknown-command)", code::UNKNOWN_COMMAND, "frob"),
        ("error(close-fd-missing)", code::NO_SUCH_FD, "no fd"),
        (
            "error(mirror-wait-ready-no-copy)",
            code::BAD_STATE,
            "no copy",
        ),
        (
            "error(mirror-set-speed-no-copy)",
            code::BAD_STATE,
            "no copy",
        ),
    ] {
        replies.push((label.to_owned(), Reply::err(7, c, m)));
    }
    for (label, reply) in &replies {
        let want = golden
            .get(label)
            .unwrap_or_else(|| panic!("{label}: not in the golden file"));
        let got = lines_of(label, reply);
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{label}: the type's keys differ from the daemon's golden file\nmissing: \
             {missing:#?}\nextra: {extra:#?}"
        );
        covered.insert(label.clone());
    }
    let uncovered: Vec<_> = golden.keys().filter(|l| !covered.contains(*l)).collect();
    assert!(
        uncovered.is_empty(),
        "golden labels without a sample: {uncovered:?}"
    );
}

/// What the daemon sends parses into the command's type and serializes back to the same
/// JSON, so `ublk-mirror-ctl` prints exactly what it printed from the untyped reply.
#[test]
fn replies_round_trip_through_the_types() {
    for (label, command, response) in samples() {
        let v = serde_json::to_value(&response).expect("json");
        let text = serde_json::to_string(&v).expect("text");
        let parsed: Value = serde_json::from_str(&text).expect("parse text");
        let back = Response::parse(&command, parsed).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(back, response, "{label}");
        assert_eq!(serde_json::to_value(&back).expect("json"), v, "{label}");
    }
}

/// A reply of the daemon's shape written out by hand (as `json!` builds it there): the
/// floats stay floats and the nulls stay keys.
#[test]
fn a_daemon_stats_line_parses_and_prints_back_the_same() {
    let line = r#"{"fd_receiver":{"socket":"/run/blktap-control/nbdclient7","received":2,
        "refused":1},"mirror":{"activity_log_bound":1024,"activity_log_extents":0,
        "activity_log_retired":0,"activity_log_waits":0,"activity_log_writes":0,"bitmap_persistent":false,
        "bytes_mirrored":4096,"copy":{"bytes_done":4096,"bytes_total":8192,"elapsed":1.5,
        "eta":2.0,"kind":"resync","paused":false,"rate":2731.0,"speed_limit":null,"state":"copying"},
        "connections":1,"dirty_bytes":4096,"durable":true,"export":"","export_size":8192,"failed_at":null,
        "in_flight":1,"last_error":null,"ops":1,"range_locks":1,"requested":"m",
        "state":"active","target":"m","targets":["m"],"timeout":null},"name":"l","nbd_mirror_failed":0,"ops":{"discard":
        {"bytes":0,"count":0},"errors":0,"flush":{"count":0},"read":{"bytes":0,"count":0},
        "write":{"bytes":4096,"count":1,"fua":0},"write_zeroes":{"bytes":0,"count":0}},
        "reqs_outstanding":1,"reqs_parked":0,"state":"running"}"#;
    let v: Value = serde_json::from_str(line).expect("json");
    let Response::Stats(s) = Response::parse(&Command::Stats, v.clone()).expect("stats") else {
        panic!("not stats");
    };
    assert_eq!(s.mirror.state(), "active");
    assert_eq!(s.mirror.copy().map(|c| c.kind.as_str()), Some("resync"));
    assert_eq!(serde_json::to_value(&s).expect("json"), v);
    // The other shape.
    let off = serde_json::json!({"activity_log_extents":0,"bitmap_persistent":true,
        "bytes_mirrored":0,"dirty_bytes":0,"in_flight":0,"last_error":null,"ops":0,
        "requested":null,"state":"off","target":null});
    let m: MirrorReport = serde_json::from_value(off.clone()).expect("off");
    assert!(matches!(m, MirrorReport::Off(_)), "{m:?}");
    assert_eq!(serde_json::to_value(&m).expect("json"), off);
}

#[test]
fn a_reply_missing_a_key_is_refused() {
    let v = serde_json::json!({"name": "x"});
    assert!(Response::parse(&Command::ListFds, v.clone()).is_err());
    assert!(Response::parse(
        &Command::PassFd {
            name: "x".into(),
            nbd: None
        },
        v.clone()
    )
    .is_err());
    assert!(Response::parse(&Command::CloseFd { name: "x".into() }, v).is_ok());
}
