//! A hostile server's replies in transmission: never accepted for a cookie not in flight,
//! never a READ payload larger than asked for.
#![no_main]
mod scripted;
use libfuzzer_sys::fuzz_target;
use nbd_proxy::client::{Connection, Export};
use nbd_proxy::proto::*;
use scripted::Scripted;
use std::io::Cursor;

fuzz_target!(|tail: &[u8]| {
    let export = Export {
        name: String::new(),
        size: 1 << 20,
        flags: tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH,
        block_size: BlockSize::DEFAULT,
    };
    let mut c = Connection::new(Scripted(Cursor::new(tail.to_vec())), export);
    c.send(Command::Read, 0, 0, 4096, None).expect("send");
    c.send(Command::Flush, 0, 0, 0, None).expect("send");
    for _ in 0..3 {
        match c.recv() {
            Ok(done) => {
                assert!(done.cookie == 1 || done.cookie == 2);
                if let Ok(d) = &done.result {
                    assert!(d.len() <= 4096);
                }
            }
            Err(_) => break,
        }
    }
});
