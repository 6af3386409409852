//! The ublk device's life: add it, describe it to the kernel, serve it, stop it, delete it.
//!
//! Order matters for "no orphaned devices": everything that can fail because of user input is
//! checked before ADD_DEV; after ADD_DEV, the `UblkCtrl` owns the device and deletes it when
//! dropped, and a graceful stop is STOP_DEV (queues keep serving what is in flight), then the
//! queue threads end, then DEL_DEV.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use crate::ctl::socket::ControlServer;
use crate::ctl::{ControlPath, DeviceInfo};
use crate::daemon::Daemon;
use crate::datapath::queue::{run_queue, QueueContext};
use crate::datapath::stats::Snapshot;
use crate::device::placement::{place_queue_threads, QueueCpus};
use crate::device::readiness::Readiness;
use crate::lock::lock;
use crate::stop::StopReason;

pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// How the device is shaped; from the command line.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// -1: let the driver pick.
    pub dev_id: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// Take over the existing, quiesced device `dev_id` (its daemon died or detached) instead
    /// of adding one.
    pub recover: bool,
    /// Where the queue threads of a multi-queue device run.
    pub queue_cpus: QueueCpus,
}

/// Fails with instructions when this kernel has no ublk driver loaded.
pub fn check_driver() -> Result<()> {
    if Path::new(UBLK_CONTROL).exists() {
        return Ok(());
    }
    bail!(
        "the ublk driver is not loaded ({UBLK_CONTROL} is missing): run `modprobe ublk_drv` \
         (Linux 6.0 or later built with CONFIG_BLK_DEV_UBLK)"
    )
}

/// Serves the image in `shared` on a new ublk device until a stop is requested on `stop_rx`.
/// `control` says where the control socket goes (`None`: no socket). Returns the counters at
/// exit.
pub fn serve(
    daemon: Arc<Daemon>,
    cfg: &DeviceConfig,
    control: Option<ControlPath>,
    stop_rx: Receiver<StopReason>,
    readiness: Readiness,
) -> Result<Snapshot> {
    let ctrl = add_device(cfg)?;
    let dev_id = ctrl.dev_info().dev_id;
    // The socket's path may depend on the id the driver picked: bind it now, before START, so
    // a failure leaves no device behind (the ctrl's drop deletes it).
    let info = DeviceInfo {
        dev_id,
        bdev: format!("/dev/ublkb{dev_id}"),
        queues: cfg.queues,
        depth: cfg.depth,
        max_io_bytes: cfg.max_io_bytes,
    };
    let control_path = control.map(|p| p.resolve(dev_id));
    let server = match &control_path {
        Some(p) => Some(ControlServer::start(p, daemon.clone(), info.clone())?),
        None => None,
    };
    daemon.record.set_device(dev_id, control_path.clone());
    daemon.save_state();

    let init = |dev: &mut UblkDev| init_target(dev, &daemon);
    let ctx = QueueContext {
        io: daemon.io.clone(),
        stop: lock(&daemon.stop).clone(),
    };
    let queue_fn = move |qid: u16, dev: &UblkDev| run_queue(qid, dev, &ctx);
    // The device fn runs on this thread once the device is live; it blocks until a stop is
    // requested and then sends STOP_DEV, which ends the queues and so `run_target`.
    let stop_rx = Mutex::new(stop_rx);
    let on_live_daemon = daemon.clone();
    let (queues, queue_cpus) = (cfg.queues, cfg.queue_cpus);
    let on_live = move |ctrl: &UblkCtrl| {
        place_queue_threads(ctrl, queues, queue_cpus);
        on_live(ctrl, &on_live_daemon, &readiness, &stop_rx);
    };
    let run = ctrl.run_target(init, queue_fn, on_live);
    drop(server);
    // The queues are done: nothing more goes to the target; disconnect it politely.
    daemon.stop_mirror();

    if let Err(e) = daemon.device.sync_image() {
        log::error!(
            "final fdatasync of {} failed: {e}",
            daemon.device.image_path().display()
        );
    }
    let totals = daemon.io.stats.snapshot();
    // Delete even when run_target failed: an added device must not outlive its daemon.
    let del = match ctrl.del_dev() {
        // Someone else (`ublk-mirror delete --force`) deleted it first: the goal is met.
        Err(UblkError::OtherError(e)) if e == -libc::ENODEV || e == -libc::ENOENT => Ok(0),
        other => other,
    };
    run.map_err(|e| anyhow!("serving ublk device {dev_id} failed: {e}"))?;
    del.map_err(|e| anyhow!("DEL_DEV of ublk device {dev_id} failed: {e}"))?;
    daemon.record.remove();
    log::info!("ublk device {dev_id} deleted");
    Ok(totals)
}

