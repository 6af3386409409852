//! tapdisk's shapes from sample replies, parsed from JSON as the daemon sends them.

use serde_json::Value;

use super::*;
use crate::args::{ListArgs, Target};

fn info(state: &str, image_open: bool) -> InfoReply {
    let line = format!(
        r#"{{"device":"/dev/ublkb4","dev_id":4,"size":1048576,"image":"/srv/vm1.img",
        "image_open":{image_open},"queues":2,"depth":64,"max_io_bytes":524288,
        "logical_block_size":512,"state":"{state}","label":"vm1-xvda","pid":4242}}"#
    );
    serde_json::from_str(&line).expect("info sample")
}

const OPS: &str = r#""ops":{"read":{"count":3,"bytes":12288},
    "write":{"count":2,"bytes":8192,"fua":1},"flush":{"count":1},
    "discard":{"count":0,"bytes":0},"write_zeroes":{"count":0,"bytes":0},"errors":1}"#;

const NO_MIRROR: &str = r#""mirror":{"state":"off","requested":null,"target":null,
    "in_flight":0,"ops":0,"bytes_mirrored":0,"last_error":null,"dirty_bytes":0,
    "bitmap_persistent":false,"activity_log_extents":0}"#;

fn mirror(state: &str) -> String {
    let failed = if state == "failed" {
        r#""last_error":"EOF","failed_at":1700000000.5"#
    } else {
        r#""last_error":null,"failed_at":null"#
    };
    format!(
        r#""mirror":{{"state":"{state}","requested":"mirror_vbd/1/xvda",
        "target":"mirror_vbd/1/xvda","targets":["mirror_vbd/1/xvda"],"connections":1,
        "export":"","export_size":1048576,"durable":true,"timeout":10.0,"in_flight":1,
        "ops":17,"bytes_mirrored":1048576,{failed},"dirty_bytes":0,
        "bitmap_persistent":false,"activity_log_extents":0,"range_locks":0,"copy":null}}"#
    )
}

fn stats(mirror: &str, failed: u8) -> StatsReply {
    let line = format!(
        r#"{{"name":"vm1-xvda","state":"running","reqs_outstanding":1,"reqs_parked":2,
        "nbd_mirror_failed":{failed},{OPS},{mirror}}}"#
    );
    serde_json::from_str(&line).expect("stats sample")
}

const AIO_IMAGE: &str = r#"{ "name": "/srv/vm1.img", "hits": [ 24, 16 ], "fail": [ 0, 1 ], "driver": { "type": 0, "name": "aio", "status": { "reqs": { "max": 128, "pending": 1 } } } }"#;

#[test]
fn stats_without_a_mirror_is_tapdisks_json() {
    let got = stats_json(&info("running", true), &stats(NO_MIRROR, 0));
    let want = format!(
        r#"{{ "name": "aio:/srv/vm1.img", "secs": [ 24, 16 ], "images": [ {AIO_IMAGE} ], "FIXME_enospc_redirect_count": 0, "nbd_mirror_failed": 0, "reqs_outstanding": 3, "read_caching": "false" }}"#
    );
    assert_eq!(got, want);
}

