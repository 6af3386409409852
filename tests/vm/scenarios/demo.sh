#!/bin/bash
# The README's main command: a complete live storage migration of a busy disk, with cutover.
#
#   source host side                          destination host side
#   ublk-mirror on source.img  ==NBD==>       nbd-proxy serve dest.img (--control)
#   (guest fio runs on /dev/ublkbN)
#
# 1. source.img has data (scattered extents); dest.img is garbage, so every byte must be copied.
# 2. A guest-like fio workload (4k random writes with crc32c, rate-limited) runs on the device.
# 3. nbd-proxy connect dials the export and hands the socket to the daemon; mirror-start --copy
#    mirrors every new write and copies what was there before, with a progress display.
# 4. Ready: pause (drains in-flight I/O), compare the destination's bytes with the source's,
#    print stats, stop mirroring and the source daemon.
# 5. Cutover: remove the export (flushes, releases the image), start ublk-mirror on dest.img, and
#    verify the workload's data there with fio's own verify pass.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
SRC=$WORK/source.img DST=$WORK/dest.img
SIZE_MIB=${DEMO_SIZE_MIB:-512}
step() { echo; log "== $* =="; }

step "1. images: source with data, destination full of garbage"
fill_scattered "$SRC" "$SIZE_MIB"
head -c "${SIZE_MIB}M" < <(tr '\0' '\125' < /dev/zero) > "$DST"
echo "  source.img: $SIZE_MIB MiB, $(du -m "$SRC" | cut -f1) MiB allocated (the rest holes)"
echo "  dest.img:   $SIZE_MIB MiB of 0x55 bytes"

step "source daemon and destination export"
start_daemon "$SRC" --queues 2 --label demo-source
start_target "$DST" --control "$WORK/nbd-proxy.sock"
echo "  nbd-proxy serve exports dest.img as 'disk' on tcp:127.0.0.1:10809"

step "2. guest workload on $DEV: 4k random writes, crc32c, QD16, 2500 IOPS"
# A fixed sequence (not time-based) so the same job can re-verify it after the cutover.
JOB=(--name=guest --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k
     --iodepth=16 --offset=0 --size=128M --randrepeat=1 --verify=crc32c --verify_fatal=1 --fsync=64)
fio "${JOB[@]}" --rate_iops=2500 --verify_backlog=512 > "$WORK/fio.out" 2>&1 &
FIO=$!
sleep 2

step "3. connect, hand off the socket, mirror with background copy"
nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --handoff "$CTL" --name dest \
    || fail "nbd-proxy connect failed"
ctl list-fds | sed 's/^/  /'
ctl mirror-start dest --export disk --copy --timeout 10 | sed 's/^/  /'
script -qec "ublk-mirror-ctl --socket $CTL mirror-wait-ready --progress" /dev/null | tr '\r' '\n' \
    | awk 'NR % 8 == 1 || /ready/' | sed 's/^/  /'
[ "$(ctl_get stats mirror.copy.state)" = ready ] || fail "background copy did not become ready"
log "background copy ready in $(printf %.1f "$(ctl_get stats mirror.copy.elapsed)") s; every write is now on both sides"

log "waiting for the guest workload to finish its writes and verify pass"
wait $FIO || { cat "$WORK/fio.out"; fail "the guest workload failed"; }
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "the guest workload saw errors"; }
grep -E "^ *(write|read):" "$WORK/fio.out" | sed 's/^ */  /'

step "4. pause, compare destination with source, stats"
ctl pause | sed 's/^/  /'
[ "$(ctl_get stats reqs_outstanding)" = 0 ] || fail "requests outstanding after pause"
blkcmp "$SRC" "$DST" | sed 's/^/  /' || fail "destination differs from source"
src_sum=$(sha256sum < "$SRC" | cut -d' ' -f1)
dst_sum=$(sha256sum < "$DST" | cut -d' ' -f1)
echo "  sha256 source: $src_sum"
echo "  sha256 dest:   $dst_sum"
[ "$src_sum" = "$dst_sum" ] || fail "checksums differ"
ctl stats | grep -E '^(state|reqs_|nbd_mirror_failed|ops\.(write|flush|errors)|mirror\.(state|target|export|ops|bytes_mirrored|dirty_bytes|last_error|copy\.(state|bytes_done|elapsed)))' \
    | sed 's/^/  /'
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "nbd_mirror_failed is set"
ctl mirror-stop > /dev/null
stop_daemon
log "source daemon stopped (the VM has moved)"

step "5. cutover: remove the export, start ublk-mirror on the destination image"
nbd-proxy control --socket "$WORK/nbd-proxy.sock" remove disk | sed 's/^/  /'
stop_pid "$TARGET_PID"
start_daemon "$DST" --label demo-destination
log "re-verifying the guest's writes on the destination device $DEV"
fio "${JOB[@]}" --verify_only > "$WORK/verify.out" 2>&1 \
    || { cat "$WORK/verify.out"; fail "the workload's data does not verify on the destination"; }
grep -q "err= 0" "$WORK/verify.out" || { cat "$WORK/verify.out"; fail "verify errors on the destination"; }
grep -E "^ *read:" "$WORK/verify.out" | sed 's/^ */  /'
dev_sum=$(sha256sum < "$DEV" | cut -d' ' -f1)
echo "  sha256 of $DEV on the destination: $dev_sum"
[ "$dev_sum" = "$src_sum" ] || fail "the destination device does not read back the source's bytes"
stop_daemon
echo
echo "MIGRATION SUCCEEDED: destination identical to source (sha256 ${src_sum:0:16}...), guest data verified after cutover, 0 I/O errors"
