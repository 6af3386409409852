//! The transmission phase of one connection: a reader thread parses requests, a pool of
//! workers executes them against the image and sends the replies (in completion order).
//!
//! A request that arrives alone (no other in the workers' hands, no more bytes waiting on the
//! socket) and is quick (a write without FUA, a refusal) is answered by the reader itself:
//! handing it over would cost a worker's wake-up and two context switches, which at queue
//! depth 1 is most of the server's share of a mirrored write's latency (fio's nbd engine, 4k
//! randwrite QD1 on a 2-core host: 1.28x and 1.43x the IOPS in two A/Bs). Anything slow (FUA,
//! flush, zeroing), any read, and anything arriving behind others goes to the workers, so a
//! burst is executed in parallel and a flush never holds up the reading of the requests after
//! it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::unpoison::Unpoisoned;
use super::{Export, Server};
use crate::address::Stream;
use crate::proto::*;

/// Limits the WRITE payload bytes a connection holds in memory.
struct Budget {
    free: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut free = self.free.lock().unpoisoned();
        while *free < n {
            free = self.cv.wait(free).unpoisoned();
        }
        *free -= n;
    }
    fn release(&self, n: u64) {
        *self.free.lock().unpoisoned() += n;
        self.cv.notify_all();
    }
}

struct Job {
    hdr: RequestHeader,
    data: Vec<u8>,
    /// The request was refused before execution with this NBD error.
    refused: Option<u32>,
}

impl Job {
    /// Cheap enough for the reader to answer itself: a write without FUA (no sync to stable
    /// storage; its reply is 16 bytes, so sending it cannot block the reader for long), a
    /// CACHE or a refusal. Not a read: in an A/B (fio's nbd engine, 4k randread QD32) reads
    /// answered by the reader ran 0.86x and 0.89x, while a mirror's traffic is writes.
    fn is_quick(&self) -> bool {
        self.refused.is_some()
            || match self.hdr.command {
                Command::Cache => true,
                Command::Write => self.hdr.flags & cmd_flags::FUA == 0,
                _ => false,
            }
    }
}

/// What the reader and the workers of one connection share to answer requests.
struct Replies {
    writer: Mutex<Stream>,
    budget: Budget,
    /// Requests handed to the workers and not answered yet.
    with_workers: AtomicUsize,
}

pub(super) fn run(server: &Arc<Server>, stream: Stream, export: Arc<Export>, id: u64) {
    if let Err(e) = stream.set_read_timeout(None) {
        log::error!("conn {id}: {e}");
        return;
    }
    let (Ok(writer), Ok(registered)) = (stream.try_clone(), stream.try_clone()) else {
        log::error!("conn {id}: cannot clone the socket");
        return;
    };
    {
        let mut conns = export.conns.lock().unpoisoned();
        if export.is_removed() {
            return;
        }
        conns.push((id, registered));
    }
    log::info!("conn {id}: transmission on export {:?}", export.name);
    let budget_bytes = server.config.connection_budget.max(u64::from(MAX_PAYLOAD));
    let replies = Arc::new(Replies {
        writer: Mutex::new(writer),
        budget: Budget {
            free: Mutex::new(budget_bytes),
            cv: Condvar::new(),
        },
        with_workers: AtomicUsize::new(0),
    });
    let workers = server.config.workers_per_connection.max(1);
    let jitter = server.config.reorder_jitter_ms;
    let (tx, rx) = sync_channel::<Job>(workers * 4);
    let rx = Arc::new(Mutex::new(rx));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (rx, replies, export) = (rx.clone(), replies.clone(), export.clone());
            std::thread::Builder::new()
                .name(format!("nbd-c{id}-w{w}"))
                .spawn(move || worker(&rx, &replies, &export, jitter, id ^ (w as u64) << 32))
        })
        .filter_map(|h| {
            h.map_err(|e| log::error!("conn {id}: no worker thread: {e}"))
                .ok()
        })
        .collect();

    // With the test-only reorder jitter every request goes to a worker, to be delayed there.
    let answer_inline = jitter == 0;
    let end = read_requests(stream, &export, &replies, &tx, answer_inline, id);
    drop(tx);
    for h in handles {
        let _ = h.join();
    }
    match end {
        Ok(why) => log::info!("conn {id}: closed ({why})"),
        Err(e) => log::warn!("conn {id}: disconnected: {e}"),
    }
    let _ = replies.writer.lock().unpoisoned().shutdown(Shutdown::Both);
    let mut conns = export.conns.lock().unpoisoned();
    conns.retain(|(c, _)| *c != id);
    export.conns_done.notify_all();
}

