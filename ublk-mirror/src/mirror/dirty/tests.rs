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
fn the_activity_log_covers_writes_in_flight_at_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, [0u8; 4096]).expect("image");
    let bm = dir.path().join("disk.bitmap");
    let m = DirtyMap::open_file(&bm, &img, 64 << 20, 64 << 10).expect("create");
    m.al_begin(5 << 20, 4096); // extent 1
    m.al_begin((8 << 20) - 4096, 8192); // extents 1 and 2
    m.al_begin(40 << 20, 4096); // extent 10
    m.al_end(40 << 20, 4096);
    assert_eq!(m.activity_extents(), 3, "hot extents stay until cleaned");
    assert_eq!(
        m.clean_activity_log(),
        1,
        "only the idle extent 10 is cleared"
    );
    assert_eq!(m.activity_extents(), 2);
    assert_eq!(m.dirty_bytes(), 0, "the log is not the bitmap");
    drop(m); // a crash: writes to extents 1 and 2 still in flight
    let m = DirtyMap::open_file(&bm, &img, 64 << 20, 64 << 10).expect("reopen");
    assert_eq!(m.al_recovered, 2);
    assert_eq!(m.extents(), vec![(4 << 20, 8 << 20)]);
    assert_eq!(
        m.activity_extents(),
        0,
        "the log is emptied into the bitmap"
    );
}

#[test]
fn a_write_racing_the_cleaner_keeps_its_extent_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, [0u8; 4096]).expect("image");
    let m = std::sync::Arc::new(
        DirtyMap::open_file(&dir.path().join("b"), &img, 16 << 20, 64 << 10).expect("open"),
    );
    let cleaner = {
        let m = m.clone();
        std::thread::spawn(move || {
            for _ in 0..2000 {
                m.clean_activity_log();
            }
        })
    };
    for _ in 0..2000 {
        m.al_begin(0, 4096);
        // While the write is in flight its extent must be logged, whatever the cleaner does.
        assert!(m.al_bit(0));
        m.al_end(0, 4096);
    }
    cleaner.join().expect("cleaner");
}

/// A 64 MiB device (16 extents) with a bitmap file; the directory holds both.
fn bitmap_file() -> (tempfile::TempDir, DirtyMap) {
    bitmap_file_of(64 << 20)
}

/// A device of `size` bytes with a bitmap file; the directory holds both.
fn bitmap_file_of(size: u64) -> (tempfile::TempDir, DirtyMap) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("disk.img"), [0u8; 4096]).expect("image");
    let m = reopen_of(&dir, size);
    (dir, m)
}

/// Opens the bitmap of `bitmap_file` again (after a drop, which is a crash: no flush).
fn reopen(dir: &tempfile::TempDir) -> DirtyMap {
    reopen_of(dir, 64 << 20)
}

fn reopen_of(dir: &tempfile::TempDir, size: u64) -> DirtyMap {
    let (bm, img) = (dir.path().join("disk.bitmap"), dir.path().join("disk.img"));
    DirtyMap::open_file(&bm, &img, size, 64 << 10).expect("open")
}

fn covers(m: &DirtyMap, offset: u64, len: u64) -> bool {
    m.extents()
        .iter()
        .any(|&(o, l)| o <= offset && offset + len <= o + l)
}

fn marks_on_disk(m: &DirtyMap) -> bool {
    *lock(&m.written_back) == m.marks.load(Ordering::SeqCst)
}

#[test]
fn a_mirror_failure_clears_the_log_only_once_the_marks_are_on_disk() {
    let (_dir, m) = bitmap_file();
    m.set_mirroring(true);
    m.al_begin(5 << 20, 4096); // extent 1: both legs done
    m.al_end(5 << 20, 4096);
    m.al_begin(12 << 20, 4096); // extent 3: in flight when the target fails
    assert_eq!(m.activity_extents(), 2);
    assert_eq!(m.set_mirroring(false), 1, "the idle extent goes at once");
    assert!(m.al_bit(3), "a write in flight keeps its extent");
    // Its target leg failed; the queue marks it, but the bitmap cannot be written back.
    m.mark(12 << 20, 4096);
    assert!(!marks_on_disk(&m));
    m.fail_write_back.store(true, Ordering::SeqCst);
    m.al_end(12 << 20, 4096);
    assert!(m.al_bit(3), "cleared before its mark was on disk");
    assert_eq!(m.clean_activity_log(), 0);
    m.fail_write_back.store(false, Ordering::SeqCst);
    assert_eq!(m.clean_activity_log(), 1);
    assert!(
        marks_on_disk(&m),
        "the mark is written back before the extent is cleared"
    );
    assert_eq!(m.activity_extents(), 0);
}

