//! The device's life: adding (or recovering) the ublk device, serving it and stopping,
//! deleting or detaching it (`ublk.rs`); pause, unpause, stop and wait-idle (`lifecycle.rs`);
//! where the queue threads run (`placement.rs`); the image (`image.rs`); telling the orchestrator it is live (`readiness.rs`); the state file
//! that `recover` reads (`state.rs`) and the record of it kept in memory (`record.rs`).

pub mod image;
pub mod lifecycle;
pub mod placement;
pub mod readiness;
pub mod record;
pub mod state;
pub mod ublk;
