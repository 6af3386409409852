//! Benchmarks of ublk-mirror against kernel loop devices and peers.
//!
//! Not implemented yet: the fio matrix is tracked by the benchmarks issue.
