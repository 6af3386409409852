//! `watch`: a control connection that, after its snapshot reply, gets one JSON line per event
//! (`events.rs` for who publishes what) until either side closes it. The copy's progress is
//! sampled here, on the watcher's own thread: `copy-progress` at most once a second while
//! bytes move, `copy-ready` or `copy-ended` when the job ends. A watcher whose client stops
//! reading is cut off once its backlog is full (or a write has waited `WRITE_WAIT`), with a
//! last `lagged` line if it can still be written.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::protocol::Event;

use crate::ctl::report;
use crate::daemon::Daemon;
use crate::events::{Events, Subscription};
use crate::mirror::copy::{CopyJob, CopyState};

/// How long one event line may wait for a client that does not read.
const WRITE_WAIT: Duration = Duration::from_secs(5);
/// How often the copy is looked at and the client checked for a close.
const TICK: Duration = Duration::from_millis(200);
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The snapshot that answers `watch` (sequence number 0): the device's and the mirror's
/// state and the copy.
pub(super) fn snapshot(daemon: &Daemon) -> Event {
    let mirror = report::mirror_report(daemon);
    Events::make("snapshot", |e| {
        e.state = Some(daemon.device.state().name().into());
        e.mirror = Some(mirror.state().into());
        e.reason = mirror.last_error().map(str::to_owned);
        e.copy = mirror.copy().cloned();
    })
}

/// Serves a watcher until the client closes, a write fails or waits too long, or it falls too
/// far behind.
pub(crate) fn serve(conn: UnixStream, daemon: &Daemon, sub: Subscription) {
    let _ = conn.set_write_timeout(Some(WRITE_WAIT));
    let mut out = Lines { conn, seq: 0 };
    let mut copy = CopySeen::default();
    loop {
        match sub.events.recv_timeout(TICK) {
            Ok(ev) => {
                if out.send(ev).is_err() {
                    return;
                }
                continue; // drain what is queued before looking at the copy
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if sub.lagged.load(Ordering::SeqCst) {
                    log::warn!(
                        "watch: a watcher fell {} events behind; dropped",
                        crate::events::BACKLOG
                    );
                    let ev = Events::make("lagged", |e| {
                        e.reason = Some(format!(
                            "more than {} events unread; reconnect and start from the snapshot",
                            crate::events::BACKLOG
                        ));
                    });
                    let _ = out.send(ev);
                }
                return;
            }
        }
        for ev in copy.look(daemon) {
            if out.send(ev).is_err() {
                return;
            }
        }
        if client_gone(&out.conn) {
            return;
        }
    }
}

/// The watcher's connection, numbering its lines: the snapshot was 0, each event the next.
struct Lines {
    conn: UnixStream,
    seq: u64,
}

impl Lines {
    fn send(&mut self, mut ev: Event) -> std::io::Result<()> {
        self.seq += 1;
        ev.seq = self.seq;
        let mut line = serde_json::to_string(&ev).map_err(std::io::Error::other)?;
        line.push('\n');
        self.conn.write_all(line.as_bytes())
    }
}

/// True once the client closed its end (a watcher sends nothing after `watch`).
fn client_gone(conn: &UnixStream) -> bool {
    let mut b = [0u8; 64];
    // SAFETY: a non-blocking peek into a local buffer of the given length.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => {
            // Anything it sends is ignored: read it away so the peek stays cheap.
            // SAFETY: as above, without MSG_PEEK.
            unsafe {
                libc::recv(
                    conn.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            false
        }
        _ => {
            let e = std::io::Error::last_os_error();
            e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::Interrupted
        }
    }
}

/// What this watcher last saw of the copy.
#[derive(Default)]
struct CopySeen {
    job: Option<Arc<CopyJob>>,
    state: Option<CopyState>,
    progress_at: Option<Instant>,
    bytes: u64,
}

impl CopySeen {
    /// The copy events since the last look.
    fn look(&mut self, daemon: &Daemon) -> Vec<Event> {
        let Some(job) = daemon.mirroring.copy.load_full() else {
            self.job = None;
            return Vec::new();
        };
        let new_job = !self.job.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job));
        if new_job {
            *self = CopySeen {
                job: Some(job.clone()),
                ..CopySeen::default()
            };
        }
        let state = job.state();
        let mut out = Vec::new();
        let make = |kind: &str, reason: Option<String>| {
            Events::make(kind, |e| {
                e.copy = Some(report::copy_report(&job));
                e.reason = reason;
            })
        };
        if state == CopyState::Copying {
            let due = self
                .progress_at
                .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if due && (new_job || job.bytes_done() != self.bytes) {
                out.push(make("copy-progress", None));
                self.progress_at = Some(Instant::now());
                self.bytes = job.bytes_done();
            }
        } else if self.state != Some(state) {
            out.push(match state {
                CopyState::Ready => make("copy-ready", None),
                other => make("copy-ended", Some(other.name().into())),
            });
        }
        self.state = Some(state);
        out
    }
}
