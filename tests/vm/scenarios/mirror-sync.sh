#!/bin/bash
# Mirror: every write, FUA write, flush, discard and write-zeroes reaches both legs; the target
# (nbdkit with its log filter, so its own log counts what arrived) ends byte-identical to the
# local image. Then mirror-stop during fio: no errors, flag cleared, later writes local-only.
# A socket handed off already negotiated (nbd-proxy connect --negotiate) to qemu-nbd: the daemon
# skips the handshake and mirrors. Refusals: an export smaller than the device, or read-only, is
# refused; the device is fine.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
local_img=$WORK/local.img remote=$WORK/remote.img
make_image "$local_img" 1G; make_image "$remote" 1G
# nbdkit 1.32 colours its error lines on a terminal (and knows no NO_COLOR): its stderr goes to
# a file, as in the other scenarios, so the console stays plain (tests/vm/run's console-plain).
nbdkit -f -i 127.0.0.1 -p 10809 --filter=log file "$remote" logfile="$WORK/target.log" \
    2> "$WORK/nbdkit.stderr" &
nbdkit_pid=$!
wait_port 10809
start_daemon "$local_img" --queues 2
idle_sockets=$(socket_fds "$DAEMON_PID")
mirror_to target
[ "$(socket_fds "$DAEMON_PID")" = $((idle_sockets + 1)) ] \
    || fail "mirroring over 1 connection: $(socket_fds "$DAEMON_PID") sockets, $idle_sockets before"
fio --name=mix --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
    --bsrange=4k-64k --size=512M --io_size=96M --fsync=64 --verify=crc32c --verify_backlog=256 \
    --verify_fatal=1 --randseed=11 > "$WORK/fio1.out" || { cat "$WORK/fio1.out"; fail "fio (mirrored) failed"; }
fio --name=fua --filename="$DEV" --direct=1 --ioengine=psync --rw=write --bs=4k --offset=600M \
    --size=1M --sync=1 > "$WORK/fio2.out" || { cat "$WORK/fio2.out"; fail "fio FUA failed"; }
head -c 16M /dev/urandom | dd of="$DEV" bs=1M seek=700 oflag=direct status=none
blkdiscard -o $((700 << 20)) -l $((8 << 20)) "$DEV"
head -c 16M /dev/urandom | dd of="$DEV" bs=1M seek=800 oflag=direct status=none
blkdiscard -z -o $((800 << 20)) -l $((8 << 20)) "$DEV"
ctl wait-idle > /dev/null
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "mirror failed: $(ctl_get stats mirror.last_error)"
writes=$(grep -c " Write id=" "$WORK/target.log"); fua=$(grep -c " Write id=.* fua=1" "$WORK/target.log")
flushes=$(grep -c " Flush id=" "$WORK/target.log"); zeroes=$(grep -c " Zero id=" "$WORK/target.log")
log "target received: $writes writes ($fua FUA), $flushes flushes, $zeroes write-zeroes"
[ "$fua" -ge 256 ] || fail "expected >= 256 FUA writes at the target, got $fua"
[ "$flushes" -ge 10 ] || fail "expected flushes at the target, got $flushes"
[ "$zeroes" -ge 2 ] || fail "expected the discard and write-zeroes as zeroes at the target, got $zeroes"
# Compare with the daemon paused (image flushed and closed) and the target flushed.
ctl pause > /dev/null
blkcmp "$local_img" "$remote" || fail "remote differs from local after mirroring"
ctl unpause > /dev/null
log "remote == local (1 GiB)"

# mirror-stop during fio.
fio --name=late --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
    --bs=4k --size=256M --time_based --runtime=8 --verify=crc32c --verify_backlog=128 \
    --verify_fatal=1 > "$WORK/fio3.out" 2>&1 &
fp=$!
sleep 3
ctl mirror-stop > /dev/null || fail "mirror-stop failed"
[ "$(ctl_get stats mirror.state)" = off ] || fail "mirror not off after mirror-stop"
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "flag set after a clean stop"
before=$(grep -c " Write id=" "$WORK/target.log")
wait $fp || { cat "$WORK/fio3.out"; fail "fio failed across mirror-stop"; }
grep -q "err= 0" "$WORK/fio3.out" || fail "fio errors across mirror-stop"
after=$(grep -c " Write id=" "$WORK/target.log")
[ "$after" = "$before" ] || fail "writes reached the target after mirror-stop ($before -> $after)"
grep -q "Disconnect" "$WORK/target.log" || fail "the target saw no disconnect"
# The stopped mirror's socket is closed, not held by the queue that drove it.
for _ in $(seq 50); do [ "$(socket_fds "$DAEMON_PID")" = "$idle_sockets" ] && break; sleep 0.1; done
[ "$(socket_fds "$DAEMON_PID")" = "$idle_sockets" ] \
    || fail "after mirror-stop the daemon holds $(socket_fds "$DAEMON_PID") sockets, $idle_sockets before the mirror"
log "mirror-stop: clean, flag clear, later writes local-only"
stop_pid $nbdkit_pid

# Negotiated hand-off, qemu-nbd as the target.
make_image "$WORK/q.img" 1G
qemu-nbd -f raw -t -x disk -b 127.0.0.1 -p 10810 --cache=none "$WORK/q.img" &
qn=$!
wait_port 10810
nbd-proxy connect --to tcp:127.0.0.1:10810 --export disk --handoff "$CTL" --name q --negotiate > /dev/null \
    || fail "negotiated hand-off failed"
ctl list-fds | grep -q "negotiated: true" || ctl --json list-fds | grep -q '"negotiated": true' || fail "fd not marked negotiated"
ctl mirror-start q > /dev/null || fail "mirror-start on a negotiated fd failed"
head -c 4M /dev/urandom > "$WORK/qpat"
dd if="$WORK/qpat" of="$DEV" bs=1M seek=900 oflag=direct status=none
ctl wait-idle > /dev/null; ctl mirror-stop > /dev/null
stop_pid $qn
[ "$(dd if="$WORK/q.img" bs=1M skip=900 count=4 status=none | sha256sum)" = "$(sha256sum < "$WORK/qpat")" ] \
    || fail "qemu-nbd target lacks the data mirrored over a negotiated socket"
log "negotiated hand-off to qemu-nbd: mirrored data is on the target"

# Refusals.
make_image "$WORK/small.img" 512M
start_target "$WORK/small.img"
nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --handoff "$CTL" --name small > /dev/null
out=$(ctl mirror-start small --export disk 2>&1) && fail "a smaller export was accepted"
[[ $out == *"smaller than"* ]] || fail "no clear message for a small export: $out"
stop_pid $TARGET_PID
start_target "$remote" --read-only
nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --handoff "$CTL" --name ro > /dev/null
out=$(ctl mirror-start ro --export disk 2>&1) && fail "a read-only export was accepted"
[[ $out == *"read-only"* ]] || fail "no clear message for a read-only export: $out"
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "a refused mirror set the flag"
dd if=/dev/zero of="$DEV" bs=4k count=16 oflag=direct status=none || fail "device broken after refusals"
stop_pid $TARGET_PID
log "refused: a smaller and a read-only export, clearly"
stop_daemon
