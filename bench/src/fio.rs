//! The figures we take from one fio JSON run.

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum FioError {
    #[error("no JSON object in the output")]
    NoJson,
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("fio reported error {0}")]
    Failed(i64),
}

/// One run, both directions summed (randrw) or the active one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub iops: f64,
    pub mb_s: f64,
    /// Mean total latency of the busier direction, microseconds.
    pub lat_mean_us: f64,
    /// 99th percentile completion latency, the worse of both directions, microseconds.
    pub p99_us: f64,
}

/// Parses fio's `--output-format=json`. Text before the JSON (fio's nbd engine prints a line)
/// is skipped.
pub fn parse(text: &str) -> Result<Run, FioError> {
    let start = text.find('{').ok_or(FioError::NoJson)?;
    let v: Value = serde_json::from_str(&text[start..])?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or(FioError::Missing("jobs[0]"))?;
    let err = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    if err != 0 {
        return Err(FioError::Failed(err));
    }
    let dir = |name: &'static str| job.get(name).ok_or(FioError::Missing(name));
    let (r, w) = (dir("read")?, dir("write")?);
    let num = |d: &Value, path: &[&str]| -> f64 {
        path.iter()
            .try_fold(d, |d, k| d.get(*k))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let (ri, wi) = (num(r, &["iops"]), num(w, &["iops"]));
    let busier = if wi >= ri { w } else { r };
    let p99 = |d: &Value| num(d, &["clat_ns", "percentile", "99.000000"]);
    Ok(Run {
        iops: ri + wi,
        mb_s: (num(r, &["bw_bytes"]) + num(w, &["bw_bytes"])) / 1e6,
        lat_mean_us: num(busier, &["lat_ns", "mean"]) / 1e3,
        p99_us: p99(r).max(p99(w)) / 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(read_iops: f64, write_iops: f64, err: i64) -> String {
        format!(
            r#"fio: connected to NBD server
{{"jobs": [{{"error": {err},
  "read": {{"iops": {read_iops}, "bw_bytes": 4096000, "lat_ns": {{"mean": 2000.0}},
            "clat_ns": {{"percentile": {{"99.000000": 9000}}}}}},
  "write": {{"iops": {write_iops}, "bw_bytes": 1000000, "lat_ns": {{"mean": 5000.0}},
             "clat_ns": {{"percentile": {{"99.000000": 7000}}}}}}}}]}}"#
        )
    }

    #[test]
    fn sums_directions_and_takes_the_worse_p99() {
        let r = parse(&sample(1000.0, 250.0, 0)).expect("parse");
        assert_eq!(r.iops, 1250.0);
        assert!((r.mb_s - 5.096).abs() < 1e-9);
        assert_eq!(r.lat_mean_us, 2.0, "the busier direction is read");
        assert_eq!(r.p99_us, 9.0);
    }

    #[test]
    fn refuses_failed_or_broken_runs() {
        assert!(matches!(
            parse(&sample(1.0, 1.0, 5)),
            Err(FioError::Failed(5))
        ));
        assert!(matches!(parse("fio: error"), Err(FioError::NoJson)));
        assert!(matches!(parse("{\"jobs\": []}"), Err(FioError::Missing(_))));
    }
}