/// Reads requests until DISC, EOF or a framing error, answering a quick request that came
/// alone itself (`answer_inline`) and handing every other to the workers. Ok(reason) for a
/// clean end.
fn read_requests(
    mut stream: Stream,
    export: &Export,
    replies: &Replies,
    tx: &std::sync::mpsc::SyncSender<Job>,
    answer_inline: bool,
    id: u64,
) -> Result<&'static str, ProtoOrIo> {
    let budget = &replies.budget;
    let tx_flags = export.tx_flags();
    loop {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        match stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok("client closed"),
            Err(e) => return Err(e.into()),
        }
        let hdr = RequestHeader::decode(&h)?;
        hdr.check_framing()?;
        if hdr.command == Command::Disc {
            return Ok("NBD_CMD_DISC");
        }
        let len = hdr.payload_len();
        let mut data = Vec::new();
        if len > 0 {
            budget.acquire(len.into());
            data = vec![0u8; len as usize];
            if let Err(e) = stream.read_exact(&mut data) {
                budget.release(len.into());
                return Err(e.into());
            }
        }
        let refused = hdr.check(export.size, tx_flags).err();
        log::trace!("conn {id}: {hdr:?} refused={refused:?}");
        let job = Job { hdr, data, refused };
        if answer_inline
            && job.is_quick()
            && replies.with_workers.load(Ordering::Acquire) == 0
            && bytes_waiting(&stream) == 0
        {
            answer(job, replies, export);
            continue;
        }
        replies.with_workers.fetch_add(1, Ordering::AcqRel);
        if tx.send(job).is_err() {
            return Err(io::Error::other("all workers are gone").into());
        }
    }
}

/// Bytes received on the socket and not read yet (a request behind this one); on error, as
/// if some were, so the request goes to the workers as it always could.
fn bytes_waiting(stream: &Stream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`, which outlives the call; the fd is the
    // stream's own, open for the whole call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc < 0 {
        return usize::MAX;
    }
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[derive(Debug, thiserror::Error)]
enum ProtoOrIo {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    replies: &Replies,
    export: &Export,
    jitter_ms: u64,
    seed: u64,
) {
    let mut rng = seed | 1;
    loop {
        let job = match rx.lock().unpoisoned().recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        if jitter_ms > 0 {
            // xorshift: a test-only delay, no need for a real RNG.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(Duration::from_millis(rng % (jitter_ms + 1)));
        }
        answer(job, replies, export);
        replies.with_workers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Executes one request (unless refused) and sends its reply.
fn answer(job: Job, replies: &Replies, export: &Export) {
    let result = match job.refused {
        Some(err) => Err(err),
        None => execute(export, &job.hdr, &job.data),
    };
    let payload_len = job.hdr.payload_len();
    drop(job.data);
    replies.budget.release(payload_len.into());
    if let Err(err) = &result {
        log::debug!(
            "{:?} at {}: NBD error {err}",
            job.hdr.command,
            job.hdr.offset
        );
    }
    let reply = SimpleReply {
        error: result.as_ref().err().copied().unwrap_or(0),
        cookie: job.hdr.cookie,
    };
    let mut w = replies.writer.lock().unpoisoned();
    let sent = w.write_all(&reply.encode()).and_then(|()| match &result {
        Ok(data) if !data.is_empty() => w.write_all(data),
        _ => Ok(()),
    });
    if let Err(e) = sent {
        log::warn!("reply to cookie {:#x} failed: {e}", job.hdr.cookie);
        let _ = w.shutdown(Shutdown::Both);
    }
}

/// Carries out one well-formed, permitted request. Ok(READ data, else empty) or an NBD error.
fn execute(export: &Export, hdr: &RequestHeader, data: &[u8]) -> Result<Vec<u8>, u32> {
    let f = &export.file;
    let io_err = |e: io::Error| nbd_error_from_errno(e.raw_os_error().unwrap_or(libc::EIO));
    let fua = hdr.flags & cmd_flags::FUA != 0;
    let (off, len) = (hdr.offset, u64::from(hdr.length));
    match hdr.command {
        Command::Read => {
            let mut buf = vec![0u8; hdr.length as usize];
            f.read_exact_at(&mut buf, off).map_err(io_err)?;
            Ok(buf)
        }
        Command::Write => {
            f.write_all_at(data, off).map_err(io_err)?;
            if fua {
                f.sync_data().map_err(io_err)?;
            }
            Ok(Vec::new())
        }
        Command::Flush => f.sync_data().map(|()| Vec::new()).map_err(io_err),
        Command::Trim => {
            // A trimmed range reads back zeros here, so a mirror can rely on it.
            zero(f, off, len, &[PUNCH, ZERO_RANGE], false).map_err(io_err)?;
            if fua {
                f.sync_data().map_err(io_err)?;
            }
            Ok(Vec::new())
        }
        Command::WriteZeroes => {
            let order: &[i32] = if hdr.flags & cmd_flags::NO_HOLE != 0 {
                &[ZERO_RANGE]
            } else {
                &[PUNCH, ZERO_RANGE]
            };
            let fast_only = hdr.flags & cmd_flags::FAST_ZERO != 0;
            match zero(f, off, len, order, fast_only) {
                Ok(()) => {}
                Err(e) if fast_only && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(errno::ENOTSUP)
                }
                Err(e) => return Err(io_err(e)),
            }
            if fua {
                f.sync_data().map_err(io_err)?;
            }
            Ok(Vec::new())
        }
        Command::Cache => Ok(Vec::new()),
        Command::Disc | Command::BlockStatus | Command::Unknown(_) => Err(errno::EINVAL),
    }
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Makes [off, off+len) read as zeros with the first fallocate mode that works, else by
/// writing zeros (unless `fast_only`, then EOPNOTSUPP).
fn zero(f: &std::fs::File, off: u64, len: u64, modes: &[i32], fast_only: bool) -> io::Result<()> {
    for &mode in modes {
        // SAFETY: fallocate on an open fd with plain integer arguments.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    if fast_only {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