/// ADD_DEV (or, recovering, START_USER_RECOVERY of `cfg.dev_id`): from here on the returned
/// ctrl deletes the device when dropped.
fn add_device(cfg: &DeviceConfig) -> Result<UblkCtrl> {
    if cfg.dev_id >= 0 && !cfg.recover {
        check_id_free(cfg.dev_id)?;
    }
    let lifecycle = if cfg.recover {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("ublk-mirror")
        .id(cfg.dev_id)
        .nr_queues(cfg.queues)
        .depth(cfg.depth)
        .io_buf_bytes(cfg.max_io_bytes)
        // If this daemon dies, the device stays and queues guest I/O (requests in flight are
        // reissued, not failed) until `ublk-mirror recover` takes it over.
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
        // Each queue thread on one CPU of the queue's mask: a thread that migrates between
        // CPUs pays for it on every request (QD1 write latency halved in the VM).
        .dev_flags(lifecycle | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY)
        .build()
        .map_err(|e| add_dev_error(e, cfg.dev_id))?;
    let dev_id = ctrl.dev_info().dev_id;
    if cfg.recover {
        ctrl.start_user_recover()
            .map_err(|e| anyhow!("START_USER_RECOVERY of ublk device {dev_id} failed: {e}"))?;
        log::info!("recovering ublk device {dev_id}: its previous daemon is gone");
    }
    log::info!(
        "added ublk device {dev_id} ({} queues, depth {}, max io {} bytes)",
        cfg.queues,
        cfg.depth,
        cfg.max_io_bytes
    );
    Ok(ctrl)
}

/// The device fn: runs on the serving thread once the device is live; blocks until a stop is
/// requested, then detaches (exits) or releases parked requests and sends STOP_DEV, which ends
/// the queues and so `run_target`.
fn on_live(
    ctrl: &UblkCtrl,
    daemon: &Daemon,
    readiness: &Readiness,
    stop_rx: &Mutex<Receiver<StopReason>>,
) {
    let bdev = ctrl.get_bdev_path();
    println!("{bdev}");
    log::info!("serving {bdev} [{}]", daemon.label);
    readiness.ready(&bdev);
    let reason = match stop_rx.lock() {
        Ok(rx) => rx.recv().unwrap_or(StopReason::ChannelClosed),
        Err(_) => StopReason::ChannelClosed,
    };
    if reason == StopReason::Detach {
        detach(daemon, &bdev);
    }
    log::info!("stopping {bdev}: {reason}");
    readiness.stopping();
    // Waiters requests must complete, or the kernel's teardown waits for them forever.
    daemon.release_for_stop();
    if let Err(e) = ctrl.kill_dev() {
        log::error!("STOP_DEV of {bdev} failed: {e}");
    }
}

/// `shutdown --keep`: leave the device to a successor (`ublk-mirror recover`). Drains and
/// flushes like a pause, ends an attached mirror cleanly, records the detach and exits without
/// STOP_DEV: the kernel quiesces the device, and the requests this daemon had fetched but not
/// answered (those parked by the pause) are reissued to the successor.
fn detach(daemon: &Daemon, bdev: &str) -> ! {
    log::info!("detaching from {bdev}: draining and flushing; the device stays for `recover`");
    if let Err(e) = daemon.device.pause(std::time::Duration::from_secs(30)) {
        log::warn!("detach: {e}; requests still in flight will be reissued to the successor");
    }
    let mirror = daemon.mirror_record();
    daemon.stop_mirror();
    if let Err(e) = daemon.device.sync_image() {
        log::error!("detach: final flush failed: {e}");
    }
    daemon.save_detached(mirror);
    log::info!("detached from {bdev}; exiting");
    std::process::exit(0)
}

/// Refuses an explicit device id that already exists, *before* ADD_DEV.
///
/// This is not only for a nicer message: when ADD_DEV fails, libublk 0.4.8 drops its
/// half-built control object, whose destructor sends DEL_DEV for the requested id, which
/// deletes the other daemon's live device. The check leaves a window between it and ADD_DEV
/// (two daemons started at once with the same id); orchestrators should not race on ids.
fn check_id_free(dev_id: i32) -> Result<()> {
    if Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        bail!("ublk device id {dev_id} is already in use; pick another --dev-id or omit it");
    }
    Ok(())
}

fn add_dev_error(e: UblkError, dev_id: i32) -> anyhow::Error {
    match e {
        UblkError::OtherError(errno) if errno == -libc::EEXIST => {
            anyhow!("ublk device id {dev_id} is already in use; pick another --dev-id or omit it")
        }
        UblkError::OtherError(errno) if errno == -libc::EPERM || errno == -libc::EACCES => {
            anyhow!(
                "not permitted to add a ublk device (need CAP_SYS_ADMIN): errno {}",
                -errno
            )
        }
        other => anyhow!("adding the ublk device failed: {other}"),
    }
}

