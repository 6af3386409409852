//! The reports: `info`, `stats` (with its `mirror` and `copy` parts) and `dirty-map`, built as
//! the typed replies of `control::protocol::replies` (which `ublk-mirror-ctl` parses), so the
//! daemon and its clients cannot disagree on a key. Their keys are the protocol (pinned by the
//! golden tests): every key stays, `null` ones too.

use std::sync::atomic::Ordering;

use control::protocol::{
    ByteOps, CopyReport, CountOps, DirtyMapReply, FdReceiverReport, InfoReply, MirrorAttached,
    MirrorOff, MirrorReport, OpsReport, StatsReply, WriteOps,
};
use nbd_proxy::proto::tx_flags;
use serde_json::Value;

use crate::ctl::DeviceInfo;
use crate::daemon::Daemon;
use crate::lock::lock;
use crate::mirror::copy::CopyJob;
use crate::mirror::link::Mirror;

/// A typed reply as the `result` value (serializing these plain structs cannot fail).
fn value(reply: impl serde::Serialize) -> Value {
    serde_json::to_value(reply).unwrap_or(Value::Null)
}

pub(super) fn info_json(daemon: &Daemon, info: &DeviceInfo) -> Value {
    value(InfoReply {
        device: info.bdev.clone(),
        dev_id: info.dev_id,
        size: daemon.device.dev_size,
        image: daemon.device.image_path().display().to_string(),
        image_open: daemon.device.image_is_open(),
        queues: info.queues,
        depth: info.depth,
        max_io_bytes: info.max_io_bytes,
        logical_block_size: daemon.device.logical_block,
        state: daemon.device.state().name().to_string(),
        label: daemon.label.clone(),
        pid: std::process::id(),
    })
}

pub(super) fn dirty_map_json(daemon: &Daemon) -> Value {
    let dirty = &daemon.io.dirty;
    value(DirtyMapReply {
        granularity: dirty.granule(),
        dirty_bytes: dirty.dirty_bytes(),
        extents: dirty.extents().into_iter().map(|(o, l)| [o, l]).collect(),
    })
}

/// The names and meaning follow `tap-ctl stats` where they overlap.
pub(super) fn stats_json(daemon: &Daemon) -> Value {
    let s = daemon.io.stats.snapshot();
    value(StatsReply {
        name: daemon.label.clone(),
        state: daemon.device.state().name().to_string(),
        reqs_outstanding: s.outstanding,
        reqs_parked: s.parked,
        nbd_mirror_failed: u8::from(daemon.mirror_failed()),
        ops: OpsReport {
            read: ByteOps {
                count: s.reads,
                bytes: s.read_bytes,
            },
            write: WriteOps {
                count: s.writes,
                bytes: s.write_bytes,
                fua: s.fua_writes,
            },
            flush: CountOps { count: s.flushes },
            discard: ByteOps {
                count: s.discards,
                bytes: s.discard_bytes,
            },
            write_zeroes: ByteOps {
                count: s.write_zeroes,
                bytes: s.write_zeroes_bytes,
            },
            errors: s.errors,
        },
        mirror: mirror_report(daemon),
        fd_receiver: daemon.fd_receiver.get().map(|(path, c)| FdReceiverReport {
            socket: path.display().to_string(),
            received: c.received.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }),
    })
}

pub(super) fn mirror_report(daemon: &Daemon) -> MirrorReport {
    let requested = lock(&daemon.mirroring.request).clone();
    let dirty = &daemon.io.dirty;
    let Some(m) = daemon.io.mirror() else {
        // After a recovery from a daemon that was mirroring, or an unpause whose target could
        // not be opened: failed, until mirror-start/stop.
        let failure = daemon.mirroring.unlinked_failure();
        return MirrorReport::Off(MirrorOff {
            state: if failure.is_some() { "failed" } else { "off" }.to_string(),
            requested,
            target: None,
            in_flight: 0,
            ops: 0,
            bytes_mirrored: 0,
            last_error: failure,
            dirty_bytes: dirty.dirty_bytes(),
            bitmap_persistent: dirty.persistent(),
            activity_log_extents: dirty.activity_extents() as u64,
        });
    };
    MirrorReport::Attached(Box::new(attached_report(daemon, &m, requested)))
}

fn attached_report(daemon: &Daemon, m: &Mirror, requested: Option<String>) -> MirrorAttached {
    let dirty = &daemon.io.dirty;
    let failure = m.failure();
    let (log_waits, log_writes) = daemon.io.stats.log_waits_and_writes();
    MirrorAttached {
        state: m.state().name().to_string(),
        requested,
        target: m.name.clone(),
        targets: m.names(),
        connections: m.connections().len() as u64,
        export: m.export.name.clone(),
        export_size: m.export.size,
        durable: m.export.has(tx_flags::SEND_FLUSH),
        timeout: m.timeout.map(|t| t.as_secs_f64()),
        in_flight: m.in_flight(),
        ops: m.ops.load(Ordering::Relaxed),
        bytes_mirrored: m.bytes.load(Ordering::Relaxed),
        last_error: failure.as_ref().map(|f| f.0.clone()),
        failed_at: failure
            .as_ref()
            .and_then(|f| f.1.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64()),
        dirty_bytes: dirty.dirty_bytes(),
        bitmap_persistent: dirty.persistent(),
        activity_log_extents: dirty.activity_extents() as u64,
        activity_log_bound: dirty.al_bound() as u64,
        activity_log_writes: dirty.al_writes.load(Ordering::Relaxed) + log_writes,
        activity_log_waits: log_waits,
        activity_log_retired: dirty.al_retired.load(Ordering::Relaxed),
        range_locks: daemon.io.ranges.len() as u64,
        copy: daemon.mirroring.copy.load_full().map(|j| copy_report(&j)),
    }
}

pub(super) fn copy_report(job: &CopyJob) -> CopyReport {
    let done = job.bytes_done();
    let rate = job.rate();
    let left = job.bytes_total.saturating_sub(done);
    CopyReport {
        kind: job.kind.name().to_string(),
        state: job.state().name().to_string(),
        bytes_done: done,
        bytes_total: job.bytes_total,
        rate: rate.round(),
        eta: (rate > 0.0).then(|| (left as f64 / rate).round()),
        elapsed: job.elapsed().as_secs_f64(),
        speed_limit: job.speed(),
        paused: job.paused(),
    }
}

pub(super) fn copy_json(job: &CopyJob) -> Value {
    value(copy_report(job))
}
