//! `ublk-mirror`: serve a raw image as /dev/ublkbN (and, during a migration, mirror its writes
//! to an NBD target).
//!
//! The layout, by what each part is for (dependencies run one way, checked by
//! `scripts/check-layers`):
//! - `datapath/`: a guest request from the kernel's hand-off to its commit (start with
//!   `datapath/mod.rs`, which follows one WRITE through the files);
//! - `mirror/`: the link to the NBD target, attaching it, copy and resync, the out-of-sync map
//!   and activity log, the range lock;
//! - `ctl/`: the control socket, one handler per command, the JSON reports;
//! - `device/`: the ublk device's life, the image, readiness, the state file;
//! - `daemon.rs`: the daemon object the control handlers hold, a small struct of parts;
//!   `fd_store.rs`: the stored fds;
//! - small shared pieces: `lock.rs`, `stop.rs`, `run_dir.rs`, `doorbell.rs` (the file lock is
//!   `nbd_proxy::file_lock`, shared with `nbd-proxy serve`).

mod atomic_state;
mod ctl;
mod daemon;
mod datapath;
mod device;
mod doorbell;
mod events;
mod fd_store;
#[cfg(test)]
mod golden_tests;
mod lock;
mod mirror;
mod queue_ring;
mod run_dir;
mod stop;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::ctl::tapdisk_fds::{self, TapdiskFdReceiver};
use crate::ctl::ControlPath;
use crate::daemon::Daemon;
use crate::device::image::{DirectMode, Image};
use crate::device::placement::QueueCpus;
use crate::device::readiness::Readiness;
use crate::device::ublk::DeviceConfig;
use crate::device::{state, ublk};
use crate::mirror::dirty::{self, DirtyMap, DEFAULT_GRANULE};
use crate::stop::StopReason;

fn long_about() -> String {
    format!(
        "Serve a raw disk image as a Linux ublk block device (/dev/ublkbN), one daemon per \
         virtual disk. Every request is served from the local image with io_uring.\n\n\
         {}\n\n\
         Logging: RUST_LOG=debug|info|warn (default info), to stderr, as plain lines \
         (\"TIME LEVEL ublk-mirror[PID][LABEL]: message\"), never coloured.",
        control::units::SIZE_UNITS
    )
}

