//! The device's life: adding (or recovering) the ublk device, serving it and stopping,
//! deleting or detaching it (`ublk.rs`); the image (`image.rs`); telling the orchestrator it
//! is live (`readiness.rs`); the state file that `recover` reads (`state.rs`).

pub mod image;
pub mod readiness;
pub mod state;
pub mod ublk;
