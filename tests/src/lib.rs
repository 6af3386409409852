//! Integration tests live in `tests/tests/*.rs` (host) and `tests/vm/` (real ublk in a VM).