#[test]
fn a_crash_after_a_mirror_failure_reopens_to_exactly_the_bitmap() {
    let (dir, m) = bitmap_file();
    m.set_mirroring(true);
    for e in 0..16u64 {
        m.al_begin(e * AL_EXTENT + 8192, 4096); // mirrored, both legs done
        m.al_end(e * AL_EXTENT + 8192, 4096);
    }
    m.al_begin(21 << 20, 4096); // extent 5: in flight at the failure
    assert_eq!(m.activity_extents(), 16);
    assert_eq!(m.set_mirroring(false), 15);
    m.mark(21 << 20, 4096); // failed back to its queue
    m.al_end(21 << 20, 4096);
    // A write that saw the mirror taking I/O just before the failure logs itself after it.
    m.al_begin(30 << 20, 8192);
    m.mark(30 << 20, 8192);
    m.al_end(30 << 20, 8192);
    m.mark(50 << 20, 1 << 20); // a later write, local-only
    assert_eq!(m.activity_extents(), 0, "nothing left for the cleaner");
    let before = m.extents();
    assert_eq!(before.len(), 3);
    drop(m); // SIGKILL
    let m = reopen(&dir);
    assert_eq!((m.generation, m.al_recovered), (2, 0));
    assert_eq!(m.extents(), before, "the crash added nothing");
}

#[test]
fn a_crash_between_marking_and_clearing_still_covers_every_write() {
    // A write in flight when the mirror fails, crashed after each step of its end.
    let (off, len) = ((20 << 20) - 4096, 8192); // extents 4 and 5
    let steps = ["al_begin", "failure", "mark", "write-back fails", "al_end"];
    for crash_after in 1..=steps.len() {
        let (dir, m) = bitmap_file();
        m.set_mirroring(true);
        for &step in &steps[..crash_after] {
            match step {
                "al_begin" => m.al_begin(off, len),
                "failure" => assert_eq!(m.set_mirroring(false), 0),
                "mark" => m.mark(off, len),
                "write-back fails" => m.fail_write_back.store(true, Ordering::SeqCst),
                _ => m.al_end(off, len),
            }
        }
        let logged = m.activity_extents();
        drop(m);
        let m = reopen(&dir);
        let what = format!("crash after {:?}", steps[crash_after - 1]);
        assert!(covers(&m, off, len), "{what}: the write is not covered");
        assert_eq!(m.al_recovered, logged as u64, "{what}");
        if crash_after < steps.len() {
            assert_eq!(logged, 2, "{what}: the log must still hold both extents");
        }
    }
    // With the write-back working, the last step clears the log: the bitmap covers alone.
    let (dir, m) = bitmap_file();
    m.set_mirroring(false);
    m.al_begin(off, len);
    m.mark(off, len);
    m.al_end(off, len);
    assert_eq!(m.activity_extents(), 0);
    drop(m);
    let m = reopen(&dir);
    assert_eq!(m.al_recovered, 0);
    assert_eq!(m.extents(), vec![((20 << 20) - (64 << 10), 128 << 10)]);
}

#[test]
fn failed_writes_racing_the_eager_clearing_stay_covered() {
    let (_dir, m) = bitmap_file();
    let m = std::sync::Arc::new(m);
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flipper = {
        let (m, done) = (m.clone(), done.clone());
        std::thread::spawn(move || {
            let mut mirroring = false;
            while !done.load(Ordering::SeqCst) {
                mirroring = !mirroring;
                m.set_mirroring(mirroring);
                m.clean_activity_log();
            }
        })
    };
    for i in 0..1000u64 {
        let off = (i * 7 % 16) * AL_EXTENT + (i % 64) * 4096;
        m.al_begin(off, 4096);
        // Until the write ends, its extent is logged, whoever clears what.
        assert!(m.al_bit((off / AL_EXTENT) as usize));
        m.mark(off, 4096); // its target leg failed
        m.al_end(off, 4096);
        assert!(covers(&m, off, 4096));
    }
    done.store(true, Ordering::SeqCst);
    flipper.join().expect("flipper");
    m.set_mirroring(false);
    assert_eq!(m.activity_extents(), 0);
    assert!(marks_on_disk(&m));
}

