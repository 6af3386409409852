//! Mirroring to an NBD target: the link to the target (`link.rs`: shared state, routing and
//! forwarding; `ring_conn.rs`: one connection driven on a queue's ring), attaching it (`attach.rs`:
//! the handshake and the export checks), starting and stopping it under the control plane
//! (`mirroring.rs`), the background copy and resync (`copy.rs`), the out-of-sync map and
//! activity log (`dirty.rs`) and the range lock that orders overlapping writes on both legs
//! (`range_lock.rs`).
//!
//! The data path (`datapath/`) uses the link, the dirty map and the range lock; nothing here
//! reaches back into the control server or the device (checked by `scripts/check-layers`).

pub mod attach;
pub mod copy;
pub mod dirty;
pub mod link;
pub mod mirroring;
pub mod range_lock;
pub mod ring_conn;
#[cfg(test)]
pub mod test_ring;
