#!/bin/bash
# Scenario 1: fio crc32c verify (verify_backlog while writing), random writes then a read-back
# verify pass through a *new* daemon on the same image, 4k and 64k at iodepth 32, over a 1 GiB
# device, with --queues 1 and --queues 2.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
for queues in 1 2; do
    make_image "$img" 1G
    for bs in 4k 64k; do
        case $bs in 4k) io=48M ;; 64k) io=256M ;; esac
        job=(--name="v$bs" --filename=DEV --direct=1 --ioengine=io_uring --iodepth=32
             --rw=randwrite --bs=$bs --size=1G --io_size=$io --randseed=$RANDOM$queues
             --verify=crc32c --verify_fatal=1 --verify_backlog=512 --group_reporting)
        start_daemon "$img" --queues "$queues"
        log "queues=$queues bs=$bs: random writes with verify_backlog"
        fio "${job[@]/DEV/$DEV}" > "$WORK/write.out" || { cat "$WORK/write.out"; fail "fio write+verify failed"; }
        grep -E "^ *write:|err=" "$WORK/write.out"
        stop_daemon
        start_daemon "$img" --queues "$queues"
        log "queues=$queues bs=$bs: read-back verify through a new daemon"
        fio "${job[@]/DEV/$DEV}" --verify_only > "$WORK/read.out" || { cat "$WORK/read.out"; fail "fio read-back verify failed"; }
        grep -E "^ *read:|err=" "$WORK/read.out"
        grep -q "err= 0" "$WORK/read.out" || fail "read-back pass reported errors"
        stop_daemon
        [ "$(exit_stat errors)" = 0 ] || fail "daemon counted errors: $(exit_stat errors)"
    done
done
log "all verify passes clean"
