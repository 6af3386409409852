//! The whole matrix: every run loaded, completeness checked, medians and ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::fio::{self, Run};
use crate::{DEVICES, DIRECT, JOBS};

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
    pub reps: Vec<f64>,
}

impl Stat {
    pub fn of(mut reps: Vec<f64>) -> Stat {
        reps.sort_by(f64::total_cmp);
        let n = reps.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => reps[n / 2],
            _ => (reps[n / 2 - 1] + reps[n / 2]) / 2.0,
        };
        Stat {
            median,
            min: reps.first().copied().unwrap_or(f64::NAN),
            max: reps.last().copied().unwrap_or(f64::NAN),
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
    fn of(runs: &[Run]) -> Cell {
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

fn json_file(path: &Path) -> Result<Value, MatrixError> {
    let text = read(path)?;
    let start = text.find('{').unwrap_or(0);
    serde_json::from_str(&text[start..]).map_err(|e| MatrixError::Bad {
        path: path.to_owned(),
        what: format!("invalid JSON: {e}"),
    })
}

impl Matrix {
    /// Loads `dir` as written by bench-matrix.sh; every device, job and rep must be there.
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
            let mut runs = Vec::with_capacity(reps);
            for rep in 1..=reps {
                let name = format!("{dev}.{job}.{rep}.json");
                let path = dir.join("raw").join(&name);
                if !path.exists() {
                    return Err(MatrixError::Missing(format!("no run raw/{name}")));
                }
                let text = read(&path)?;
                runs.push(fio::parse(&text).map_err(|source| MatrixError::Fio {
                    path: path.clone(),
                    source,
                })?);
                raw.insert(name, json_file(&path)?);
            }
            cells.insert((job.to_string(), dev.to_string()), Cell::of(&runs));
        }
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for rep in 1..=reps {
            let p = dir.join("copy").join(format!("ublk-mirror.{rep}.json"));
            let v = json_file(&p)?;
            let copy = &v["mirror"]["copy"];
            let (Some(total), Some(secs)) =
                (copy["bytes_total"].as_f64(), copy["elapsed"].as_f64())
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
        Ok(Matrix {
            machine,
            reps,
            cells,
            copy_ours: Stat::of(ours),
            copy_nbdcopy: Stat::of(theirs),
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

    /// The issue's performance targets, each with what was measured.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        for job in ["randread-4k-qd32", "randwrite-4k-qd32"] {
            t.push(Target::at_least(
                format!("ublk / loop, {job}"),
                self.iops_ratio(job, "ublk", "loop"),
                0.95,
            ));
        }
        t.push(Target::at_least(
            "ublk / loop, write-1m-qd8".into(),
            self.iops_ratio("write-1m-qd8", "ublk", "loop"),
            0.45,
        ));
        t.push(Target::at_least(
            "ublk / rublk, write-1m-qd8".into(),
            self.iops_ratio("write-1m-qd8", "ublk", "rublk"),
            2.0,
        ));
        for job in JOBS {
            t.push(Target::at_least(
                format!("ublk / rublk, {job}"),
                self.iops_ratio(job, "ublk", "rublk"),
                1.0,
            ));
        }
        t.push(Target::at_least(
            "mirrored / dm-raid1, randwrite-4k-qd32".into(),
            self.iops_ratio("randwrite-4k-qd32", "mirrored", "dm-raid1"),
            1.2,
        ));
        let lat = |dev| self.cell("randwrite-4k-qd1", dev).lat_mean_us.median;
        let bound = lat("ublk").max(lat(DIRECT.0));
        t.push(Target::at_most(
            "mirrored QD1 write latency / max(ublk, nbd-direct)".into(),
            lat("mirrored") / bound,
            1.15,
        ));
        t
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
        json!({
            "stamp": stamp,
            "host": host,
            "machine": self.machine,
            "devices": DEVICES,
            "jobs": JOBS,
            "results": results,
            "copy_mb_s": { "ublk-mirror": self.copy_ours.to_json(), "nbdcopy": self.copy_nbdcopy.to_json() },
            "targets": self.targets().iter().map(|t| json!({
                "what": t.what, "measured": t.measured, "goal": t.goal,
                "at_least": t.at_least, "met": t.met(),
            })).collect::<Vec<_>>(),
            "raw_fio": self.raw,
        })
    }
}

pub struct Target {
    pub what: String,
    pub measured: f64,
    pub goal: f64,
    /// true: measured >= goal; false: measured <= goal.
    pub at_least: bool,
}

impl Target {
    fn at_least(what: String, measured: f64, goal: f64) -> Target {
        Target {
            what,
            measured,
            goal,
            at_least: true,
        }
    }
    fn at_most(what: String, measured: f64, goal: f64) -> Target {
        Target {
            what,
            measured,
            goal,
            at_least: false,
        }
    }
    pub fn met(&self) -> bool {
        if self.at_least {
            self.measured >= self.goal
        } else {
            self.measured <= self.goal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stat::of(vec![5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
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
}
