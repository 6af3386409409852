//! Control protocol between an orchestrator and a `ublk-mirror` daemon: newline-delimited JSON
//! over a Unix stream socket, with fds passed as SCM_RIGHTS. `control/PROTOCOL.md` is the
//! reference for other languages.
//!
//! `protocol` holds the messages (every command the daemon serves, its defaults, the one
//! timeout rule and each command's typed reply), `client` the orchestrator's side, `fdpass` the SCM_RIGHTS rules; the daemon's
//! side is `ublk-mirror/src/ctl/` and the command line `ublk-mirror-ctl`
//! (`src/bin/ublk-mirror-ctl.rs`). For every command line of the project, `units` parses sizes
//! the same way and `help` is the rule their `--help` keeps; `logging` (feature `logging`) is
//! the one log format of its daemons.

pub mod client;
pub mod fdpass;
pub mod help;
#[cfg(feature = "logging")]
pub mod logging;
pub mod protocol;
pub mod units;

/// Where daemons put their default control sockets (`<dev-id>.sock`) and state files
/// (`<dev-id>.state`): the one place both the daemon and `ublk-mirror-ctl` take it from.
pub const RUN_DIR: &str = "/run/ublk-mirror";
