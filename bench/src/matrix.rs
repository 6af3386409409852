//! The whole matrix: every run loaded, completeness checked, medians and ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::fio::{self, Run};
use crate::scale::Scale;
use crate::targets;
use crate::{DEVICES, DIRECT, JOBS, MET_RULE, SUBMITTER_RULE};

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Fio {
        path: PathBuf,
        source: fio::FioError,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
    #[error("the matrix is incomplete: {0} (a device was not set up or a run failed)")]
    Missing(String),
}

/// Median, extremes and every rep of one figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// In rep order (rep 1 first), so that rep i of one device pairs with rep i of another.
    pub reps: Vec<f64>,
}

impl Stat {
    pub fn of(reps: Vec<f64>) -> Stat {
        let mut sorted = reps.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Stat {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            reps,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max, "reps": self.reps })
    }
}

/// The four figures of one device on one job, over the reps.
#[derive(Debug, Clone)]
pub struct Cell {
    pub iops: Stat,
    pub mb_s: Stat,
    pub lat_mean_us: Stat,
    pub p99_us: Stat,
}

impl Cell {
    pub fn of(runs: &[Run]) -> Cell {
        let pick = |f: fn(&Run) -> f64| Stat::of(runs.iter().map(f).collect());
        Cell {
            iops: pick(|r| r.iops),
            mb_s: pick(|r| r.mb_s),
            lat_mean_us: pick(|r| r.lat_mean_us),
            p99_us: pick(|r| r.p99_us),
        }
    }
}

pub struct Matrix {
    pub machine: Value,
    pub reps: usize,
    /// (job, device) -> cell; includes the nbd-direct cell.
    pub cells: BTreeMap<(String, String), Cell>,
    /// The scale row: N daemons at once against one alone, and their RSS.
    pub scale: Scale,
    /// MB/s of the background copy and of nbdcopy, per rep.
    pub copy_ours: Stat,
    pub copy_nbdcopy: Stat,
    /// Every raw fio output, by file name.
    pub raw: BTreeMap<String, Value>,
}

