//! Arbitrary bytes from a peer end in a typed error or a valid value: never a panic, a hang or
//! an unbounded allocation. Covers every decoder, the client handshake, and the server's
//! handshake and request loop.

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nbd_proxy::address::Stream;
use nbd_proxy::client::{Connection, Negotiator};
use nbd_proxy::proto::*;
use nbd_proxy::server::{Export, Server, ServerConfig};
use proptest::prelude::*;

/// A Read + Write over fixed input that swallows output.
struct Scripted(Cursor<Vec<u8>>);
impl Read for Scripted {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}
impl Write for Scripted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn greeting() -> Vec<u8> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = RequestHeader::decode(&b);
        let _ = SimpleReply::decode(&b);
        let _ = OptionHeader::decode(&b);
        let _ = OptionReplyHeader::decode(&b);
        let _ = GoRequest::decode(&b);
        let _ = Info::decode(&b);
        let _ = decode_string(&b);
        if let Ok(h) = RequestHeader::decode(&b) {
            let _ = h.check_framing();
            let _ = h.check(1 << 30, 0xffff);
            prop_assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        }
    }

    /// A hostile server's handshake: greeting then arbitrary replies.
    #[test]
    fn client_handshake_survives_any_server(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = greeting();
        input.extend_from_slice(&tail);
        if let Ok(n) = Negotiator::start(Scripted(Cursor::new(input))) {
            let _ = n.go("disk");
        }
    }

    /// A hostile server's replies: never accepted for a cookie not in flight, never a
    /// READ payload larger than asked for.
    #[test]
    fn client_replies_survive_any_server(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let export = nbd_proxy::client::Export {
            name: String::new(),
            size: 1 << 20,
            flags: tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH,
            block_size: BlockSize::DEFAULT,
        };
        let mut c = Connection::new(Scripted(Cursor::new(tail)), export);
        c.send(Command::Read, 0, 0, 4096, None).expect("send");
        c.send(Command::Flush, 0, 0, 0, None).expect("send");
        for _ in 0..3 {
            match c.recv() {
                Ok(done) => {
                    prop_assert!(done.cookie == 1 || done.cookie == 2);
                    if let Ok(d) = &done.result { prop_assert!(d.len() <= 4096); }
                }
                Err(_) => break,
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A hostile client: valid greeting exchange then arbitrary bytes, in the handshake or in
    /// transmission. The server must end the connection, not panic or hang.
    #[test]
    fn server_survives_any_client(
        go_first in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("d.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(1 << 20)).expect("image");
        let server = Server::new(ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        });
        server.add_export(Export::open("disk", &img, false).expect("export")).expect("add");
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let s = server.clone();
        let t = std::thread::spawn(move || s.serve_connection(Stream::Unix(theirs), "prop"));
        let mut c = ours;
        let mut g = [0u8; 18];
        c.read_exact(&mut g).expect("greeting");
        let mut msg = (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes().to_vec();
        if go_first {
            let go = GoRequest { name: "disk".into(), info: vec![] }.encode();
            msg.extend_from_slice(&OptionHeader { option: opt::GO, length: go.len() as u32 }.encode());
            msg.extend_from_slice(&go);
        }
        msg.extend_from_slice(&tail);
        let _ = c.write_all(&msg);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = c.read_to_end(&mut sink);
        t.join().expect("server thread must not panic");
    }
}
