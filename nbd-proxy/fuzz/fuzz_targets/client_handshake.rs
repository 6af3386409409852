//! A hostile server's handshake (valid greeting, then the fuzzer's bytes) against our client,
//! as the daemon runs it on a handed-over socket.
#![no_main]
mod scripted;
use libfuzzer_sys::fuzz_target;
use nbd_proxy::client::Negotiator;
use nbd_proxy::proto::*;
use scripted::Scripted;
use std::io::Cursor;

fuzz_target!(|tail: &[u8]| {
    let mut input = NBDMAGIC.to_be_bytes().to_vec();
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    input.extend_from_slice(tail);
    if let Ok(n) = Negotiator::start(Scripted(Cursor::new(input))) {
        let _ = n.go("disk");
    }
});