#[derive(Parser)]
#[command(
    name = "ublk-mirror",
    version,
    about = "Serve a raw disk image as a Linux ublk block device (/dev/ublkbN)",
    long_about = long_about(),
    color = clap::ColorChoice::Never
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create /dev/ublkbN backed by IMAGE and serve it until SIGTERM/SIGINT.
    ///
    /// Prints the device path on stdout once the device is live. On SIGTERM or SIGINT the device
    /// is stopped (requests in flight complete), the image is fdatasync'ed and the device is
    /// deleted; the exit status is 0. If the daemon dies instead (SIGKILL, panic, OOM), the
    /// device stays and guest I/O waits until `ublk-mirror recover --dev-id N` takes over (or
    /// `ublk-mirror delete` removes it).
    #[command(after_help = control::units::SIZE_UNITS)]
    Serve(ServeArgs),
    /// Take over device N after its daemon died (SIGKILL, panic, OOM) or detached
    /// (`ublk-mirror-ctl shutdown --keep`, for an upgrade of the binary).
    ///
    /// Devices are created with ublk's USER_RECOVERY and USER_RECOVERY_REISSUE: while no daemon
    /// serves them, guest I/O waits instead of failing, and requests that were in flight are
    /// issued again to the new daemon. Everything else comes from the state file
    /// /run/ublk-mirror/N.state (image, queues, depth, control socket, bitmap). A mirror that
    /// was attached is not resumed: `nbd_mirror_failed` reads 1 and the out-of-sync map covers
    /// what the target may have missed (everything, without a --bitmap file), so the
    /// orchestrator hands over a new connection and starts the mirror with --resync.
    /// Refused when the device is gone, is still served, or the image is missing or in use.
    Recover {
        /// Device id N of /dev/ublkbN.
        #[arg(long, value_name = "N")]
        dev_id: u32,
        /// As for serve: write "READY=1 DEVICE=/dev/ublkbN" to this inherited fd once live
        /// [default: none].
        #[arg(long, value_name = "FD")]
        ready_fd: Option<RawFd>,
    },
    /// Delete a ublk device whose daemon is gone (e.g. after a crash). Guest I/O waiting on it
    /// then fails with errors; use `recover` to keep the disk instead.
    Delete {
        /// Device id N of /dev/ublkbN.
        #[arg(long, value_name = "N")]
        dev_id: u32,
        /// Delete even if the daemon that serves it is still running.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Raw image file to serve (size must be a multiple of 512 bytes).
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// Device id N for /dev/ublkbN [default: a free one, picked by the driver].
    #[arg(long, value_name = "N")]
    dev_id: Option<u32>,
    /// Number of hardware queues (1 to 32), each served by its own thread and io_uring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    queues: u16,
    /// Requests in flight per queue (1 to 4096).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    depth: u16,
    /// Largest request, a size: a multiple of 4KiB, at most 8MiB (the kernel splits larger
    /// ones).
    #[arg(long, value_name = "SIZE", value_parser = control::units::parse_size_u32,
          default_value_t = 512 * 1024)]
    max_io: u32,
    /// Where the queue threads run: away (every CPU but those that submit to the queue, so a
    /// submitter and its queue thread run in parallel; with 1 queue, which every CPU feeds,
    /// one CPU counted from the last by device id), any (every CPU), or own (one CPU of the
    /// queue's submitters, picked at random).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = QueueCpus::Away)]
    queue_cpus: QueueCpus,
    /// O_DIRECT on the image: on, off, or auto (on if the filesystem allows it).
    #[arg(long, value_enum, default_value_t = DirectMode::Auto)]
    direct: DirectMode,
    /// Free text (e.g. the VM and disk uuid) shown in every log line [default: "", no label].
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "",
        hide_default_value = true
    )]
    label: String,
    /// Write "READY=1 DEVICE=/dev/ublkbN" to this inherited fd, then close it, once live
    /// [default: none].
    #[arg(long, value_name = "FD")]
    ready_fd: Option<RawFd>,
    /// Control socket (see control/PROTOCOL.md) [default: /run/ublk-mirror/<dev-id>.sock].
    /// Created 0600 in a 0700 directory; only root and this user may connect.
    #[arg(long, value_name = "PATH", conflicts_with = "no_control")]
    control: Option<PathBuf>,
    /// Serve without a control socket.
    #[arg(long)]
    no_control: bool,
    /// Attach now, activate later: the device exists and reads are answered, but everything
    /// that changes the disk waits until the first `unpause`.
    #[arg(long)]
    paused: bool,
    /// Keep the out-of-sync bitmap in this file (created if missing; refused if it belongs to
    /// another image or size), so it survives a daemon crash and a resync can follow
    /// [default: none, the bitmap is in memory only].
    #[arg(long, value_name = "PATH")]
    bitmap: Option<PathBuf>,
    /// Bytes per bit of the out-of-sync bitmap, a size: a power of two from 4KiB to 64MiB.
    #[arg(long, value_name = "SIZE", value_parser = control::units::parse_size,
          default_value_t = DEFAULT_GRANULE)]
    granularity: u64,
    /// With --bitmap: the most 4 MiB extents the activity log keeps hot while mirroring
    /// (DRBD's al-extents). A write to a hot extent costs nothing; a crash marks at most this
    /// many extents out of sync (or those of the requests in flight, if more).
    #[arg(long, value_name = "N", default_value_t = dirty::DEFAULT_AL_EXTENTS,
          value_parser = parse_al_extents)]
    al_extents: usize,
    /// Behave as tapdisk towards xapi: also take fds on DIR/nbdclient<pid> (one message per
    /// connection, its payload the fd's name, no reply: xapi's mirror_pass_fds), and mirror to
    /// targets without FLUSH (tapdisk's servers offer none; as mirror-start --allow-no-flush).
    #[arg(long)]
    tapdisk_compat: bool,
    /// With --tapdisk-compat: where nbdclient<pid> goes. Must be a directory (not a symlink)
    /// owned by root and not writable by group or others.
    #[arg(long, value_name = "DIR", default_value = tapdisk_fds::DEFAULT_DIR,
          requires = "tapdisk_compat")]
    tapdisk_dir: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let label = match &cli.command {
        Command::Serve(a) => a.label.clone(),
        Command::Delete { .. } | Command::Recover { .. } => String::new(),
    };
    control::logging::init("ublk-mirror", &label);
    let res = match cli.command {
        Command::Serve(args) => serve(args, None),
        Command::Recover { dev_id, ready_fd } => recover(dev_id, ready_fd),
        Command::Delete { dev_id, force } => ublk::delete(dev_id, force).map(|()| {
            println!("deleted ublk device {dev_id}");
        }),
    };
    if let Err(e) = res {
        eprintln!("ublk-mirror: error: {e:#}");
        std::process::exit(1);
    }
}

