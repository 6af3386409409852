use super::*;

const SIZE: u64 = 1 << 30;
const MAX: u32 = 512 << 10;

#[test]
fn parses_each_op() {
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_READ, 8, 8, SIZE, MAX),
        Ok(Request::Read {
            offset: 4096,
            len: 4096
        })
    );
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 0, 1, SIZE, MAX),
        Ok(Request::Write {
            offset: 0,
            len: 512,
            fua: true
        })
    );
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_FLUSH, 0, 0, SIZE, MAX),
        Ok(Request::Flush)
    );
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_DISCARD, 0, 2048, SIZE, MAX),
        Ok(Request::Discard {
            offset: 0,
            len: 1 << 20
        })
    );
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 2048, SIZE, MAX),
        Ok(Request::WriteZeroes {
            offset: 0,
            len: 1 << 20
        })
    );
}

#[test]
fn refuses_before_io() {
    let last = (SIZE >> 9) - 1;
    assert!(matches!(
        Request::parse(sys::UBLK_IO_OP_WRITE, last, 2, SIZE, MAX),
        Err(RequestError::OutOfRange { .. })
    ));
    assert!(matches!(
        Request::parse(sys::UBLK_IO_OP_READ, u64::MAX >> 9, 8, SIZE, MAX),
        Err(RequestError::OutOfRange { .. })
    ));
    assert!(matches!(
        Request::parse(sys::UBLK_IO_OP_READ, 0, (MAX >> 9) + 1, SIZE, MAX),
        Err(RequestError::TooLarge { .. })
    ));
    for op in [
        sys::UBLK_IO_OP_READ,
        sys::UBLK_IO_OP_WRITE,
        sys::UBLK_IO_OP_DISCARD,
        sys::UBLK_IO_OP_WRITE_ZEROES,
    ] {
        let e = Request::parse(op, 8, 0, SIZE, MAX).expect_err("zero-length is refused");
        assert_eq!(e, RequestError::Empty { op, offset: 4096 });
        assert_eq!(e.errno(), libc::EINVAL);
    }
    // A FLUSH has no length: it stays valid.
    assert_eq!(
        Request::parse(sys::UBLK_IO_OP_FLUSH, 0, 0, SIZE, MAX),
        Ok(Request::Flush)
    );
    let e = Request::parse(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8, SIZE, MAX)
        .expect_err("zone append is unsupported");
    assert_eq!(e.errno(), libc::EOPNOTSUPP);
}