#[test]
fn stats_while_mirroring_lists_the_nbd_secondary_after_the_leaf() {
    let got = stats_json(&info("running", true), &stats(&mirror("active"), 0));
    let nbd = r#"{ "name": "mirror_vbd/1/xvda", "hits": [ 0, 2048 ], "fail": [ 0, 0 ], "driver": { "type": 15, "name": "nbd", "status": null } }"#;
    assert!(
        got.contains(&format!(r#""images": [ {AIO_IMAGE}, {nbd} ]"#)),
        "{got}"
    );
    // A failed secondary is retired from the images, and the flag says so.
    let got = stats_json(&info("running", true), &stats(&mirror("failed"), 1));
    assert!(
        got.contains(&format!(r#""images": [ {AIO_IMAGE} ]"#)),
        "{got}"
    );
    assert!(got.contains(r#""nbd_mirror_failed": 1,"#), "{got}");
}

#[test]
fn stats_while_paused_lists_no_image() {
    let got = stats_json(&info("paused", false), &stats(&mirror("active"), 0));
    assert!(got.contains(r#""images": [  ],"#), "{got}");
}

/// What xapi's Tapctl.Stats and SM require, with their types.
#[test]
fn stats_json_has_the_types_xapi_parses() {
    let got = stats_json(&info("running", true), &stats(&mirror("active"), 1));
    let v: Value = serde_json::from_str(&got).expect("valid JSON");
    assert!(v["name"].is_string());
    assert!(v["secs"][0].is_u64() && v["secs"][1].is_u64());
    assert!(v["nbd_mirror_failed"].is_u64() && v["reqs_outstanding"].is_u64());
    assert_eq!(v["read_caching"], "false");
    let images = v["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for image in images {
        assert!(image["name"].is_string());
        assert!(image["hits"][1].is_u64() && image["fail"][1].is_u64());
        assert!(image["driver"]["type"].is_u64() && image["driver"]["name"].is_string());
    }
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    // serde_json's map is sorted: the order on the wire is checked by the exact tests.
    assert_eq!(keys.len(), 7, "{keys:?}");
}

#[test]
fn a_path_with_a_quote_stays_json() {
    let mut i = info("running", true);
    i.image = r#"/srv/a"b.img"#.into();
    let got = stats_json(&i, &stats(NO_MIRROR, 0));
    let v: Value = serde_json::from_str(&got).expect("valid JSON");
    assert_eq!(v["name"], r#"aio:/srv/a"b.img"#);
}

#[test]
fn list_lines_and_states() {
    for (state, shown) in [
        ("running", "0"),
        ("attached", "0x20"),
        ("pausing", "0x14"),
        ("paused", "0x2a"),
        ("stopping", "0x40"),
    ] {
        assert_eq!(
            list_line(&info(state, true)),
            format!("pid=4242 minor=4 state={shown} args=aio:/srv/vm1.img")
        );
    }
    // A state we do not know, and a daemon too old to report its pid: fields left out.
    let mut i = info("frozen", true);
    i.pid = 0;
    assert_eq!(list_line(&i), "minor=4 args=aio:/srv/vm1.img");
}

/// The state table in help.txt says what state_bits does.
#[test]
fn help_states_are_the_mapping() {
    let help = include_str!("../help.txt");
    for state in ["running", "attached", "pausing", "paused", "stopping"] {
        let bits = state_bits(state).expect("known");
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{state} ")))
            .unwrap_or_else(|| panic!("{state} not in help.txt"));
        let shown = line.split_whitespace().nth(1).expect("state= column");
        assert_eq!(shown, hash_x(bits), "{line}");
    }
}

#[test]
fn hash_x_is_cs_alternate_hex() {
    assert_eq!(hash_x(0), "0");
    assert_eq!(hash_x(0x2a), "0x2a");
    assert_eq!(hash_x(0x200), "0x200");
}

#[test]
fn list_filters_as_tap_ctl() {
    let i = info("running", true);
    let keeps = |a: ListArgs| list_keeps(&a, &i);
    assert!(keeps(ListArgs::default()));
    let minor = |m| ListArgs {
        minor: Some(m),
        ..ListArgs::default()
    };
    assert!(keeps(minor(4)) && !keeps(minor(5)) && keeps(minor(-3)));
    let ty = |t: &str| ListArgs {
        ty: Some(t.into()),
        ..ListArgs::default()
    };
    assert!(keeps(ty("aio")) && !keeps(ty("vhd")));
    let file = |f: &str| ListArgs {
        file: Some(f.into()),
        ..ListArgs::default()
    };
    assert!(keeps(file("/srv/vm1.img")) && !keeps(file("/srv/other.img")));
    let pid = |p| ListArgs {
        pid: Some(p),
        ..ListArgs::default()
    };
    assert!(keeps(pid(4242)) && !keeps(pid(1)));
}

fn unpause(image: Option<&str>, secondary: Option<&str>, log: Option<&str>) -> UnpauseArgs {
    UnpauseArgs {
        target: Target {
            pid: 4242,
            minor: 4,
        },
        image: image.map(Into::into),
        secondary: secondary.map(Into::into),
        log: log.map(Into::into),
    }
}

#[test]
fn unpause_arguments_become_our_command() {
    let cmd = |a: UnpauseArgs| unpause_command(&a, "/srv/vm1.img").expect("ours");
    assert_eq!(
        cmd(unpause(Some("aio:/x"), Some("nbd:mirror_vbd/1/xvda"), None)),
        Command::Unpause {
            image: Some("/x".into()),
            mirror: Some("mirror_vbd/1/xvda".into())
        }
    );
    // The current path is no change; `-2 null` is the protocol's "null".
    assert_eq!(
        cmd(unpause(Some("aio:/srv/vm1.img"), Some("null"), None)),
        Command::Unpause {
            image: None,
            mirror: Some("null".into())
        }
    );
    assert_eq!(
        cmd(unpause(Some("sync:/y"), None, None)),
        Command::Unpause {
            image: Some("/y".into()),
            mirror: None
        }
    );
}

#[test]
fn unpause_refuses_what_ublk_mirror_does_not_serve() {
    let refused = |a: UnpauseArgs| unpause_command(&a, "/srv/vm1.img").expect_err("refused");
    let vhd = refused(unpause(Some("vhd:/x"), None, None));
    assert_eq!(vhd.errno, libc::EOPNOTSUPP);
    assert!(vhd.stderr.contains("raw images only"), "{}", vhd.stderr);
    let log = refused(unpause(Some("aio:/x"), None, Some("/var/log/cbt")));
    assert_eq!(log.errno, libc::EOPNOTSUPP);
    assert!(log.stderr.contains("-c /var/log/cbt"), "{}", log.stderr);
    let file = refused(unpause(None, Some("aio:/mirror.img"), None));
    assert_eq!(file.errno, libc::EOPNOTSUPP);
    for bad in [
        unpause(Some("/x"), None, None),
        unpause(Some("aio:"), None, None),
        unpause(None, Some("nbd:"), None),
        unpause(None, Some("somewhere"), None),
    ] {
        assert_eq!(refused(bad).errno, libc::EINVAL);
    }
}
