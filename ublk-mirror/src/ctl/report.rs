//! The JSON reports: `info`, `stats` (with its `mirror` and `copy` parts) and `dirty-map`.
//! Their keys are the protocol (pinned by the golden tests): every key stays, `null` ones too.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;
use crate::lock::lock;
use crate::mirror::copy::CopyJob;

pub(super) fn info_json(daemon: &Daemon, info: &DeviceInfo) -> Value {
    json!({
        "device": info.bdev,
        "dev_id": info.dev_id,
        "size": daemon.device.dev_size,
        "image": daemon.device.image_path().display().to_string(),
        "image_open": daemon.device.image_is_open(),
        "queues": info.queues,
        "depth": info.depth,
        "max_io_bytes": info.max_io_bytes,
        "logical_block_size": daemon.device.logical_block,
        "state": daemon.device.state().name(),
        "label": daemon.label,
    })
}

pub(super) fn dirty_map_json(daemon: &Daemon) -> Value {
    let extents: Vec<Value> = daemon
        .io
        .dirty
        .extents()
        .into_iter()
        .map(|(o, l)| json!([o, l]))
        .collect();
    json!({
        "granularity": daemon.io.dirty.granule(),
        "dirty_bytes": daemon.io.dirty.dirty_bytes(),
        "extents": extents,
    })
}

/// The names and meaning follow `tap-ctl stats` where they overlap.
pub(super) fn stats_json(daemon: &Daemon) -> Value {
    let s = daemon.io.stats.snapshot();
    json!({
        "name": daemon.label,
        "state": daemon.device.state().name(),
        "reqs_outstanding": s.outstanding,
        "reqs_parked": s.parked,
        "nbd_mirror_failed": u8::from(daemon.mirror_failed()),
        "ops": {
            "read": { "count": s.reads, "bytes": s.read_bytes },
            "write": { "count": s.writes, "bytes": s.write_bytes, "fua": s.fua_writes },
            "flush": { "count": s.flushes },
            "discard": { "count": s.discards, "bytes": s.discard_bytes },
            "write_zeroes": { "count": s.write_zeroes, "bytes": s.write_zeroes_bytes },
            "errors": s.errors,
        },
        "mirror": mirror_json(daemon),
    })
}

fn mirror_json(daemon: &Daemon) -> Value {
    let requested = lock(&daemon.mirroring.request).clone();
    let Some(m) = daemon.io.mirror.load_full() else {
        // After a recovery from a daemon that was mirroring: failed, until mirror-start/stop.
        let inherited = daemon.mirroring.inherited_failure();
        return json!({ "state": if inherited.is_some() { "failed" } else { "off" },
                       "requested": requested, "target": Value::Null,
                       "in_flight": 0, "ops": 0, "bytes_mirrored": 0, "last_error": inherited,
                       "dirty_bytes": daemon.io.dirty.dirty_bytes(),
                       "bitmap_persistent": daemon.io.dirty.persistent(),
                       "activity_log_extents": daemon.io.dirty.activity_extents() });
    };
    let failure = m.failure();
    let (log_waits, log_writes) = daemon.io.stats.log_waits_and_writes();
    json!({
        "state": m.state().name(),
        "requested": requested,
        "target": m.name,
        "targets": m.names(),
        "connections": m.connections().len(),
        "export": m.export.name,
        "export_size": m.export.size,
        "timeout": m.timeout.map(|t| t.as_secs_f64()),
        "in_flight": m.in_flight(),
        "ops": m.ops.load(Ordering::Relaxed),
        "bytes_mirrored": m.bytes.load(Ordering::Relaxed),
        "last_error": failure.as_ref().map(|f| f.0.clone()),
        "failed_at": failure.as_ref().and_then(|f| f.1.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
        "dirty_bytes": daemon.io.dirty.dirty_bytes(),
        "bitmap_persistent": daemon.io.dirty.persistent(),
        "activity_log_extents": daemon.io.dirty.activity_extents(),
        "activity_log_bound": daemon.io.dirty.al_bound(),
        "activity_log_writes": daemon.io.dirty.al_writes.load(Ordering::Relaxed) + log_writes,
        "activity_log_waits": log_waits,
        "activity_log_retired": daemon.io.dirty.al_retired.load(Ordering::Relaxed),
        "range_locks": daemon.io.ranges.len(),
        "copy": daemon.mirroring.copy.load_full().map(|j| copy_json(&j)),
    })
}

pub(super) fn copy_json(job: &CopyJob) -> Value {
    let done = job.bytes_done();
    let rate = job.rate();
    let left = job.bytes_total.saturating_sub(done);
    json!({
        "kind": job.kind.name(),
        "state": job.state().name(),
        "bytes_done": done,
        "bytes_total": job.bytes_total,
        "rate": rate.round(),
        "eta": if rate > 0.0 { Some((left as f64 / rate).round()) } else { None },
        "elapsed": job.elapsed().as_secs_f64(),
        "speed_limit": job.speed,
    })
}