/// `recover`: the previous daemon's options from its state file, then `serve` in recovery mode.
fn recover(dev_id: u32, ready_fd: Option<RawFd>) -> Result<()> {
    ublk::check_driver()?;
    let path = state::path_for(dev_id);
    let st = state::DaemonState::load(&path)?;
    ublk::check_recoverable(dev_id)?;
    if !st.image.exists() {
        anyhow::bail!(
            "cannot recover ublk device {dev_id}: its image {} is missing (delete the device \
             with `ublk-mirror delete --dev-id {dev_id}`, or restore the image)",
            st.image.display()
        );
    }
    log::info!(
        "recovering ublk device {dev_id} from {} (previous daemon pid {}{})",
        path.display(),
        st.pid,
        if st.detached { ", detached" } else { ", died" }
    );
    let args = ServeArgs {
        image: st.image.clone(),
        dev_id: Some(dev_id),
        queues: st.queues,
        queue_cpus: QueueCpus::default(),
        depth: st.depth,
        max_io: st.max_io,
        direct: st.direct,
        label: st.label.clone(),
        ready_fd,
        control: st.control.clone(),
        no_control: st.control.is_none(),
        paused: false,
        bitmap: st.bitmap.clone(),
        granularity: st.granularity,
        al_extents: st.al_extents.unwrap_or(dirty::DEFAULT_AL_EXTENTS),
        tapdisk_compat: st.tapdisk_dir.is_some(),
        tapdisk_dir: st
            .tapdisk_dir
            .clone()
            .unwrap_or_else(|| tapdisk_fds::DEFAULT_DIR.into()),
    };
    serve(args, Some(st))
}

fn serve(args: ServeArgs, recovering: Option<state::DaemonState>) -> Result<()> {
    if args.max_io % 4096 != 0 || args.max_io == 0 || args.max_io > (8 << 20) {
        anyhow::bail!(
            "--max-io {}: must be a multiple of 4096, at most 8 MiB",
            args.max_io
        );
    }
    let image = Image::open(&args.image, args.direct)?;
    log::info!(
        "image {}: {} bytes, {} I/O, logical block {}",
        image.path.display(),
        image.size,
        if image.direct { "direct" } else { "buffered" },
        image.logical_block
    );
    if !args.granularity.is_power_of_two() || !(4096..=64 << 20).contains(&args.granularity) {
        anyhow::bail!(
            "--granularity {}: must be a power of two from 4096 to 67108864",
            args.granularity
        );
    }
    ublk::check_driver()?;
    let dirty = open_dirty_map(&args, &image)?;
    let readiness = Readiness::new(args.ready_fd)?;
    private_mount_namespace();

    let (stop_tx, stop_rx) = mpsc::channel();
    forward_signals(stop_tx.clone())?;
    let daemon = Daemon::new(
        image,
        args.direct,
        args.queues,
        args.label.clone(),
        args.paused,
        stop_tx,
        dirty,
    )
    .context("setting up the queues' doorbells")?;
    if let Some(prev) = &recovering {
        inherit_mirror(&daemon, prev);
    }
    // Dropped (the socket removed) when serve returns.
    let _fd_receiver = start_fd_receiver(&args, &daemon, recovering.as_ref())?;
    if daemon.io.dirty.persistent() {
        start_activity_log_cleaner(&daemon)?;
    }
    daemon.record.set(initial_record(&args, &daemon));
    let cfg = DeviceConfig {
        dev_id: args.dev_id.map_or(-1, |id| id as i32),
        queues: args.queues,
        depth: args.depth,
        max_io_bytes: args.max_io,
        recover: recovering.is_some(),
        queue_cpus: args.queue_cpus,
    };
    let control = match (args.no_control, args.control) {
        (true, _) => None,
        (false, Some(p)) => Some(ControlPath::Path(p)),
        (false, None) => Some(ControlPath::Default),
    };
    let totals = ublk::serve(daemon, &cfg, control, stop_rx, readiness)?;
    log::info!("stats at exit: {totals}");
    Ok(())
}

/// With `--tapdisk-compat`: tapdisk's fd hand-off socket for this pid; after a recovery the
/// previous daemon's is removed (unless somebody listens on it).
fn start_fd_receiver(
    args: &ServeArgs,
    daemon: &std::sync::Arc<Daemon>,
    recovering: Option<&state::DaemonState>,
) -> Result<Option<TapdiskFdReceiver>> {
    if !args.tapdisk_compat {
        return Ok(None);
    }
    let rx = TapdiskFdReceiver::start(&args.tapdisk_dir, daemon.clone())?;
    let _ = daemon
        .fd_receiver
        .set((rx.path().to_owned(), rx.counters.clone()));
    if let Some(prev) = recovering {
        tapdisk_fds::remove_previous(&args.tapdisk_dir, prev.pid);
    }
    Ok(Some(rx))
}

