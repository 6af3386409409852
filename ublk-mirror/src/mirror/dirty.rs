//! The out-of-sync bitmap: which granules of the device may differ between the local image
//! and the mirror target. Set from any queue without locks; cleared only by copy and resync
//! (never because one write to a granule completed: the rest of it may still differ).
//!
//! In memory, or (`serve --bitmap PATH`) in a file mapped shared: every bit set is in the page
//! cache at once, so it survives a daemon crash (SIGKILL, abort); a host crash keeps only what
//! was written back, which the daemon forces at pause, at exit (`flush`) and before it clears
//! extents from the activity log (below). The file starts with a header (magic, version,
//! granularity, device size, the image's device and inode, generation) and is refused when it
//! does not match.
//!
//! With a file, an activity log follows the bitmap, as in DRBD: one bit per 4 MiB extent that
//! may have a mirrored write in flight. A write's extents are set, and written through to the
//! disk, *before* the write goes to either leg. While a mirror takes writes the log is a
//! bounded hot set, as DRBD's `al-extents`: an extent stays logged after its writes end, so
//! a later write to it pays nothing, and only when more than the bound are logged do the least
//! recently used idle ones retire (`retire_cold`, about every second, down to 3/4 of the
//! bound; and at once, in the write that would pass the bound). A crash therefore marks at most
//! the bound (or, if every logged extent has a write in flight, the extents of the requests in
//! flight) out of sync. While no mirror takes writes they are cleared at once
//! (`set_mirroring(false)`: after a failure or a stop, every idle extent, and each busy one
//! when its last write ends). An extent is cleared only after the bitmap was written back
//! (`write_back_marks`), so the marks of the failed writes that ended in it are on disk first.
//! The out-of-sync bitmap itself is only cleared by copy and resync. When the file is opened
//! again after a crash, every logged extent is OR-ed into the bitmap: a write that reached one
//! leg and not the other is then covered.
//!
//! Why clearing an idle extent is always safe: `al_end` comes after both legs of the write
//! completed and after a write the target did not take was marked out of sync. An extent with
//! no write between `al_begin` and `al_end` therefore holds no write that reached one leg
//! only, and the bits of every failed write that ended in it are set; once they are written
//! back, bitmap and log together still cover every block that may differ, whatever moment a
//! crash (of the daemon or of the host) picks.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::lock::lock;

pub const DEFAULT_GRANULE: u64 = 64 << 10;
const MAGIC: &[u8; 8] = b"UBLKMBM\0";
/// 2: the activity log after the bitmap.
const VERSION: u32 = 2;
const HEADER: usize = 4096;
const PAGE: usize = 4096;
/// Bytes of the device per activity-log bit.
pub const AL_EXTENT: u64 = 4 << 20;
/// Set in an extent's in-flight count while the cleaner decides whether to clear its bit.
const CLEARING: u32 = 1 << 31;
/// Default bound of the activity log's hot set, in extents (4 GiB of the device; DRBD's
/// default is 1237).
pub const DEFAULT_AL_EXTENTS: usize = 1024;

enum Storage {
    Memory(Vec<AtomicU64>),
    /// The file stays open: it carries the exclusive lock, and the queues write the log
    /// through it (`al_sync_range`).
    File {
        map: memmap2::MmapMut,
        file: std::fs::File,
    },
}

