//! The out-of-sync bitmap: which granules of the device may differ between the local image
//! and the mirror target. Set from any queue without locks; cleared only by copy and resync
//! (never because one write to a granule completed: the rest of it may still differ).

use std::sync::atomic::{AtomicU64, Ordering};

pub const DEFAULT_GRANULE: u64 = 64 << 10;

pub struct DirtyMap {
    granule: u64,
    size: u64,
    words: Vec<AtomicU64>,
}

impl DirtyMap {
    pub fn new(size: u64, granule: u64) -> DirtyMap {
        let granules = size.div_ceil(granule);
        DirtyMap {
            granule,
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Marks every granule that [offset, offset+len) touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        for g in offset / self.granule..end.div_ceil(self.granule) {
            self.words[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::Relaxed);
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
            self.words[(g / 64) as usize].fetch_and(!(1 << (g % 64)), Ordering::Relaxed);
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
        for (w, word) in self.words.iter().enumerate() {
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
    fn last_granule_is_cut_at_the_size() {
        let m = DirtyMap::new(100_000, 64 << 10);
        m.mark(99_000, 1000);
        assert_eq!(m.extents(), vec![(65536, 100_000 - 65536)]);
    }
}
