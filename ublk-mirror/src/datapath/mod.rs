//! The data path: what a queue thread does with a guest request, from the kernel's hand-off to
//! the commit of its result. It sees only the narrow [`io_path::IoPath`] handle (the gate, the
//! image fd, the counters, the doorbells, the mirror slot, the dirty map and the range lock)
//! and a stop sender: nothing here can reach the control plane (checked by
//! `scripts/check-layers`).
//!
//! One guest WRITE through the files:
//! 1. `queue.rs`: the tag's task gets the request from FETCH; `request.rs` parses it into
//!    `Request::Write` (refusing bad ones before any I/O); `queue.rs` `admit` counts it as
//!    started (`stats.rs`) and passes the pause gate (`io_path.rs`), or parks it
//!    (`waiters.rs`).
//! 2. `fanout.rs`: no mirror takes writes -> `unmirrored` (the local leg, plus an out-of-sync
//!    mark if a target must catch up later); a mirror takes writes -> `mirrored`: the range
//!    lock (`mirror/range_lock.rs`), the activity log (`mirror/dirty.rs`), then the local leg
//!    (`local_leg.rs`) and the mirror leg (`mirror_leg.rs`: this queue's connection,
//!    `mirror/ring_conn.rs`, or a hop to the queue that owns one) at once, both on this ring
//!    and from the tag's own buffer.
//! 3. `queue.rs`: the local result (or its `error.rs` errno) is committed with the next FETCH.

pub mod error;
pub mod fanout;
pub mod io_path;
pub mod local_leg;
pub mod log_sync;
pub mod mirror_leg;
pub mod queue;
pub mod request;
pub mod stats;
mod tag;
mod waiters;