pub struct DirtyMap {
    granule: u64,
    size: u64,
    nwords: usize,
    storage: Storage,
    /// Mirrored writes in flight per activity-log extent (file only), plus CLEARING.
    al_inflight: Vec<AtomicU32>,
    /// Serializes setting a cold extent's bit against the cleaner clearing it.
    al_lock: Mutex<()>,
    /// Extents logged now, and the most the hot set keeps (`set_al_bound`).
    al_hot: AtomicUsize,
    al_bound: AtomicUsize,
    /// The cleaner's clock (one tick a second) and each extent's tick at its last write: the
    /// least recently used idle extents retire first.
    al_clock: AtomicU32,
    al_last_use: Vec<AtomicU32>,
    /// Writes of the log to disk outside the queues (retirements, blocking `al_begin`), and
    /// extents retired. The queues count their own (`datapath/log_sync.rs`).
    pub al_writes: AtomicU64,
    /// The number of the last change that set log bits (taken under `al_lock` before the
    /// bits are set), and the highest such number known to be on disk: a write may be issued
    /// only once every bit set before it is durable, whoever set it.
    al_set_seq: AtomicU64,
    al_durable_seq: AtomicU64,
    pub al_retired: AtomicU64,
    /// No mirror takes writes (none attached, or it failed or is stopping), as the owner last
    /// said (`set_mirroring`; false until then): an extent leaves the log as soon as its last
    /// write ends, not at the next cleaning.
    al_eager: AtomicBool,
    /// Calls of `mark` so far, each counted after its bits are set.
    marks: AtomicU64,
    /// `marks` as read before the last write-back of the bitmap that succeeded: those marks
    /// are on disk. Held across a write-back.
    written_back: Mutex<u64>,
    /// Tests: the next write-backs of the bitmap fail.
    #[cfg(test)]
    fail_write_back: AtomicBool,
    /// Extents OR-ed into the bitmap from the log when the file was opened.
    pub al_recovered: u64,
    /// Times the bitmap file was opened (1 for a new file); 0 in memory.
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bitmap {path} belongs to another disk: {what} is {found}, expected {expected}; remove it or pass another --bitmap")]
    Mismatch {
        path: String,
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("bitmap {path} is not a ublk-mirror bitmap (bad magic or version)")]
    NotABitmap { path: String },
    #[error("bitmap {path} is in use by another process")]
    Locked { path: String },
}

fn le_u64(m: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&m[at..at + 8]);
    u64::from_le_bytes(b)
}

impl DirtyMap {
    pub fn new(size: u64, granule: u64) -> DirtyMap {
        let nwords = Self::words_for(size, granule);
        let bits = Storage::Memory((0..nwords).map(|_| AtomicU64::new(0)).collect());
        DirtyMap::with_storage(bits, size, granule, 0, 0)
    }

    fn words_for(size: u64, granule: u64) -> usize {
        size.div_ceil(granule).div_ceil(64) as usize
    }

    /// A map over `storage` with `extents` activity-log extents (0 in memory), nothing
    /// marked or logged yet.
    fn with_storage(
        storage: Storage,
        size: u64,
        granule: u64,
        extents: usize,
        generation: u64,
    ) -> DirtyMap {
        let per_extent = || (0..extents).map(|_| AtomicU32::new(0)).collect();
        DirtyMap {
            granule,
            size,
            nwords: Self::words_for(size, granule),
            storage,
            al_inflight: per_extent(),
            al_lock: Mutex::new(()),
            al_hot: AtomicUsize::new(0),
            al_bound: AtomicUsize::new(DEFAULT_AL_EXTENTS),
            al_clock: AtomicU32::new(0),
            al_last_use: per_extent(),
            al_writes: AtomicU64::new(0),
            al_set_seq: AtomicU64::new(0),
            al_durable_seq: AtomicU64::new(0),
            al_retired: AtomicU64::new(0),
            al_eager: AtomicBool::new(false),
            marks: AtomicU64::new(0),
            written_back: Mutex::new(0),
            #[cfg(test)]
            fail_write_back: AtomicBool::new(false),
            al_recovered: 0,
            generation,
        }
    }

    fn al_offset(nwords: usize) -> usize {
        (HEADER + nwords * 8).div_ceil(PAGE) * PAGE
    }

    fn al_words_for(size: u64) -> usize {
        size.div_ceil(AL_EXTENT).div_ceil(64) as usize
    }

