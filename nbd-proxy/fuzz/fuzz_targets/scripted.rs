// A Read + Write over fixed input that swallows output: a peer that says exactly the fuzzer's
// bytes and then hangs up.
use std::io::{Cursor, Read, Write};

pub struct Scripted(pub Cursor<Vec<u8>>);

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
