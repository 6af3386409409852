//! Where the daemon keeps its default control sockets and its state files.
//! (`ublk-mirror-ctl`, in the control crate, names the same directory for itself.)

/// The runtime directory: `<dev-id>.sock` and `<dev-id>.state`.
pub const RUN_DIR: &str = "/run/ublk-mirror";