#[test]
fn last_granule_is_cut_at_the_size() {
    let m = DirtyMap::new(100_000, 64 << 10);
    m.mark(99_000, 1000);
    assert_eq!(m.extents(), vec![(65536, 100_000 - 65536)]);
}

#[test]
fn the_hot_set_keeps_its_bound_and_retires_the_least_recently_used_idle_extents() {
    let (dir, m) = bitmap_file_of(64 * AL_EXTENT);
    m.set_al_bound(4);
    let write = |e: u64| {
        m.al_begin(e * AL_EXTENT, 4096);
        m.al_end(e * AL_EXTENT, 4096);
    };
    for e in 0..4 {
        write(e);
        m.al_clock.fetch_add(1, Ordering::Relaxed); // extent e was used at tick e
    }
    assert_eq!(m.activity_extents(), 4, "within the bound nothing retires");
    let writes = m.al_writes.load(Ordering::SeqCst);
    write(2);
    assert_eq!(
        m.al_writes.load(Ordering::SeqCst),
        writes,
        "a hot extent costs no log write"
    );
    // A fifth extent: the least recently used idle ones (extents 0 and 1) retire, down to 3/4
    // of the bound with the new one, so the next cold extent needs no retiring.
    write(10);
    assert_eq!(m.activity_extents(), 3);
    assert!(!m.al_bit(0) && !m.al_bit(1) && m.al_bit(2) && m.al_bit(3) && m.al_bit(10));
    let retired = m.al_retired.load(Ordering::Relaxed);
    write(11);
    assert_eq!(m.activity_extents(), 4);
    assert_eq!(
        m.al_retired.load(Ordering::Relaxed),
        retired,
        "retired again at once"
    );
    // An extent with a write in flight never retires, even when it is the oldest.
    m.al_begin(AL_EXTENT, 4096); // extent 1, in flight
    for e in 20..30 {
        write(e);
        assert!(m.activity_extents() <= 4, "the log passed its bound");
    }
    assert!(m.al_bit(1), "a busy extent was retired");
    m.al_end(AL_EXTENT, 4096);
    // A crash now (no flush) marks at most the bound out of sync.
    drop(m);
    let m = reopen_of(&dir, 64 * AL_EXTENT);
    assert!(m.al_recovered <= 4, "{} extents recovered", m.al_recovered);
    assert!(m.dirty_bytes() <= 4 * AL_EXTENT);
}

#[test]
fn the_periodic_cleaner_retires_only_when_the_hot_set_is_nearly_full() {
    let (_dir, m) = bitmap_file_of(64 * AL_EXTENT);
    m.set_al_bound(8);
    for e in 0..7 {
        m.al_begin(e * AL_EXTENT, 4096);
        m.al_end(e * AL_EXTENT, 4096);
    }
    assert_eq!(m.retire_cold(), 0, "7 of 8: nothing to do");
    m.al_begin(7 * AL_EXTENT, 4096);
    m.al_end(7 * AL_EXTENT, 4096);
    assert_eq!(m.retire_cold(), 2, "8 of 8: down to 3/4 of the bound");
    assert_eq!(m.activity_extents(), 6);
}

#[test]
fn a_write_to_an_extent_another_just_logged_waits_until_the_log_is_on_disk() {
    let (_dir, m) = bitmap_file();
    let seq = m
        .al_log(0, 4096)
        .expect("a cold extent must wait for the log");
    assert!(!m.al_is_durable(seq));
    // Another queue's write to the same (now set) extent: hot in memory, not yet on disk.
    let other = m.al_log(8192, 4096).expect("set but not on disk: wait too");
    assert!(other >= seq);
    let upto = m.al_sync_point();
    m.al_synced(upto);
    assert!(m.al_is_durable(seq) && m.al_is_durable(other));
    assert_eq!(m.al_log(16384, 4096), None, "hot and on disk: free");
    for off in [0, 8192, 16384] {
        m.al_end(off, 4096);
    }
}

#[test]
fn the_log_lives_in_the_bitmap_file_after_the_bitmap() {
    let (_dir, m) = bitmap_file();
    let (fd, offset, len) = m.al_sync_range().expect("a file-backed map has a log");
    assert!(fd >= 0 && offset % 4096 == 0 && len > 0);
    assert!(DirtyMap::new(1 << 30, DEFAULT_GRANULE)
        .al_sync_range()
        .is_none());
}