    /// Writes the header of a new bitmap file for `[granularity, device size, image device,
    /// image inode]`; its generation is 1.
    fn new_header(map: &mut [u8], header: [u64; 4]) -> u64 {
        map[0..8].copy_from_slice(MAGIC);
        map[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let [granule, size, dev, ino] = header;
        for (at, v) in [(16, granule), (24, size), (32, dev), (40, ino), (48, 1u64)] {
            map[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        1
    }

    /// Checks an existing bitmap file was made for `header` (as `new_header`) and is `len`
    /// bytes long, and counts its generation up.
    fn next_generation(
        map: &mut [u8],
        header: [u64; 4],
        len: u64,
        shown: &str,
    ) -> Result<u64, BitmapError> {
        let [granule, size, dev, ino] = header;
        let fields = [
            ("granularity", 16, granule),
            ("device size", 24, size),
            ("image device", 32, dev),
            ("image inode", 40, ino),
        ];
        for (what, at, expected) in fields {
            let found = le_u64(map, at);
            if found != expected {
                return Err(BitmapError::Mismatch {
                    path: shown.to_owned(),
                    what,
                    found,
                    expected,
                });
            }
        }
        if map.len() as u64 != len {
            return Err(BitmapError::Mismatch {
                path: shown.to_owned(),
                what: "file length",
                found: map.len() as u64,
                expected: len,
            });
        }
        let g = le_u64(map, 48) + 1;
        map[48..56].copy_from_slice(&g.to_le_bytes());
        Ok(g)
    }

    /// Opens (or creates) the bitmap file for an image of `size` bytes at `image`.
    pub fn open_file(
        path: &Path,
        image: &Path,
        size: u64,
        granule: u64,
    ) -> Result<DirtyMap, BitmapError> {
        let shown = path.display().to_string();
        let io = |source| BitmapError::Io {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(image).map_err(io)?;
        let (dev, ino) = (meta.dev(), meta.ino());
        let nwords = Self::words_for(size, granule);
        let len = (Self::al_offset(nwords) + Self::al_words_for(size) * 8) as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        nbd_proxy::file_lock::lock_exclusive(&file).map_err(|_| BitmapError::Locked {
            path: shown.clone(),
        })?;
        let fresh = file.metadata().map_err(io)?.len() == 0;
        if fresh {
            file.set_len(len).map_err(io)?;
        }
        // SAFETY: the file is ours (created here or validated below) and stays mapped for the
        // life of the DirtyMap; every access to the bits goes through atomics.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io)?;
        if !fresh && (map.len() < 56 || &map[0..8] != MAGIC || map[8..12] != VERSION.to_le_bytes())
        {
            return Err(BitmapError::NotABitmap { path: shown });
        }
        let header = [granule, size, dev, ino];
        let generation = if fresh {
            Self::new_header(&mut map, header)
        } else {
            Self::next_generation(&mut map, header, len, &shown)?
        };
        map.flush().map_err(io)?;
        let mut m = DirtyMap::with_storage(
            Storage::File { map, file },
            size,
            granule,
            size.div_ceil(AL_EXTENT) as usize,
            generation,
        );
        m.al_recovered = m.absorb_activity_log().map_err(io)?;
        Ok(m)
    }

    /// The activity log's words (empty in memory).
    fn al_words(&self) -> &[AtomicU64] {
        match &self.storage {
            Storage::Memory(_) => &[],
            Storage::File { map, .. } => {
                // SAFETY: the log starts at a page-aligned offset after the bitmap and holds
                // al_words_for(size) words (the file length is checked at open); all access
                // is atomic, as for the bitmap.
                unsafe {
                    std::slice::from_raw_parts(
                        map.as_ptr()
                            .add(Self::al_offset(self.nwords))
                            .cast::<AtomicU64>(),
                        Self::al_words_for(self.size),
                    )
                }
            }
        }
    }

    fn al_bit(&self, e: usize) -> bool {
        self.al_words()[e / 64].load(Ordering::SeqCst) & (1 << (e % 64)) != 0
    }

    /// Where the activity log lies in the file: (byte offset, byte length).
    fn al_bytes(&self) -> (usize, usize) {
        (
            Self::al_offset(self.nwords),
            Self::al_words_for(self.size) * 8,
        )
    }

    /// Writes the activity log through to the disk.
    fn al_sync(&self) -> std::io::Result<()> {
        match &self.storage {
            Storage::File { map, .. } => {
                let (offset, len) = self.al_bytes();
                map.flush_range(offset, len)
            }
            Storage::Memory(_) => Ok(()),
        }
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.size || self.al_inflight.is_empty() {
            return 0..0;
        }
        let end = (offset + len).min(self.size);
        (offset / AL_EXTENT) as usize..end.div_ceil(AL_EXTENT) as usize
    }

    /// Tests: `al_log` and a blocking write of the log (the queues write it on their ring,
    /// `datapath/log_sync.rs`).
    #[cfg(test)]
    pub fn al_begin(&self, offset: u64, len: u64) {
        if let Some(seq) = self.al_log(offset, len) {
            let upto = self.al_sync_point();
            self.al_writes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.al_sync() {
                log::error!("activity log: writing it to disk failed: {e}");
            }
            debug_assert!(upto >= seq);
            self.al_synced(upto);
        }
    }

    /// Before a mirrored write to [offset, offset+len) is issued: puts its extents in the log.
    /// None: they are on disk already, the write may go (free when the extents are hot: one
    /// atomic add each, a store of the clock when it moved, two loads). Some(seq): the write
    /// must wait until the log is on disk up to `seq` ([`DirtyMap::al_is_durable`]); the caller
    /// writes it ([`DirtyMap::al_sync_range`], then [`DirtyMap::al_synced`]) or waits for
    /// another's write. A cold extent is logged after retiring the least recently used idle
    /// extents (down to 3/4 of the bound) if the hot set is full.
    pub fn al_log(&self, offset: u64, len: u64) -> Option<u64> {
        let now = self.al_clock.load(Ordering::Relaxed);
        let mut cold = 0usize;
        for e in self.extents_of(offset, len) {
            let prev = self.al_inflight[e].fetch_add(1, Ordering::SeqCst);
            if prev & CLEARING != 0 || !self.al_bit(e) {
                cold += 1;
            }
            if self.al_last_use[e].load(Ordering::Relaxed) != now {
                self.al_last_use[e].store(now, Ordering::Relaxed);
            }
        }
        if cold == 0 {
            // Hot, but maybe set by another queue whose write of the log is still in flight:
            // then wait for it too (the bits on disk are what covers a crash).
            let set = self.al_set_seq();
            return (!self.al_is_durable(set)).then_some(set);
        }
        let _g = lock(&self.al_lock);
        let wanted = self.al_hot.load(Ordering::SeqCst) + cold;
        if wanted > self.al_bound() {
            // Over the bound (the cleaner did not keep up): retire down to 3/4 of it, as the
            // cleaner does, not just the `cold` extents needed now. Retiring scans every
            // extent (and writes the bitmap back if marks came since the last write-back), so
            // under random writes over a disk larger than the hot set this runs once per
            // bound/4 cold extents rather than for each one.
            self.retire_lru_locked(wanted - self.al_low_water());
        }
        // Numbered before the bits are set: whoever sees one of them set (the hot path above)
        // then reads this number or a later one. Whether this call sets a bit or another set
        // it meanwhile, the write waits for all set so far.
        let seq = self.al_set_seq.fetch_add(1, Ordering::SeqCst) + 1;
        for e in self.extents_of(offset, len) {
            if !self.al_bit(e) {
                self.al_words()[e / 64].fetch_or(1 << (e % 64), Ordering::SeqCst);
                self.al_hot.fetch_add(1, Ordering::SeqCst);
            }
        }
        Some(seq)
    }

    /// The number of the last change that set log bits (maybe still setting them).
    fn al_set_seq(&self) -> u64 {
        self.al_set_seq.load(Ordering::SeqCst)
    }

    /// Before a write of the log: the last change whose bits are all set (under `al_lock`,
    /// which every change holds from its number to its last bit), so a write that begins now
    /// covers it.
    pub fn al_sync_point(&self) -> u64 {
        let _g = lock(&self.al_lock);
        self.al_set_seq()
    }

    /// Whether every log bit set up to change `seq` is on disk.
    pub fn al_is_durable(&self, seq: u64) -> bool {
        self.al_durable_seq.load(Ordering::SeqCst) >= seq
    }

    /// A write of the log that began after change `upto` completed (successfully or not: a
    /// failed write is logged and the writes go on, as a daemon crash still cannot lose the
    /// bits; only a host crash could).
    pub fn al_synced(&self, upto: u64) {
        self.al_durable_seq.fetch_max(upto, Ordering::SeqCst);
    }

    /// Where the log lives, for a ranged fdatasync on a ring: (fd, offset, length); None in
    /// memory. The same range as `al_sync` (msync(MS_SYNC) is a ranged fdatasync of the file).
    pub fn al_sync_range(&self) -> Option<(std::os::fd::RawFd, u64, u32)> {
        use std::os::fd::AsRawFd;
        let Storage::File { file, .. } = &self.storage else {
            return None;
        };
        let (offset, len) = self.al_bytes();
        Some((
            file.as_raw_fd(),
            offset as u64,
            u32::try_from(len).unwrap_or(u32::MAX),
        ))
    }

    /// The most extents the hot set keeps while a mirror takes writes (at least 1).
    pub fn set_al_bound(&self, extents: usize) {
        self.al_bound.store(extents.max(1), Ordering::Relaxed);
    }

    pub fn al_bound(&self) -> usize {
        self.al_bound.load(Ordering::Relaxed)
    }

    /// What retiring brings the hot set down to, once it is (nearly) full: 3/4 of the bound, so
    /// that the next bound/4 cold extents need none.
    fn al_low_water(&self) -> usize {
        self.al_bound() * 3 / 4
    }

    /// About once a second while a mirror takes writes: moves the clock and, when the hot set
    /// is nearly full (over 7/8 of the bound), retires the least recently used idle extents
    /// down to 3/4 of it, so that a cold write rarely has to. Returns how many retired.
    pub fn retire_cold(&self) -> usize {
        self.al_clock.fetch_add(1, Ordering::Relaxed);
        let bound = self.al_bound();
        let hot = self.al_hot.load(Ordering::SeqCst);
        if hot * 8 <= bound * 7 {
            return 0;
        }
        let _g = lock(&self.al_lock);
        let hot = self.al_hot.load(Ordering::SeqCst);
        let n = self.retire_lru_locked(hot.saturating_sub(self.al_low_water()));
        if n > 0 {
            if let Err(e) = self.al_sync() {
                log::warn!("activity log: writing it to disk failed: {e}");
            }
        }
        n
    }

    /// With `al_lock` held: clears up to `n` idle logged extents, least recently used first
    /// (after writing the bitmap back, as `clear_idle_locked`); the caller writes the log.
    fn retire_lru_locked(&self, n: usize) -> usize {
        let mut idle: Vec<(u32, usize)> = (0..self.al_inflight.len())
            .filter(|&e| self.al_bit(e) && self.al_inflight[e].load(Ordering::SeqCst) == 0)
            .map(|e| (self.al_last_use[e].load(Ordering::Relaxed), e))
            .collect();
        idle.sort_unstable();
        let chosen: Vec<usize> = idle.into_iter().take(n).map(|(_, e)| e).collect();
        let cleared = self.clear_idle_locked(chosen.into_iter());
        self.al_retired.fetch_add(cleared as u64, Ordering::Relaxed);
        cleared
    }

    /// After both legs of the write that `al_begin` announced have completed and, if the
    /// target did not take it, after it was marked out of sync. While no mirror takes writes,
    /// an extent this leaves idle is cleared at once (see `clear_idle`).
    pub fn al_end(&self, offset: u64, len: u64) {
        let mut idle = false;
        for e in self.extents_of(offset, len) {
            idle |= self.al_inflight[e].fetch_sub(1, Ordering::SeqCst) == 1;
        }
        // SeqCst, paired with `set_mirroring`: either this load sees the eager mode, or the
        // cleaning that follows its store sees this extent idle.
        if idle && self.al_eager.load(Ordering::SeqCst) {
            self.clear_idle(self.extents_of(offset, len));
        }
    }

    /// Whether a mirror takes writes now; the caller says so after every change (attached,
    /// failed, stopping, detached). While none does, every write it had was or will be failed
    /// back to its queue, which marks it out of sync before `al_end`, and later writes go
    /// local-only, marked before they are issued: nothing needs the log once a write ended.
    /// So the idle extents are cleared now and each busy one when its last write ends, and a
    /// crash from then on adds nothing to the bitmap. Returns how many were cleared now.
    pub fn set_mirroring(&self, mirroring: bool) -> usize {
        self.al_eager.store(!mirroring, Ordering::SeqCst);
        if mirroring {
            0
        } else {
            self.clean_activity_log()
        }
    }

    /// Clears the bits of every extent with no write in flight (the log while no mirror
    /// takes writes); returns how many were cleared.
    pub fn clean_activity_log(&self) -> usize {
        self.clear_idle(0..self.al_inflight.len())
    }

    /// Clears the bits of the extents in `extents` that have no write in flight, after
    /// writing the bitmap back; returns how many were cleared.
    ///
    /// Crash safety, step by step. (1) An extent is claimed only when its in-flight count is
    /// 0: every write that `al_begin` logged in it has passed `al_end`, so both of its legs
    /// completed and, if the target did not take it, its granules were marked (the queue marks
    /// before `al_end`; `mark` counts itself in `marks` after setting the bits, and the
    /// SeqCst count it decremented orders that before the claim). Writers arriving now see
    /// CLEARING and wait for `al_lock` (through the write-back), then set the bit again.
    /// (2) `write_back_marks` puts every mark counted so far on disk, those of step 1
    /// included. (3) Only then are the bits cleared, in memory (which the kernel may write
    /// back at any time) and on disk. A crash before (3) finds the extent still logged; after
    /// it, the marks are durable. If the write-back fails, nothing is cleared.
    fn clear_idle(&self, extents: std::ops::Range<usize>) -> usize {
        if self.al_inflight.is_empty() {
            return 0;
        }
        let _g = lock(&self.al_lock);
        let n = self.clear_idle_locked(extents);
        if n > 0 {
            if let Err(e) = self.al_sync() {
                log::warn!("activity log: writing it to disk failed: {e}");
            }
        }
        n
    }

    /// `clear_idle` with `al_lock` held, without writing the log (the caller does).
    fn clear_idle_locked(&self, extents: impl Iterator<Item = usize>) -> usize {
        let mut claimed = Vec::new();
        for e in extents {
            if !self.al_bit(e) {
                continue;
            }
            // Writers that arrive meanwhile see CLEARING, wait for al_lock and set it again.
            if self.al_inflight[e]
                .compare_exchange(0, CLEARING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                claimed.push(e);
            }
        }
        if claimed.is_empty() {
            return 0;
        }
        let durable = self.write_back_marks();
        if let Err(err) = &durable {
            log::warn!(
                "out-of-sync bitmap: writing it back failed: {err}; {} extents stay in the \
                 activity log",
                claimed.len()
            );
        }
        for &e in &claimed {
            if durable.is_ok() {
                self.al_words()[e / 64].fetch_and(!(1 << (e % 64)), Ordering::SeqCst);
                self.al_hot.fetch_sub(1, Ordering::SeqCst);
            }
            self.al_inflight[e].fetch_and(!CLEARING, Ordering::SeqCst);
        }
        if durable.is_err() {
            return 0;
        }
        claimed.len()
    }

    /// Writes the header and the bitmap back, so that every mark counted so far is on disk; a
    /// no-op when no mark came since the last write-back that succeeded (or in memory).
    fn write_back_marks(&self) -> std::io::Result<()> {
        let Storage::File { map, .. } = &self.storage else {
            return Ok(());
        };
        let mut done = lock(&self.written_back);
        let marks = self.marks.load(Ordering::Acquire);
        if marks == *done {
            return Ok(());
        }
        #[cfg(test)]
        if self.fail_write_back.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "write-back failure injected by a test",
            ));
        }
        map.flush_range(0, Self::al_offset(self.nwords))?;
        *done = marks;
        Ok(())
    }

    /// Extents in the activity log (hot, or left by a crash).
    pub fn activity_extents(&self) -> usize {
        self.al_words()
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// At open: every extent the log holds may differ between the legs; mark it out of sync
    /// and empty the log. Returns how many extents were absorbed.
    fn absorb_activity_log(&self) -> std::io::Result<u64> {
        let mut n = 0;
        for e in 0..self.al_inflight.len() {
            if self.al_bit(e) {
                self.mark(e as u64 * AL_EXTENT, AL_EXTENT);
                n += 1;
            }
        }
        if n > 0 {
            self.flush()?;
            for w in self.al_words() {
                w.store(0, Ordering::SeqCst);
            }
            self.al_sync()?;
        }
        Ok(n)
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.storage {
            Storage::Memory(v) => v,
            Storage::File { map, .. } => {
                // SAFETY: the mapping is page-aligned, HEADER is a multiple of 8, and it holds
                // nwords * 8 bytes after the header (checked at open); AtomicU64 has the layout
                // of u64, and all access to these words is atomic.
                unsafe {
                    std::slice::from_raw_parts(
                        map.as_ptr().add(HEADER).cast::<AtomicU64>(),
                        self.nwords,
                    )
                }
            }
        }
    }

    /// Writes the bitmap (and the activity log) back to its file (a no-op in memory).
    pub fn flush(&self) -> std::io::Result<()> {
        let Storage::File { map, .. } = &self.storage else {
            return Ok(());
        };
        let mut done = lock(&self.written_back);
        let marks = self.marks.load(Ordering::Acquire);
        map.flush()?;
        *done = marks;
        Ok(())
    }

    pub fn persistent(&self) -> bool {
        matches!(self.storage, Storage::File { .. })
    }

    /// Marks every granule that [offset, offset+len) touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        for g in offset / self.granule..end.div_ceil(self.granule) {
            self.words()[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::Relaxed);
        }
        // After the bits: a write-back that reads this count has them (see `clear_idle`).
        self.marks.fetch_add(1, Ordering::Release);
    }

    /// Clears the granules lying wholly inside [offset, offset+len) (or cut by the device's
    /// end): only a copy that wrote all of a granule to the target may clear it.
    pub fn clear(&self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let first = offset.div_ceil(self.granule);
        let last = if end == self.size {
            end.div_ceil(self.granule)
        } else {
            end / self.granule
        };
        for g in first..last {
            self.words()[(g / 64) as usize].fetch_and(!(1 << (g % 64)), Ordering::Relaxed);
        }
    }

    /// Marks the whole device (a full copy starts from here).
    pub fn mark_all(&self) {
        self.mark(0, self.size);
    }

    /// Dirty bytes (whole granules, the last one cut at the device size).
    pub fn dirty_bytes(&self) -> u64 {
        self.extents().iter().map(|(_, l)| l).sum()
    }

    /// Dirty regions as (offset, length), merged, in order.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.words().iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = (w as u64 * 64 + b) * self.granule;
                let len = self.granule.min(self.size - start);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }

    pub fn granule(&self) -> u64 {
        self.granule
    }
}

#[cfg(test)]
mod tests;