fn read(path: &Path) -> Result<String, MatrixError> {
    std::fs::read_to_string(path).map_err(|source| MatrixError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn json_file(path: &Path) -> Result<Value, MatrixError> {
    let text = read(path)?;
    let start = text.find('{').unwrap_or(0);
    serde_json::from_str(&text[start..]).map_err(|e| MatrixError::Bad {
        path: path.to_owned(),
        what: format!("invalid JSON: {e}"),
    })
}

/// The fio runs `dir/<sub>/<stem>.<rep>.json` of every rep, each kept in `raw` (by file name for
/// `raw/`, else as `<sub>/<file name>`). A missing rep means an incomplete matrix.
pub(crate) fn load_runs(
    dir: &Path,
    sub: &str,
    stem: &str,
    reps: usize,
    raw: &mut BTreeMap<String, Value>,
) -> Result<Vec<Run>, MatrixError> {
    let mut runs = Vec::with_capacity(reps);
    for rep in 1..=reps {
        let name = format!("{stem}.{rep}.json");
        let path = dir.join(sub).join(&name);
        if !path.exists() {
            return Err(MatrixError::Missing(format!("no run {sub}/{name}")));
        }
        let text = read(&path)?;
        runs.push(fio::parse(&text).map_err(|source| MatrixError::Fio {
            path: path.clone(),
            source,
        })?);
        let key = if sub == "raw" {
            name
        } else {
            format!("{sub}/{name}")
        };
        raw.insert(key, json_file(&path)?);
    }
    Ok(runs)
}

/// MB/s of the background copy (from its `stats`) and of nbdcopy, per rep.
fn load_copy(dir: &Path, reps: usize) -> Result<(Stat, Stat), MatrixError> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for rep in 1..=reps {
        let p = dir.join("copy").join(format!("ublk-mirror.{rep}.json"));
        let v = json_file(&p)?;
        let copy = &v["mirror"]["copy"];
        let (Some(total), Some(secs)) = (copy["bytes_total"].as_f64(), copy["elapsed"].as_f64())
        else {
            return Err(MatrixError::Bad {
                path: p,
                what: "no mirror.copy.bytes_total/elapsed".into(),
            });
        };
        if copy["state"] != "ready" {
            return Err(MatrixError::Bad {
                path: p,
                what: format!("copy state {}, not ready", copy["state"]),
            });
        }
        ours.push(total / secs.max(1e-6) / 1e6);
        let p = dir.join("copy").join(format!("nbdcopy.{rep}.json"));
        let v = json_file(&p)?;
        let (Some(bytes), Some(ms)) = (v["bytes"].as_f64(), v["ms"].as_f64()) else {
            return Err(MatrixError::Bad {
                path: p,
                what: "no bytes/ms".into(),
            });
        };
        theirs.push(bytes / (ms.max(1.0) / 1e3) / 1e6);
    }
    Ok((Stat::of(ours), Stat::of(theirs)))
}

impl Matrix {
    /// Loads `dir` as written by bench-matrix.sh; every device, job and rep, the scale row and
    /// the copy runs must be there.
    pub fn load(dir: &Path) -> Result<Matrix, MatrixError> {
        let machine = json_file(&dir.join("machine.json"))?;
        let reps = machine
            .get("reps")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| MatrixError::Bad {
                path: dir.join("machine.json"),
                what: "no positive \"reps\"".into(),
            })? as usize;
        let mut cells = BTreeMap::new();
        let mut raw = BTreeMap::new();
        let wanted = JOBS
            .iter()
            .flat_map(|j| DEVICES.iter().map(move |d| (*j, *d)))
            .chain(std::iter::once((DIRECT.1, DIRECT.0)));
        for (job, dev) in wanted {
            let runs = load_runs(dir, "raw", &format!("{dev}.{job}"), reps, &mut raw)?;
            cells.insert((job.to_string(), dev.to_string()), Cell::of(&runs));
        }
        let scale = Scale::load(dir, reps, &mut raw)?;
        let (copy_ours, copy_nbdcopy) = load_copy(dir, reps)?;
        Ok(Matrix {
            machine,
            reps,
            cells,
            scale,
            copy_ours,
            copy_nbdcopy,
            raw,
        })
    }

    pub fn cell(&self, job: &str, dev: &str) -> &Cell {
        // load() guarantees every (job, device) of the tables; this is a programming error.
        #[allow(clippy::expect_used)]
        self.cells
            .get(&(job.to_string(), dev.to_string()))
            .expect("every cell is loaded")
    }

    /// Median IOPS of `dev` over median IOPS of `base` on `job`.
    pub fn iops_ratio(&self, job: &str, dev: &str, base: &str) -> f64 {
        self.cell(job, dev).iops.median / self.cell(job, base).iops.median
    }

    pub fn to_json(&self, stamp: &str, host: &str) -> Value {
        let mut results: BTreeMap<&str, BTreeMap<&str, Value>> = BTreeMap::new();
        for ((job, dev), c) in &self.cells {
            results.entry(job).or_default().insert(
                dev,
                json!({
                    "iops": c.iops.to_json(),
                    "mb_s": c.mb_s.to_json(),
                    "lat_mean_us": c.lat_mean_us.to_json(),
                    "p99_us": c.p99_us.to_json(),
                }),
            );
        }
        let list =
            |t: Vec<targets::Target>| t.iter().map(targets::Target::to_json).collect::<Vec<_>>();
        json!({
            "stamp": stamp,
            "host": host,
            "machine": self.machine,
            "devices": DEVICES,
            "jobs": JOBS,
            "rules": { "submitters": SUBMITTER_RULE, "met": MET_RULE },
            "results": results,
            "scale": self.scale.to_json(),
            "copy_mb_s": { "ublk-mirror": self.copy_ours.to_json(), "nbdcopy": self.copy_nbdcopy.to_json() },
            "targets": list(targets::issue13(self)),
            "earlier_targets": list(targets::issue7(self)),
            "raw_fio": self.raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    #[test]
    fn median_min_max_and_reps_in_rep_order() {
        let s = Stat::of(vec![5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(s.reps, [5.0, 1.0, 3.0], "rep order, not sorted");
        assert_eq!(Stat::of(vec![4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert!(Stat::of(vec![]).median.is_nan());
    }

    #[test]
    fn an_incomplete_matrix_is_refused() {
        let dir = std::env::temp_dir().join(format!("bench-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("raw")).expect("mkdir");
        std::fs::write(dir.join("machine.json"), r#"{"reps": 2}"#).expect("write");
        let err = Matrix::load(&dir).err().expect("must fail");
        assert!(matches!(err, MatrixError::Missing(_)), "{err}");
        assert!(err.to_string().contains("loop.randread-4k-qd32.1.json"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_complete_matrix_loads_with_every_device_and_the_scale_row() {
        let dir = testdata::complete("load");
        let m = Matrix::load(&dir).expect("load");
        assert_eq!(m.reps, testdata::REPS);
        for dev in ["mirrored-q2", "dm-raid1-c2", "mirrored-bitmap"] {
            assert!(m.cell("write-1m-qd8", dev).iops.median > 0.0, "{dev}");
        }
        assert_eq!(m.scale.devices, 16);
        assert_eq!(m.scale.idle_kb.len(), 16);
        assert_eq!(m.scale.bound_mib(), 64.0, "1 queue x 128 tags x 512 KiB");
        assert!(m.raw.contains_key("scale/all.3.json"));
        let (lone, lall) = m.scale.loop_ref.as_ref().expect("the loop reference");
        assert_eq!((lone.iops.median, lall.iops.median), (50_000.0, 40_000.0));
        assert!(m.raw.contains_key("mirrored-q2.randread-4k-qd32.1.json"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The matrix of `testdata::complete` without `file`: must fail naming it.
    fn refused_without(file: &str) -> String {
        let dir = testdata::complete(&format!("without-{}", file.replace('/', "-")));
        std::fs::remove_file(dir.join(file)).expect("remove");
        let err = Matrix::load(&dir)
            .err()
            .expect("an incomplete matrix must fail");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        err.to_string()
    }

    #[test]
    fn every_new_device_and_the_scale_row_are_required() {
        for file in [
            "raw/mirrored-q2.randwrite-4k-qd1.2.json",
            "raw/dm-raid1-c2.write-1m-qd8.3.json",
            "raw/mirrored-bitmap.randrw-64k-qd16.1.json",
            "raw/ublk-q2.randread-4k-qd32.1.json",
            "raw/nbd-direct.randwrite-4k-qd1.2.json",
            "scale/one.1.json",
            "scale/all.3.json",
            "scale/rss.json",
            "scale/loop-one.2.json",
            "scale/loop-all.3.json",
        ] {
            let err = refused_without(file);
            assert!(err.contains("incomplete"), "{file}: {err}");
            assert!(err.contains(file), "{file}: {err}");
        }
    }

    #[test]
    fn an_rss_list_short_of_a_daemon_is_refused() {
        let dir = testdata::complete("short-rss");
        testdata::write_rss(&dir, 16, 15);
        let err = Matrix::load(&dir).err().expect("must fail").to_string();
        assert!(err.contains("15 entries for 16 daemons"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