/// The out-of-sync map: in the `--bitmap` file (logging what it holds), or in memory.
fn open_dirty_map(args: &ServeArgs, image: &Image) -> Result<DirtyMap> {
    let map = match &args.bitmap {
        Some(p) => {
            let m = DirtyMap::open_file(p, &image.path, image.size, args.granularity)?;
            log::info!(
                "bitmap {}: generation {}, {} bytes out of sync{}",
                p.display(),
                m.generation,
                m.dirty_bytes(),
                if m.al_recovered > 0 {
                    format!(
                        " ({} extents of {} MiB with mirrored writes in flight at the last \
                         stop came from the activity log)",
                        m.al_recovered,
                        dirty::AL_EXTENT >> 20
                    )
                } else {
                    String::new()
                }
            );
            m
        }
        None => DirtyMap::new(image.size, args.granularity),
    };
    map.set_al_bound(args.al_extents);
    Ok(map)
}

/// A previous daemon that was mirroring when it died or detached leaves the mirror failed:
/// the target may lack writes.
fn inherit_mirror(daemon: &Daemon, prev: &state::DaemonState) {
    if let Some(m) = &prev.mirror {
        daemon.mirroring.inherit_failure(format!(
            "the previous daemon (pid {}) {} while mirroring to {:?} (export {:?}): the \
             target may lack writes; hand over a new connection and mirror-start --resync",
            prev.pid,
            if prev.detached { "detached" } else { "died" },
            m.target,
            m.export
        ));
        if !daemon.io.dirty.persistent() {
            // Nothing recorded what the target missed: all of it is out of sync.
            daemon.io.dirty.mark_all();
        }
    }
}

/// What the state file records from the start (the device id and socket follow once known).
fn initial_record(args: &ServeArgs, daemon: &Daemon) -> state::DaemonState {
    state::DaemonState {
        version: state::DaemonState::CURRENT_VERSION,
        dev_id: 0,
        pid: std::process::id(),
        image: daemon.device.image_path(),
        direct: args.direct,
        queues: args.queues,
        depth: args.depth,
        max_io: args.max_io,
        label: daemon.label.clone(),
        control: None,
        bitmap: args.bitmap.clone(),
        granularity: args.granularity,
        al_extents: Some(args.al_extents),
        mirror: None,
        detached: false,
        tapdisk_dir: args.tapdisk_compat.then(|| args.tapdisk_dir.clone()),
    }
}

/// Moves the activity log's clock about once a second, and retires its least recently used
/// idle extents when the hot set nears its bound (`DirtyMap::retire_cold`).
fn start_activity_log_cleaner(daemon: &std::sync::Arc<Daemon>) -> Result<()> {
    let weak = std::sync::Arc::downgrade(daemon);
    std::thread::Builder::new()
        .name("activity-log".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            match weak.upgrade() {
                Some(s) => {
                    s.io.dirty.retire_cold();
                }
                None => return,
            }
        })
        .context("spawning the activity log cleaner")?;
    Ok(())
}

/// SIGTERM and SIGINT become a stop request; handled on a thread, never in a signal handler.
fn forward_signals(stop: mpsc::Sender<StopReason>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .context("installing SIGTERM/SIGINT handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if stop.send(StopReason::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// A process that has /dev/ublkbN mounted in our mount namespace can deadlock our exit (an
/// unmount there waits for I/O only we could serve). A private namespace keeps other mounts out.
fn private_mount_namespace() {
    // SAFETY: unshare and mount take no pointers we own beyond the NUL-terminated literals.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        log::warn!(
            "cannot enter a private mount namespace ({}); do not mount this daemon's device \
             in its own namespace",
            std::io::Error::last_os_error()
        );
    }
}

/// `--al-extents`: 1 to 1048576 extents (4 PiB of device).
fn parse_al_extents(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1 << 20).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?}: a number of 4 MiB extents from 1 to 1048576"
        )),
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_every_option_says_its_default() {
        control::help::assert_rule_kept(Cli::command());
    }

    #[test]
    fn sizes_take_units() {
        let cli = Cli::try_parse_from([
            "ublk-mirror",
            "serve",
            "--image",
            "i",
            "--max-io",
            "1MiB",
            "--granularity",
            "4KiB",
        ])
        .expect("sizes");
        let Command::Serve(a) = cli.command else {
            panic!("not serve");
        };
        assert_eq!((a.max_io, a.granularity), (1 << 20, 4096));
        let cli = Cli::try_parse_from(["ublk-mirror", "serve", "--image", "i"]).expect("defaults");
        let Command::Serve(a) = cli.command else {
            panic!("not serve");
        };
        assert_eq!((a.max_io, a.granularity), (512 * 1024, DEFAULT_GRANULE));
        assert!(
            Cli::try_parse_from(["ublk-mirror", "serve", "--image", "i", "--max-io", "8GiB"])
                .is_err()
        );
    }
}
