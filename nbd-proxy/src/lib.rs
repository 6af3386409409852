//! NBD protocol, server and connect-and-hand-off.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout. The protocol library,
//! `nbd-proxy serve` and `nbd-proxy connect` are tracked by the NBD issue. It deliberately exports
//! nothing, so no code can come to depend on a half-built protocol.
