//! Fuzzing of the request parser and dispatcher (a stand-in for cargo-fuzz, which needs a
//! nightly toolchain): arbitrary bytes, and well-formed requests of every command with fields
//! of arbitrary types and values, against the real handler on a temp-file device. Every input
//! must get a reply: no panic, no hang.

use std::sync::Arc;

use serde_json::Value;

use crate::ctl::dispatch::handle_line;
use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;
use proptest::prelude::*;
use proptest::sample::select;
use std::sync::OnceLock;

struct Target {
    _image: tempfile::NamedTempFile,
    daemon: Arc<Daemon>,
    info: DeviceInfo,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let (image, daemon) = crate::daemon::tests::daemon_with(1 << 20, 1);
        Target {
            _image: image,
            daemon,
            info: crate::ctl::tests::test_info(),
        }
    })
}

const COMMANDS: &[&str] = &[
    "info",
    "stats",
    "pause",
    "unpause",
    "pass-fd",
    "list-fds",
    "close-fd",
    "wait-idle",
    "shutdown",
    "mirror-start",
    "mirror-stop",
    "mirror-wait-ready",
    "wait-ready",
    "dirty-map",
    "frob",
];
const FIELDS: &[&str] = &[
    "name", "timeout", "image", "mirror", "export", "copy", "resync", "speed", "nbd", "keep",
    "size", "flags",
];

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "\\PC{0,80}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_answered(line in proptest::collection::vec(any::<u8>(), 0..600)) {
        let t = target();
        let r = handle_line(&line, None, false, &t.daemon, &t.info);
        prop_assert!(!r.ok || serde_json::from_slice::<Value>(&line).is_ok());
    }

    #[test]
    fn every_command_with_any_arguments_is_answered(
        cmd in select(COMMANDS),
        v in 0u64..3,
        args in proptest::collection::vec((select(FIELDS), value()), 0..4),
    ) {
        let t = target();
        let args: serde_json::Map<String, Value> =
            args.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let line = serde_json::to_vec(&serde_json::json!({
            "v": v, "id": 1, "cmd": cmd, "args": args,
        })).expect("json");
        let r = handle_line(&line, None, false, &t.daemon, &t.info);
        prop_assert!(r.ok || r.error.is_some());
    }
}
