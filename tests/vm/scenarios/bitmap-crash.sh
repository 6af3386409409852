#!/bin/bash
# The persistent out-of-sync bitmap survives a daemon crash: a mirror fails (target killed),
# local-only writes mark the bitmap, the daemon empties the activity log (every write that may
# differ is in the bitmap by then) and is SIGKILLed; `ublk-mirror delete` removes the orphaned
# device, a new daemon on the same image and bitmap finds exactly the same out-of-sync bytes
# (generation 2, nothing from the activity log), and a resync to the restarted target
# converges. A bitmap belonging to another image, or one in use, is refused.
# Then the activity log's bound: random writes over all 64 extents of a mirrored device with
# --al-extents 8 keep at most 8 logged; SIGKILL while mirroring, and the successor's bitmap holds
# at most those 8 extents (32 MiB), not the 256 MiB the writes covered.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
L=$WORK/local.img R=$WORK/remote.img BM=$WORK/disk.bitmap
make_image "$L" 256M; make_image "$R" 256M
start_target "$R"
start_daemon "$L" --dev-id 6 --bitmap "$BM"
mirror_to b1
fio --name=m --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite --bs=4k \
    --size=256M --io_size=16M --verify=crc32c > "$WORK/fio.out" || fail "mirrored fio failed"
stop_pid "$TARGET_PID" KILL
head -c 16M /dev/urandom | dd of="$DEV" bs=1M seek=100 oflag=direct status=none
[ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "mirror did not fail"
# The mirrored writes (fio's, and any in flight when the target died) logged their extents in
# the activity log. Once the failed mirror's last write has ended the daemon clears the log:
# wait for that state, not for a cleaning on a timer, so that the crash adds nothing.
ms=$(wait_stat mirror.activity_log_extents 0 30000) || fail "activity log not empty 30 s after the mirror failed"
log "activity log empty $ms ms after the local-only writes"
before=$(ctl_get dirty-map dirty_bytes)
[ "$before" -ge $((16 << 20)) ] || fail "local-only writes not in the bitmap ($before bytes)"
stop_pid "$DAEMON_PID" KILL
log "daemon SIGKILLed with $before bytes out of sync"
[ -e /dev/ublkc6 ] || fail "expected the crashed daemon's device to remain"
ublk-mirror delete --dev-id 6 || fail "delete of the orphaned device failed"
[ ! -e /dev/ublkc6 ] || fail "device still there after delete"
rm -f /run/ublk-mirror/6.sock

# Another image with this bitmap is refused.
make_image "$WORK/other.img" 256M
out=$(ublk-mirror serve --image "$WORK/other.img" --bitmap "$BM" 2>&1) && fail "a foreign bitmap was accepted"
[[ $out == *"belongs to another disk"* ]] || fail "unclear refusal: $out"

start_daemon "$L" --dev-id 6 --bitmap "$BM"
grep -q "generation 2" "$DAEMON_LOG" || { cat "$DAEMON_LOG"; fail "bitmap generation not 2"; }
if grep -q "came from the activity log" "$DAEMON_LOG"; then
    cat "$DAEMON_LOG"; fail "the crash left extents in the activity log"
fi
after=$(ctl_get dirty-map dirty_bytes)
[ "$after" = "$before" ] || fail "bitmap did not survive: $before bytes before the crash, $after after"
out=$(ublk-mirror serve --image "$WORK/other.img" --bitmap "$BM" 2>&1) && fail "a bitmap in use was accepted"
[[ $out == *"in use"* ]] || fail "unclear refusal: $out"
start_target "$R"
nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --handoff "$CTL" --name r1 > /dev/null
ctl mirror-start r1 --export disk --resync > /dev/null || fail "resync failed to start"
ctl wait-ready > /dev/null || fail "resync not ready"
[ "$(ctl_get dirty-map dirty_bytes)" = 0 ] || fail "bits left after the resync"
ctl pause > /dev/null
blkcmp "$L" "$R" > "$WORK/cmp.out" || { cat "$WORK/cmp.out"; fail "images differ after the resync"; }
ctl unpause > /dev/null
log "bitmap survived the crash ($after bytes), resync converged: images identical"
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$TARGET_PID"

# The bound: --al-extents 8 (depth 4, so the requests in flight cover at most 8 extents).
make_image "$L" 256M; make_image "$R" 256M; rm -f "$BM"
start_target "$R"
start_daemon "$L" --dev-id 6 --bitmap "$BM" --al-extents 8 --depth 4
mirror_to b2
fio --name=spread --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=4 --rw=randwrite \
    --bs=4k --size=256M --io_size=32M > "$WORK/fio-spread.out" || fail "mirrored fio failed"
hot=$(ctl_get stats mirror.activity_log_extents)
log "after random writes over 64 extents with --al-extents 8: $hot extents logged, \
$(ctl_get stats mirror.activity_log_retired) retired in $(ctl_get stats mirror.activity_log_writes) log writes"
[ "$hot" -le 8 ] || fail "the activity log holds $hot extents, more than its bound of 8"
[ "$hot" -ge 1 ] || fail "the activity log is empty while mirroring: the hot set kept nothing"
stop_pid "$DAEMON_PID" KILL
ublk-mirror delete --dev-id 6 || fail "delete of the orphaned device failed"
rm -f /run/ublk-mirror/6.sock
start_daemon "$L" --dev-id 6 --bitmap "$BM" --al-extents 8 --depth 4
recovered=$(ctl_get dirty-map dirty_bytes)
log "after a crash while mirroring: $recovered bytes out of sync (bound 8 x 4 MiB)"
[ "$recovered" -gt 0 ] || fail "the crash while mirroring marked nothing out of sync"
[ "$recovered" -le $((8 << 22)) ] || fail "$recovered bytes out of sync after the crash: more than the bound's 32 MiB"
stop_daemon
stop_pid "$TARGET_PID"
