//! Control protocol between an orchestrator and a `ublk-mirror` daemon.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout. The protocol,
//! `control/PROTOCOL.md` and `ublk-mirror-ctl` are tracked by the control-plane issue.
