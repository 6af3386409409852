//! A complete synthetic matrix on disk, as bench-matrix.sh writes it, for the tests.

use std::path::{Path, PathBuf};

use crate::{DEVICES, DIRECT, JOBS};

pub const REPS: usize = 3;

/// One fio JSON run: `iops` split 3:1 between read and write, mean latency `lat_us`.
pub fn fio_json(iops: f64, lat_us: f64) -> String {
    let dir = |iops: f64| {
        format!(
            r#"{{"iops": {iops}, "bw_bytes": {}, "lat_ns": {{"mean": {}}},
                "clat_ns": {{"percentile": {{"99.000000": {}}}}}}}"#,
            iops * 4096.0,
            lat_us * 1e3,
            lat_us * 3e3
        )
    };
    format!(
        r#"{{"jobs": [{{"error": 0, "read": {}, "write": {}}}]}}"#,
        dir(iops * 0.75),
        dir(iops * 0.25)
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// `scale/rss.json` for `devices` daemons with `listed` RSS entries each.
pub fn write_rss(dir: &Path, devices: usize, listed: usize) {
    let kb = |base: usize| {
        (0..listed)
            .map(|i| (base + 64 * i).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    write(
        &dir.join("scale/rss.json"),
        &format!(
            r#"{{"devices": {devices}, "image_mib": 64, "queues": 1, "depth": 128,
                "max_io": 524288, "idle_kb": [{}], "after_kb": [{}]}}"#,
            kb(5000),
            kb(6000)
        ),
    );
}

/// A complete matrix of REPS reps in a fresh temporary directory named after `tag`.
pub fn complete(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bench-testdata-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(
        &dir.join("machine.json"),
        &format!(r#"{{"reps": {REPS}, "kernel": "6.12", "cpus": 2, "secs": 4}}"#),
    );
    let runs = JOBS
        .iter()
        .flat_map(|j| DEVICES.iter().map(move |d| (*j, *d)))
        .chain(std::iter::once((DIRECT.1, DIRECT.0)));
    for (n, (job, dev)) in runs.enumerate() {
        for rep in 1..=REPS {
            let iops = 1000.0 + 10.0 * n as f64 + rep as f64;
            write(
                &dir.join(format!("raw/{dev}.{job}.{rep}.json")),
                &fio_json(iops, 1e6 / iops),
            );
        }
    }
    for rep in 1..=REPS {
        write(
            &dir.join(format!("scale/one.{rep}.json")),
            &fio_json(40_000.0, 800.0),
        );
        write(
            &dir.join(format!("scale/all.{rep}.json")),
            &fio_json(38_000.0 + rep as f64 * 1000.0, 13_000.0),
        );
        write(
            &dir.join(format!("scale/loop-one.{rep}.json")),
            &fio_json(50_000.0, 640.0),
        );
        write(
            &dir.join(format!("scale/loop-all.{rep}.json")),
            &fio_json(40_000.0, 12_800.0),
        );
        write(
            &dir.join(format!("copy/ublk-mirror.{rep}.json")),
            r#"{"mirror": {"copy": {"bytes_total": 536870912, "elapsed": 1.5, "state": "ready"}}}"#,
        );
        write(
            &dir.join(format!("copy/nbdcopy.{rep}.json")),
            r#"{"bytes": 536870912, "ms": 1400}"#,
        );
    }
    write_rss(&dir, 16, 16);
    dir
}
