#!/bin/bash
# Scenario 3: FLUSH and FUA reach the daemon. The device advertises a write-back cache and FUA,
# and the daemon's flush and FUA counters grow by at least what fio issued.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 256M
start_daemon "$img"
[ "$(sysfs_queue write_cache)" = "write back" ] || fail "write_cache is '$(sysfs_queue write_cache)'"
[ "$(sysfs_queue fua)" = 1 ] || fail "queue/fua is '$(sysfs_queue fua)'"
n=512
log "fio: $n writes, each followed by fsync"
fio --name=fsync --filename="$DEV" --direct=1 --ioengine=psync --rw=write --bs=4k \
    --size=$((n * 4))k --fsync=1 > "$WORK/fsync.out" || { cat "$WORK/fsync.out"; fail "fsync job failed"; }
log "fio: $n O_SYNC writes (FUA)"
fio --name=fua --filename="$DEV" --direct=1 --ioengine=psync --rw=write --bs=4k \
    --offset=64M --size=$((n * 4))k --sync=1 > "$WORK/fua.out" || { cat "$WORK/fua.out"; fail "sync job failed"; }
stop_daemon
flushes=$(exit_stat flushes); fua=$(exit_stat fua_writes); writes=$(exit_stat writes)
log "daemon counted flushes=$flushes fua_writes=$fua writes=$writes"
[ "$flushes" -ge "$n" ] || fail "expected >= $n flushes at the daemon, got $flushes"
[ "$fua" -ge "$n" ] || fail "expected >= $n FUA writes at the daemon, got $fua"
[ "$fua" -le "$writes" ] || fail "more FUA writes than writes?"
