//! Every wire decoder on arbitrary bytes: a typed error or a value that re-encodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd_proxy::proto::*;

fuzz_target!(|b: &[u8]| {
    let _ = SimpleReply::decode(b);
    let _ = OptionHeader::decode(b);
    let _ = OptionReplyHeader::decode(b);
    let _ = GoRequest::decode(b);
    let _ = Info::decode(b);
    let _ = decode_string(b);
    if let Ok(h) = RequestHeader::decode(b) {
        let _ = h.check_framing();
        let _ = h.check(1 << 30, 0xffff);
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
    }
});
