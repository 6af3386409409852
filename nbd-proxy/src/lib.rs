//! NBD for ublk-mirror: the protocol (NetworkBlockDevice `doc/proto.md`), a client, and (with
//! the `server` feature) the server behind `nbd-proxy serve`.
//!
//! - [`proto`]: the wire format, without I/O; every decoder validates and returns typed errors.
//! - [`client`]: the handshake over any blocking stream, and a pipelined connection.
//! - [`inflight`]: the table of requests in flight on one connection, owning what it tracks.
//! - [`address`]: `tcp:HOST:PORT` and `unix:PATH` endpoints.
//! - [`file_lock`]: the lock that keeps two servers (ours, the daemon) off one image.
//! - `server`: exports image files to many concurrent, pipelined clients.
//! - `tls`: STARTTLS with rustls; then the session moves into the kernel (`ktls`) or is
//!   bridged to a plain socketpair.

pub mod address;
pub mod client;
pub mod file_lock;
pub mod inflight;
#[cfg(feature = "server")]
pub mod ktls;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;
