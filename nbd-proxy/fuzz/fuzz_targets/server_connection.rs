//! A hostile client against `nbd-proxy serve`'s connection handler: the option haggling and
//! the request loop get the fuzzer's bytes (optionally after a valid GO). The server must end
//! the connection: no panic, no hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd_proxy::address::Stream;
use nbd_proxy::proto::*;
use nbd_proxy::server::{Export, Server, ServerConfig};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn server() -> &'static Arc<Server> {
    static S: OnceLock<(tempfile::TempDir, Arc<Server>)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        let server = Server::new(ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        });
        server
            .add_export(Export::open("disk", &img, false).expect("export"))
            .expect("add");
        (dir, server)
    })
    .1
}

fuzz_target!(|input: &[u8]| {
    let (go_first, tail) = match input.split_first() {
        Some((b, t)) => (b & 1 == 1, t),
        None => (false, input),
    };
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let s = server().clone();
    let t = std::thread::spawn(move || s.serve_connection(Stream::Unix(theirs), "fuzz"));
    let mut c = ours;
    let mut g = [0u8; 18];
    if c.read_exact(&mut g).is_err() {
        t.join().expect("no panic");
        return;
    }
    let mut msg = (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if go_first {
        let go = GoRequest {
            name: "disk".into(),
            info: vec![],
        }
        .encode();
        msg.extend_from_slice(
            &OptionHeader {
                option: opt::GO,
                length: go.len() as u32,
            }
            .encode(),
        );
        msg.extend_from_slice(&go);
    }
    msg.extend_from_slice(tail);
    let _ = c.write_all(&msg);
    let _ = c.shutdown(std::net::Shutdown::Write);
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    t.join().expect("the connection handler must not panic");
});
