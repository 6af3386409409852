//! Where the daemon keeps its default control sockets and its state files: the control
//! crate's `RUN_DIR`, which `ublk-mirror-ctl` uses too.

/// The runtime directory: `<dev-id>.sock` and `<dev-id>.state`.
pub use control::RUN_DIR;
