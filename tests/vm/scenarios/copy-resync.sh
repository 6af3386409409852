#!/bin/bash
# Background copy and resync.
# 1. A 1 GiB image 30% filled with random data in scattered extents (the rest holes) is copied
#    to a target full of garbage while fio randwrite+verify runs at QD32; after `ready` and
#    wait-idle, the images are identical.
# 2. --speed 20MiB: the measured rate (device bytes covered per second, holes included) is
#    within 20% of the limit.
# 3. Target killed at ~50% of a copy (fio stopped at the failure), restarted on the same image;
#    --resync with a new fd copies less than 60% of the device and ends with identical images.
# 5. wait-ready --progress draws a bar on a terminal and plain lines otherwise.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
L=$WORK/local.img R=$WORK/remote.img
garbage() { head -c "$2" < <(tr '\0' '\125' < /dev/zero) > "$1"; }
sparse() { rm -f "$1"; truncate -s "$2" "$1"; }   # holes, unlike make_image's fallocate
fresh() { # SIZE: local holes, remote garbage, target and daemon started
    sparse "$L" "$1"; garbage "$R" "$1"
    start_target "$R"
    start_daemon "$L"
}
finish() { ctl mirror-stop > /dev/null; stop_daemon; stop_pid "$TARGET_PID"; }
identical() { # WHAT
    ctl pause > /dev/null
    blkcmp "$L" "$R" > "$WORK/cmp.out" || { cat "$WORK/cmp.out"; fail "$1: images differ"; }
    ctl unpause > /dev/null
}

# 1.
fill_scattered "$L" 1024
log "local: $(du -m "$L" | cut -f1) MiB allocated of 1024"
garbage "$R" 1G
start_target "$R"
start_daemon "$L" --queues 2
fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
    --bs=4k --size=1G --time_based --runtime=20 --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 > "$WORK/fio.out" 2>&1 &
fp=$!
sleep 1
mirror_to c1 --copy
ctl wait-ready --progress > "$WORK/progress.txt" || { cat "$WORK/progress.txt"; fail "copy did not become ready"; }
wait $fp || { cat "$WORK/fio.out"; fail "fio failed during the copy"; }
grep -q "err= 0" "$WORK/fio.out" || fail "fio errors during the copy"
ctl wait-idle > /dev/null
grep -q "copy copying" "$WORK/progress.txt" || fail "no plain progress lines off a terminal"
[ "$(ctl_get stats mirror.copy.state)" = ready ] || fail "copy not ready"
secs=$(ctl_get stats mirror.copy.elapsed)
identical "full copy"
log "full copy ready: $(tail -n 1 "$WORK/progress.txt"); images identical"
echo "COPY THROUGHPUT: 1073741824 bytes in $secs s = $(awk -v s="$secs" 'BEGIN{printf "%.1f", 1073.741824 / s}') MB/s (30% data, under fio load)"
finish

# 2. Rate limit.
fresh 256M
mirror_to c2 --copy --speed 20MiB
# 5. While it runs: the progress bar on a terminal.
script -qec "ublk-mirror-ctl --socket $CTL wait-ready --progress" /dev/null > "$WORK/tty.txt" \
    || { cat "$WORK/tty.txt"; fail "wait-ready failed"; }
grep -q '\[#*\.*\]' "$WORK/tty.txt" || { cat -v "$WORK/tty.txt" | tail -n 3; fail "no progress bar on a terminal"; }
grep -q $'\r' "$WORK/tty.txt" || fail "the bar is not redrawn in place"
secs=$(ctl_get stats mirror.copy.elapsed)
rate=$(awk -v s="$secs" 'BEGIN{printf "%.2f", 256 / s}')
log "rate-limited copy: 256 MiB in $secs s = $rate MiB/s (limit 20)"
awk -v r="$rate" 'BEGIN{exit !(r >= 16 && r <= 24)}' || fail "rate $rate MiB/s is not within 20% of 20 MiB/s"
identical "rate-limited copy"
finish

# Cancel: mirror-stop in the middle of a copy leaves the device serving, the flag clear, and
# the target merely incomplete.
fresh 256M
mirror_to c4 --copy --speed 20MiB
sleep 2
[ "$(ctl_get stats mirror.copy.state)" = copying ] || fail "copy not running"
ctl mirror-stop > /dev/null || fail "mirror-stop during a copy failed"
[ "$(ctl_get stats mirror.state)" = off ] && [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "not cleanly stopped"
dd if=/dev/urandom of="$DEV" bs=64k count=16 oflag=direct status=none || fail "device not serving after a cancelled copy"
ctl pause > /dev/null
if blkcmp "$L" "$R" > /dev/null; then fail "a cancelled copy cannot have finished"; fi
ctl unpause > /dev/null
log "copy cancelled midway: device serving, target incomplete"
stop_daemon
stop_pid "$TARGET_PID"

# 3. Failure at ~50%, then resync.
fill_scattered "$L" 1024
garbage "$R" 1G
start_target "$R"
start_daemon "$L" --queues 2
fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
    --bs=4k --size=1G --time_based --runtime=120 --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 > "$WORK/fio.out" 2>&1 &
fp=$!
mirror_to c3 --copy --speed 64MiB
while :; do
    done_b=$(ctl_get stats mirror.copy.bytes_done)
    [ "$done_b" -ge $((512 << 20)) ] && break
    sleep 0.2
done
stop_pid "$TARGET_PID" KILL
for _ in $(seq 50); do [ "$(ctl_get stats nbd_mirror_failed)" = 1 ] && break; sleep 0.1; done
kill -INT $fp 2>/dev/null || true; wait $fp || true
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio errors at the failure"; }
[ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "mirror did not fail"
log "target killed after $((done_b >> 20)) MiB copied; $(ctl_get dirty-map dirty_bytes) bytes out of sync"
start_target "$R"
mirror_to r1 --resync
ctl wait-ready > /dev/null || fail "resync did not become ready"
total=$(ctl_get stats mirror.copy.bytes_total)
log "resync copied $total bytes ($((total * 100 / (1 << 30)))% of the device)"
[ "$total" -lt $(( (1 << 30) * 60 / 100 )) ] || fail "resync copied $total bytes, not less than 60% of the device"
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "flag still set after a successful resync"
identical "resync"
log "resync: images identical"
finish
