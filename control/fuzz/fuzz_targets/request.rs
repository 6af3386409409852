//! One control line, as the daemon parses it: JSON, then the typed request; whatever parses
//! must serialize and parse back (floats may move by an ulp through JSON, so the round trip is
//! checked for success, not bit equality).
#![no_main]
use control::protocol::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
        return;
    };
    if let Ok(req) = serde_json::from_value::<Request>(value) {
        let again = serde_json::to_value(&req).expect("serialize");
        let back: Request = serde_json::from_value(again).expect("round trip");
        assert_eq!((back.v, back.id), (req.v, req.id));
        assert_eq!(
            std::mem::discriminant(&back.command),
            std::mem::discriminant(&req.command)
        );
    }
});
