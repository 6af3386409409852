//! The performance targets, each with its figure, its per-rep figures and the rule that says
//! whether it is met: the figure meets the goal and at least ceil(0.8 × R) of the R per-rep
//! figures do (`crate::MET_RULE`).

use serde_json::{json, Value};

use crate::matrix::{Matrix, Stat};
use crate::{DIRECT, JOBS, MIRROR_PAIRS, WRITE_JOBS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// figure >= bound
    AtLeast,
    /// figure <= bound
    AtMost,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    /// The ratio of the medians, or the median of the samples (RSS).
    pub figure: f64,
    /// The same figure per rep (rep i of A / rep i of B), or per daemon (RSS).
    pub samples: Vec<f64>,
    pub goal: Goal,
    pub bound: f64,
    pub stretch: Option<f64>,
    /// Appended to the figures when printed: "" for ratios, " MiB".
    pub unit: &'static str,
}

/// Samples of R that must meet a bound: ceil(0.8 × R), 4 of 5.
pub fn needed(r: usize) -> usize {
    (4 * r).div_ceil(5)
}

impl Target {
    /// `a / b` on their medians, per rep on their reps in rep order.
    pub fn ratio(what: String, a: &Stat, b: &Stat, bound: f64, stretch: Option<f64>) -> Target {
        Target {
            what,
            figure: a.median / b.median,
            samples: a.reps.iter().zip(&b.reps).map(|(x, y)| x / y).collect(),
            goal: Goal::AtLeast,
            bound,
            stretch,
            unit: "",
        }
    }

    fn meets(&self, v: f64, bound: f64) -> bool {
        match self.goal {
            Goal::AtLeast => v >= bound,
            Goal::AtMost => v <= bound,
        }
    }

    /// How many samples meet `bound`.
    pub fn meeting(&self, bound: f64) -> usize {
        self.samples
            .iter()
            .filter(|&&v| self.meets(v, bound))
            .count()
    }

    /// The figure meets `bound` and enough samples do.
    pub fn met_at(&self, bound: f64) -> bool {
        self.meets(self.figure, bound) && self.meeting(bound) >= needed(self.samples.len())
    }

    pub fn met(&self) -> bool {
        self.met_at(self.bound)
    }

    pub fn stretch_met(&self) -> Option<bool> {
        self.stretch.map(|s| self.met_at(s))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "what": self.what, "figure": self.figure, "samples": self.samples,
            "goal": match self.goal { Goal::AtLeast => ">=", Goal::AtMost => "<=" },
            "target": self.bound, "stretch": self.stretch, "unit": self.unit.trim(),
            "samples_meeting": self.meeting(self.bound), "samples_needed": needed(self.samples.len()),
            "met": self.met(), "stretch_met": self.stretch_met(),
        })
    }
}

fn iops<'m>(m: &'m Matrix, job: &str, dev: &str) -> &'m Stat {
    &m.cell(job, dev).iops
}

fn ratio(m: &Matrix, job: &str, (a, b): (&str, &str), bound: f64, stretch: Option<f64>) -> Target {
    Target::ratio(
        format!("{a} / {b}, {job}"),
        iops(m, job, a),
        iops(m, job, b),
        bound,
        stretch,
    )
}

/// Mean QD1 write latency of `mirrored` over the larger of unmirrored ublk's and the target's
/// own, per rep on the reps of each.
fn latency(m: &Matrix) -> Target {
    let lat = |dev| &m.cell(DIRECT.1, dev).lat_mean_us;
    let (mir, ublk, direct) = (lat("mirrored"), lat("ublk"), lat(DIRECT.0));
    let samples = mir
        .reps
        .iter()
        .zip(&ublk.reps)
        .zip(&direct.reps)
        .map(|((m, u), d)| m / u.max(*d))
        .collect();
    Target {
        what: format!(
            "mirrored {} mean latency / max(ublk, {}) mean latency",
            DIRECT.1, DIRECT.0
        ),
        figure: mir.median / ublk.median.max(direct.median),
        samples,
        goal: Goal::AtMost,
        bound: 1.3,
        stretch: Some(1.15),
        unit: "",
    }
}

/// Idle RSS of a daemon right after start, MiB: the median over the scale row's daemons.
fn idle_rss(m: &Matrix) -> Target {
    let mib: Vec<f64> = m.scale.idle_kb.iter().map(|kb| kb / 1024.0).collect();
    Target {
        what: format!(
            "RSS of an idle daemon right after start (median of {})",
            mib.len()
        ),
        figure: Stat::of(mib.clone()).median,
        samples: mib,
        goal: Goal::AtMost,
        bound: 10.0,
        stretch: Some(6.0),
        unit: " MiB",
    }
}

/// Every row of issue 13's targets table, in its order.
pub fn issue13(m: &Matrix) -> Vec<Target> {
    let mut t = Vec::new();
    for &pair in MIRROR_PAIRS {
        for job in ["randwrite-4k-qd1", "randwrite-4k-qd32"] {
            t.push(ratio(m, job, pair, 1.2, Some(1.5)));
        }
        for job in ["randrw-64k-qd16", "write-1m-qd8"] {
            t.push(ratio(m, job, pair, 1.0, Some(1.2)));
        }
    }
    t.push(latency(m));
    for pair in [("ublk-q2", "ublk"), ("mirrored-q2", "mirrored")] {
        for job in JOBS {
            t.push(ratio(m, job, pair, 1.0, Some(1.5)));
        }
    }
    for job in WRITE_JOBS {
        t.push(ratio(
            m,
            job,
            ("mirrored-bitmap", "mirrored"),
            0.95,
            Some(1.0),
        ));
    }
    for job in JOBS {
        t.push(ratio(m, job, ("ublk", "rublk"), 1.0, Some(1.1)));
    }
    let s = &m.scale;
    t.push(Target::ratio(
        format!(
            "{} devices aggregate / 1 device, 4k randread QD32",
            s.devices
        ),
        &s.all.iops,
        &s.one.iops,
        0.9,
        Some(1.0),
    ));
    t.push(idle_rss(m));
    let mut guard = ratio(m, "randread-4k-qd32", ("mirrored", "ublk"), 0.95, None);
    guard.what = format!("guard: {}", guard.what);
    t.push(guard);
    t
}

