#!/bin/bash
# The README's main command: a device from a fresh image, a short fio verify, its description.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
make_image "$WORK/disk.img" 256M
start_daemon "$WORK/disk.img" --label demo-disk
log "fio: 4k random writes with crc32c verification, queue depth 16"
fio --name=demo --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --iodepth=16 --size=256M --io_size=32M --verify=crc32c --verify_fatal=1 \
    >"$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio verify failed"; }
grep -E "^ *(write|read):|err=" "$WORK/fio.out"
log "device:"
echo "  path:          $DEV"
echo "  size:          $(blockdev --getsize64 "$DEV" 2>/dev/null || cat /sys/block/$(basename $DEV)/size) bytes"
echo "  logical block: $(sysfs_queue logical_block_size)"
echo "  write cache:   $(sysfs_queue write_cache), fua=$(sysfs_queue fua)"
echo "  max discard:   $(sysfs_queue discard_max_bytes) bytes"
log "the daemon's own view (ublk-mirror-ctl info):"
ctl info | sed 's/^/  /'
stop_daemon
echo "daemon exit stats: $(grep -o 'stats at exit: .*' "$DAEMON_LOG")"
