//! The scale row: N one-queue daemons serving 4k randread QD32 at once against one of them
//! alone, and the RSS of every daemon right after start and after the workload
//! (`scale/one.<rep>.json`, `scale/all.<rep>.json`, `scale/rss.json`), and the same two runs
//! on kernel loop devices over the same images (`scale/loop-one.<rep>.json`,
//! `scale/loop-all.<rep>.json`): the kernel's own per-device cost at the same load.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::matrix::{json_file, load_runs, Cell, MatrixError};

pub struct Scale {
    /// How many daemons ran at once.
    pub devices: usize,
    pub image_mib: u64,
    /// Each daemon's queues, depth and largest request: the bound of its tag buffers.
    pub queues: u64,
    pub depth: u64,
    pub max_io: u64,
    /// One device alone, and all of them at once (fio's sum over its jobs).
    pub one: Cell,
    pub all: Cell,
    /// The same on kernel loop devices (one alone, all at once); absent in older runs.
    pub loop_ref: Option<(Cell, Cell)>,
    /// VmRSS of each daemon right after it was ready, and after the last rep, KiB.
    pub idle_kb: Vec<f64>,
    pub after_kb: Vec<f64>,
}

fn field(v: &Value, key: &str, path: &Path) -> Result<u64, MatrixError> {
    v[key]
        .as_u64()
        .filter(|&n| n > 0)
        .ok_or_else(|| MatrixError::Bad {
            path: path.to_owned(),
            what: format!("no positive \"{key}\""),
        })
}

/// `key`: one positive number per daemon.
fn per_daemon(v: &Value, key: &str, n: usize, path: &Path) -> Result<Vec<f64>, MatrixError> {
    let bad = |what: String| MatrixError::Bad {
        path: path.to_owned(),
        what,
    };
    let list = v[key]
        .as_array()
        .ok_or_else(|| bad(format!("no \"{key}\" list")))?;
    if list.len() != n {
        return Err(bad(format!(
            "\"{key}\" has {} entries for {n} daemons",
            list.len()
        )));
    }
    list.iter()
        .map(|x| x.as_f64().filter(|&kb| kb > 0.0))
        .collect::<Option<Vec<f64>>>()
        .ok_or_else(|| {
            bad(format!(
                "\"{key}\" holds a value that is not a positive number"
            ))
        })
}

impl Scale {
    /// Loads `dir/scale`; every rep of both runs and the RSS of every daemon must be there.
    /// The raw fio output goes into `raw` as `scale/<name>`.
    pub fn load(
        dir: &Path,
        reps: usize,
        raw: &mut BTreeMap<String, Value>,
    ) -> Result<Scale, MatrixError> {
        let path = dir.join("scale").join("rss.json");
        if !path.exists() {
            return Err(MatrixError::Missing("no scale/rss.json".into()));
        }
        let v = json_file(&path)?;
        let devices = field(&v, "devices", &path)? as usize;
        let one = load_runs(dir, "scale", "one", reps, raw)?;
        let all = load_runs(dir, "scale", "all", reps, raw)?;
        let loop_ref = if dir.join("scale").join("loop-one.1.json").exists() {
            let one = load_runs(dir, "scale", "loop-one", reps, raw)?;
            let all = load_runs(dir, "scale", "loop-all", reps, raw)?;
            Some((Cell::of(&one), Cell::of(&all)))
        } else {
            None
        };
        Ok(Scale {
            devices,
            image_mib: field(&v, "image_mib", &path)?,
            queues: field(&v, "queues", &path)?,
            depth: field(&v, "depth", &path)?,
            max_io: field(&v, "max_io", &path)?,
            one: Cell::of(&one),
            all: Cell::of(&all),
            loop_ref,
            idle_kb: per_daemon(&v, "idle_kb", devices, &path)?,
            after_kb: per_daemon(&v, "after_kb", devices, &path)?,
        })
    }

    /// What the tag buffers can keep resident: every tag's buffer touched, MiB.
    pub fn bound_mib(&self) -> f64 {
        (self.queues * self.depth * self.max_io) as f64 / 1048576.0
    }

    pub fn to_json(&self) -> Value {
        json!({
            "devices": self.devices, "image_mib": self.image_mib, "queues": self.queues,
            "depth": self.depth, "max_io": self.max_io,
            "one_iops": self.one.iops.to_json(), "all_iops": self.all.iops.to_json(),
            "loop_one_iops": self.loop_ref.as_ref().map(|(one, _)| one.iops.to_json()),
            "loop_all_iops": self.loop_ref.as_ref().map(|(_, all)| all.iops.to_json()),
            "idle_rss_kb": self.idle_kb, "after_rss_kb": self.after_kb,
            "tag_buffer_bound_mib": self.bound_mib(),
        })
    }
}
