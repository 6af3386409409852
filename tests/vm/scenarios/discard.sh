#!/bin/bash
# Scenario 4: DISCARD punches holes (reads back zeros, the image's allocation shrinks);
# WRITE_ZEROES reads back zeros and is served as write-zeroes, not as written zeros.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 256M
start_daemon "$img"
wz_max=$(sysfs_queue write_zeroes_max_bytes)
[ "$wz_max" -gt 0 ] || fail "write_zeroes_max_bytes is $wz_max"
[ "$(sysfs_queue discard_max_bytes)" -gt 0 ] || fail "discard_max_bytes is 0"
zeros16=$(head -c 16M /dev/zero | sha256sum)
read16() { dd if="$DEV" bs=1M skip="$1" count=16 iflag=direct status=none | sha256sum; }

head -c 16M /dev/urandom | dd of="$DEV" bs=1M seek=0 oflag=direct status=none
head -c 16M /dev/urandom | dd of="$DEV" bs=1M seek=32 oflag=direct status=none
[ "$(read16 0)" != "$zeros16" ] || fail "random data reads back as zeros?"
blocks_before=$(stat -c %b "$img")

blkdiscard -o 0 -l 16M "$DEV"
[ "$(read16 0)" = "$zeros16" ] || fail "discarded range does not read back zeros"
blocks_after=$(stat -c %b "$img")
log "image blocks (512 B): $blocks_before before discard, $blocks_after after"
[ $((blocks_before - blocks_after)) -ge $((16 << 20 >> 9)) ] || fail "allocation did not shrink by 16 MiB"

blkdiscard -z -o 32M -l 16M "$DEV"
[ "$(read16 32)" = "$zeros16" ] || fail "write-zeroes range does not read back zeros"
stop_daemon
wz=$(exit_stat write_zeroes); wb=$(exit_stat write_bytes); dc=$(exit_stat discards)
log "daemon counted discards=$dc write_zeroes=$wz write_bytes=$wb"
[ "$dc" -ge 1 ] || fail "no discard reached the daemon"
[ "$wz" -ge 1 ] || fail "no write-zeroes reached the daemon"
[ "$wb" -eq $((32 << 20)) ] || fail "write_bytes=$wb: the kernel wrote zeros instead of WRITE_ZEROES"
