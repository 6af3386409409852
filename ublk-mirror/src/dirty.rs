//! The out-of-sync bitmap: which granules of the device may differ between the local image
//! and the mirror target. Set from any queue without locks; cleared only by copy and resync
//! (never because one write to a granule completed: the rest of it may still differ).
//!
//! In memory, or (`serve --bitmap PATH`) in a file mapped shared: every bit set is in the page
//! cache at once, so it survives a daemon crash (SIGKILL, abort); a host crash keeps only what
//! was written back, which the daemon forces at pause and at exit (`flush`). The file starts
//! with a header (magic, version, granularity, device size, the image's device and inode,
//! generation) and is refused when it does not match.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const DEFAULT_GRANULE: u64 = 64 << 10;
const MAGIC: &[u8; 8] = b"UBLKMBM\0";
const VERSION: u32 = 1;
const HEADER: usize = 4096;

enum Storage {
    Memory(Vec<AtomicU64>),
    /// The file stays open: it carries the exclusive lock.
    File {
        map: memmap2::MmapMut,
        _lock: std::fs::File,
    },
}

pub struct DirtyMap {
    granule: u64,
    size: u64,
    nwords: usize,
    storage: Storage,
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
        let nwords = size.div_ceil(granule).div_ceil(64) as usize;
        DirtyMap {
            granule,
            size,
            nwords,
            storage: Storage::Memory((0..nwords).map(|_| AtomicU64::new(0)).collect()),
            generation: 0,
        }
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
        let nwords = size.div_ceil(granule).div_ceil(64) as usize;
        let len = (HEADER + nwords * 8) as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        crate::image::lock_exclusive(&file).map_err(|_| BitmapError::Locked {
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
        let generation = if fresh {
            map[0..8].copy_from_slice(MAGIC);
            map[8..12].copy_from_slice(&VERSION.to_le_bytes());
            for (at, v) in [(16, granule), (24, size), (32, dev), (40, ino), (48, 1u64)] {
                map[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            1
        } else {
            let fields = [
                ("granularity", 16, granule),
                ("device size", 24, size),
                ("image device", 32, dev),
                ("image inode", 40, ino),
            ];
            for (what, at, expected) in fields {
                let found = le_u64(&map, at);
                if found != expected {
                    return Err(BitmapError::Mismatch {
                        path: shown,
                        what,
                        found,
                        expected,
                    });
                }
            }
            if map.len() as u64 != len {
                return Err(BitmapError::Mismatch {
                    path: shown,
                    what: "file length",
                    found: map.len() as u64,
                    expected: len,
                });
            }
            let g = le_u64(&map, 48) + 1;
            map[48..56].copy_from_slice(&g.to_le_bytes());
            g
        };
        map.flush().map_err(io)?;
        Ok(DirtyMap {
            granule,
            size,
            nwords,
            storage: Storage::File { map, _lock: file },
            generation,
        })
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

    /// Writes the bitmap back to its file (a no-op in memory).
    pub fn flush(&self) -> std::io::Result<()> {
        match &self.storage {
            Storage::File { map, .. } => map.flush(),
            Storage::Memory(_) => Ok(()),
        }
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
mod tests {
    use super::*;

    #[test]
    fn marks_whole_granules_and_merges_extents() {
        let m = DirtyMap::new(1 << 20, 64 << 10);
        m.mark(100, 10); // granule 0
        m.mark(64 << 10, 1); // granule 1
        m.mark(5 << 16, (2 << 16) + 1); // granules 5, 6, 7
        m.mark(2 << 20, 4096); // beyond the end: ignored
        assert_eq!(m.extents(), vec![(0, 128 << 10), (5 << 16, 3 << 16)]);
        assert_eq!(m.dirty_bytes(), 5 << 16);
    }

    #[test]
    fn clears_only_whole_granules() {
        let m = DirtyMap::new(1 << 20, 64 << 10);
        m.mark_all();
        m.clear(1000, 200 << 10); // covers granules 1 and 2 wholly, 0 and 3 partly
        assert_eq!(
            m.extents(),
            vec![(0, 64 << 10), (3 << 16, (1 << 20) - (3 << 16))]
        );
        m.clear(0, 1 << 20);
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn a_bitmap_file_survives_reopening_and_refuses_another_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::write(&img, [0u8; 4096]).expect("image");
        let bm = dir.path().join("disk.bitmap");
        let m = DirtyMap::open_file(&bm, &img, 1 << 30, 64 << 10).expect("create");
        assert_eq!(m.generation, 1);
        m.mark(5 << 20, 4096);
        assert!(matches!(
            DirtyMap::open_file(&bm, &img, 1 << 30, 64 << 10),
            Err(BitmapError::Locked { .. })
        ));
        drop(m); // as a crash would: no flush
        let m = DirtyMap::open_file(&bm, &img, 1 << 30, 64 << 10).expect("reopen");
        assert_eq!(m.generation, 2);
        assert_eq!(m.extents(), vec![(5 << 20, 64 << 10)]);
        drop(m);
        let err = DirtyMap::open_file(&bm, &img, 2 << 30, 64 << 10)
            .err()
            .expect("size mismatch");
        assert!(err.to_string().contains("device size"), "{err}");
        let other = dir.path().join("other.img");
        std::fs::write(&other, [0u8; 4096]).expect("image");
        let err = DirtyMap::open_file(&bm, &other, 1 << 30, 64 << 10)
            .err()
            .expect("inode mismatch");
        assert!(err.to_string().contains("image inode"), "{err}");
        std::fs::write(&bm, b"garbage").expect("garbage");
        assert!(matches!(
            DirtyMap::open_file(&bm, &img, 1 << 30, 64 << 10),
            Err(BitmapError::NotABitmap { .. })
        ));
    }

    #[test]
    fn last_granule_is_cut_at_the_size() {
        let m = DirtyMap::new(100_000, 64 << 10);
        m.mark(99_000, 1000);
        assert_eq!(m.extents(), vec![(65536, 100_000 - 65536)]);
    }
}
