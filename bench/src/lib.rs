//! The report of `bench/run`: reads the raw fio JSON of the VM's matrix
//! (`raw/<device>.<job>.<rep>.json`, `copy/*.json`, `machine.json`), checks that the matrix is
//! complete, and turns it into medians, ratios, a markdown table, a target check and an SVG
//! plot. The measuring itself is `tests/vm/scenarios/bench-matrix.sh`.

pub mod fio;
pub mod matrix;
pub mod render;

/// Devices in table order; `loop` is the reference and `loop2` the noise floor.
pub const DEVICES: &[&str] = &[
    "loop", "loop2", "ublk", "ublk-q2", "rublk", "mirrored", "dm-raid1",
];
/// Jobs in table order.
pub const JOBS: &[&str] = &[
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "randwrite-4k-qd1",
    "randrw-64k-qd16",
    "write-1m-qd8",
];
/// The target's own latency, measured with fio's nbd engine for this job only.
pub const DIRECT: (&str, &str) = ("nbd-direct", "randwrite-4k-qd1");
