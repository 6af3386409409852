//! Control protocol between an orchestrator and a `ublk-mirror` daemon: newline-delimited JSON
//! over a Unix stream socket, with fds passed as SCM_RIGHTS. `control/PROTOCOL.md` is the
//! reference for other languages.
//!
//! Implemented so far: the message envelope and `pass-fd` (what `nbd-proxy connect` needs).
//! The daemon's side, the other commands and `ublk-mirror-ctl` belong to the control-plane
//! issue and do not exist yet.

pub mod client;
pub mod fdpass;
pub mod protocol;
