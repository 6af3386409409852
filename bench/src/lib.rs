//! The report of `bench/run`: reads the raw fio JSON of the VM's matrix
//! (`raw/<device>.<job>.<rep>.json`, `scale/*.json`, `copy/*.json`, `machine.json`), checks
//! that the matrix is complete, and turns it into medians, ratios, a markdown table, the
//! targets of issues 7 and 13 (met or not) and an SVG plot. The measuring itself is
//! `tests/vm/scenarios/bench-matrix.sh`.

pub mod fio;
pub mod matrix;
pub mod render;
pub mod scale;
pub mod targets;
#[cfg(test)]
mod testdata;

/// Devices in table order; `loop` is the reference and `loop2` the noise floor.
pub const DEVICES: &[&str] = &[
    "loop",
    "loop2",
    "ublk",
    "ublk-q2",
    "rublk",
    "mirrored",
    "dm-raid1",
    "mirrored-q2",
    "dm-raid1-c2",
    "mirrored-bitmap",
];
/// Jobs in table order.
pub const JOBS: &[&str] = &[
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "randwrite-4k-qd1",
    "randrw-64k-qd16",
    "write-1m-qd8",
];
/// The jobs that write (the mixed one included).
pub const WRITE_JOBS: &[&str] = &[
    "randwrite-4k-qd32",
    "randwrite-4k-qd1",
    "randrw-64k-qd16",
    "write-1m-qd8",
];
/// The target's own latency, measured with fio's nbd engine for this job only.
pub const DIRECT: (&str, &str) = ("nbd-direct", "randwrite-4k-qd1");
/// Each ublk-mirror mirror and the dm-raid1 with as many connections to the same server.
pub const MIRROR_PAIRS: &[(&str, &str)] =
    &[("mirrored", "dm-raid1"), ("mirrored-q2", "dm-raid1-c2")];

/// How fio submits, the same rule for every device (bench-matrix.sh's header says the same).
pub const SUBMITTER_RULE: &str = "Submitters: a job of total queue depth QD runs as one fio job \
    per queue of the device, each pinned to its own CPU with QD / queues in flight, so 1 \
    and 2 queues compare at equal total depth. The 2-queue devices (`ublk-q2`, `mirrored-q2`): \
    `--numjobs=2 --iodepth=QD/2 --cpus_allowed=0-1 --cpus_allowed_policy=split`, each job on its \
    own half of the device (so the two streams of the sequential job never overlap). Every other \
    device counts as 1 queue with one submitter (kernel loop and nbd are multi-queue inside, \
    dm-raid1 and rublk are driven by one submitter here): `--numjobs=1 --cpus_allowed=0`. The QD1 \
    job runs `--numjobs=1 --cpus_allowed=0` on every device. `--group_reporting` sums the jobs.";

/// When a target counts as met (see `targets::Target::met`).
pub const MET_RULE: &str = "A target counts as met only when its figure meets it AND at least \
    ceil(0.8 × R) of its R per-rep figures do (4 of 5 reps). The figure of a ratio is the ratio \
    of the medians over the reps; its per-rep figure is rep i of A / rep i of B (the devices are \
    interleaved, so rep i of one ran next to rep i of the other). For the idle RSS the figure is \
    the median over the daemons and each daemon is one sample. The stretch goal uses the same rule.";