/// Issue 7's targets that issue 13 does not restate.
pub fn issue7(m: &Matrix) -> Vec<Target> {
    let mut t = Vec::new();
    for job in ["randread-4k-qd32", "randwrite-4k-qd32"] {
        t.push(ratio(m, job, ("ublk", "loop"), 0.95, None));
    }
    t.push(ratio(m, "write-1m-qd8", ("ublk", "loop"), 0.45, None));
    t.push(ratio(m, "write-1m-qd8", ("ublk", "rublk"), 2.0, None));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_least(figure: f64, samples: &[f64]) -> Target {
        Target {
            what: "t".into(),
            figure,
            samples: samples.to_vec(),
            goal: Goal::AtLeast,
            bound: 1.2,
            stretch: Some(1.5),
            unit: "",
        }
    }

    #[test]
    fn needed_is_four_fifths_rounded_up() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 10, 16].into_iter().map(needed).collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 4, 8, 13]);
    }

    #[test]
    fn the_median_meeting_is_not_enough_without_four_of_five_reps() {
        let t = at_least(1.25, &[1.3, 1.25, 1.21, 1.1, 1.0]);
        assert_eq!(t.meeting(1.2), 3);
        assert!(!t.met(), "3 of 5 reps: not met");
        let t = at_least(1.25, &[1.3, 1.25, 1.21, 1.2, 1.0]);
        assert_eq!(t.meeting(1.2), 4);
        assert!(t.met(), "4 of 5 reps, the bound itself included: met");
    }

    #[test]
    fn every_rep_meeting_is_not_enough_without_the_median() {
        let t = at_least(1.19, &[1.3; 5]);
        assert!(!t.met());
        assert!(!at_least(f64::NAN, &[1.3; 5]).met(), "NaN never meets");
    }

    #[test]
    fn stretch_and_at_most_follow_the_same_rule() {
        let t = at_least(1.6, &[1.6, 1.7, 1.55, 1.4, 1.6]);
        assert!(t.met());
        assert_eq!(t.stretch_met(), Some(true));
        let t = at_least(1.6, &[1.6, 1.7, 1.4, 1.4, 1.6]);
        assert_eq!(t.stretch_met(), Some(false), "3 of 5 reach the stretch");
        let mut t = at_least(5.0, &[4.0, 5.0, 6.0, 5.5, 9.0]);
        t.goal = Goal::AtMost;
        t.bound = 10.0;
        t.stretch = Some(6.0);
        assert!(t.met());
        assert_eq!(t.stretch_met(), Some(true), "4 of 5 at most 6");
        t.samples[3] = 6.5;
        assert_eq!(t.stretch_met(), Some(false));
        t.stretch = None;
        assert_eq!(t.stretch_met(), None);
    }

    #[test]
    fn a_ratio_pairs_reps_in_rep_order() {
        let a = Stat::of(vec![10.0, 30.0, 20.0]);
        let b = Stat::of(vec![10.0, 10.0, 40.0]);
        let t = Target::ratio("a / b".into(), &a, &b, 1.0, None);
        assert_eq!(t.samples, [1.0, 3.0, 0.5]);
        assert_eq!(t.figure, 2.0, "median 20 over median 10");
        assert!(!t.met(), "1 and 3 meet, 0.5 does not: 2 of 3, need 3");
    }

    #[test]
    fn every_row_of_issue_13_is_there() {
        let dir = crate::testdata::complete("targets-rows");
        let m = Matrix::load(&dir).expect("load");
        let t = issue13(&m);
        assert_eq!(t.len(), 8 + 1 + 10 + 4 + 5 + 1 + 1 + 1);
        for want in [
            "mirrored / dm-raid1, randwrite-4k-qd1",
            "mirrored-q2 / dm-raid1-c2, write-1m-qd8",
            "mirrored randwrite-4k-qd1 mean latency / max(ublk, nbd-direct) mean latency",
            "ublk-q2 / ublk, randread-4k-qd32",
            "mirrored-q2 / mirrored, write-1m-qd8",
            "mirrored-bitmap / mirrored, randrw-64k-qd16",
            "ublk / rublk, randwrite-4k-qd1",
            "16 devices aggregate / 1 device, 4k randread QD32",
            "RSS of an idle daemon right after start (median of 16)",
            "guard: mirrored / ublk, randread-4k-qd32",
        ] {
            assert!(t.iter().any(|t| t.what == want), "no target {want:?}");
        }
        assert!(
            !t.iter()
                .any(|t| t.what.contains("mirrored-bitmap") && t.what.contains("randread")),
            "mirrored-bitmap is held to write jobs only"
        );
        assert!(t.iter().all(|t| t.samples.len() == 3 || t.unit == " MiB"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