/// Describes the device to the kernel: size, block sizes, cache and FUA, discard limits.
fn init_target(dev: &mut UblkDev, daemon: &Daemon) -> Result<(), UblkError> {
    let max_io_bytes = dev.dev_info.max_io_buf_bytes;
    let depth = dev.dev_info.queue_depth;
    let tgt = &mut dev.tgt;
    tgt.dev_size = daemon.device.dev_size;
    // Each tag has its ublk command and up to two target operations (local leg, and a FUA
    // or zero-write continuation) in flight, plus per ring one doorbell read and, with a
    // mirror, one send, one receive and one timeout: room for all, so nothing waits for an SQE.
    let ring = depth.saturating_mul(3).saturating_add(8);
    tgt.sq_depth = ring;
    tgt.cq_depth = ring;
    let logical_block = daemon.device.logical_block;

    let lbs_shift = logical_block.trailing_zeros() as u8;
    // Discards and write-zeroes are single fallocate calls; 1 GiB bounds one request's latency.
    let max_zero_sectors: u32 = (1 << 30) >> 9;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // A volatile cache makes the kernel send FLUSH; FUA makes it pass FUA writes
            // through instead of turning them into write + flush.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: 12.max(lbs_shift),
            io_opt_shift: 12.max(lbs_shift),
            io_min_shift: lbs_shift,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: daemon.device.dev_size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: logical_block.max(4096),
            max_discard_sectors: max_zero_sectors,
            max_write_zeroes_sectors: max_zero_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    dev.set_target_json(serde_json::json!({
        "image": daemon.device.image_path().display().to_string(),
        "label": daemon.label,
    }));
    Ok(())
}

/// Refuses, with the reason, a device `recover` cannot take over: gone, not created for
/// recovery, or still served. Waits a little for the kernel to quiesce a device whose daemon
/// just died.
pub fn check_recoverable(dev_id: u32) -> Result<()> {
    let id = i32::try_from(dev_id).context("device id out of range")?;
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        bail!(
            "cannot recover ublk device {dev_id}: it no longer exists (deleted, or the host \
             rebooted); start a new daemon with `ublk-mirror serve`"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ctrl = UblkCtrl::new_simple(id)
            .map_err(|e| anyhow!("cannot open ublk device {dev_id}: {e}"))?;
        let info = ctrl.dev_info();
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            bail!("cannot recover ublk device {dev_id}: it was not created with USER_RECOVERY");
        }
        let pid = info.ublksrv_pid;
        let alive = pid > 0 && Path::new(&format!("/proc/{pid}")).exists();
        match u32::from(info.state) {
            sys::UBLK_S_DEV_QUIESCED if !alive => return Ok(()),
            sys::UBLK_S_DEV_LIVE | sys::UBLK_S_DEV_QUIESCED if alive => bail!(
                "cannot recover ublk device {dev_id}: it is served by a running daemon (pid \
                 {pid}); stop or detach that one first"
            ),
            sys::UBLK_S_DEV_DEAD => bail!(
                "cannot recover ublk device {dev_id}: it was stopped; delete it with \
                 `ublk-mirror delete --dev-id {dev_id}` and serve the image again"
            ),
            state if std::time::Instant::now() >= deadline => bail!(
                "cannot recover ublk device {dev_id}: it is in state {state}, not quiesced, \
                 10 s after its daemon (pid {pid}) went away"
            ),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// `ublk-mirror delete`: remove a device whose daemon is gone.
pub fn delete(dev_id: u32, force: bool) -> Result<()> {
    check_driver()?;
    let id = i32::try_from(dev_id).context("device id out of range")?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| match e {
        UblkError::OtherError(errno) if errno == -libc::ENODEV || errno == -libc::ENOENT => {
            anyhow!("ublk device {dev_id} does not exist")
        }
        other => anyhow!("cannot open ublk device {dev_id}: {other}"),
    })?;
    let info = ctrl.dev_info();
    let pid = info.ublksrv_pid;
    if pid > 0 && Path::new(&format!("/proc/{pid}")).exists() && !force {
        bail!(
            "ublk device {dev_id} is still served by pid {pid}; stop that daemon (SIGTERM) \
             instead, or pass --force to delete it anyway"
        );
    }
    // STOP_DEV first: harmless when the kernel already stopped it, needed when it did not.
    let _ = ctrl.kill_dev();
    ctrl.del_dev()
        .map_err(|e| anyhow!("DEL_DEV of ublk device {dev_id} failed: {e}"))?;
    // Nothing can recover it any more.
    let _ = std::fs::remove_file(crate::device::state::path_for(dev_id));
    Ok(())
}
