#!/bin/bash
# Daemon crash and live upgrade without guest errors (USER_RECOVERY | USER_RECOVERY_REISSUE).
# 1. Under fio verify (mixed sizes, QD32, flushes), the daemon is SIGKILLed CYCLES times and each
#    time `ublk-mirror recover` takes the device over: the node never disappears, and fio, which
#    reads back and checks every block shortly after writing it (verify_backlog), finishes with
#    0 errors: no write was lost or failed across the crashes.
# 2. `shutdown --keep` (detach) under the same load, then recover: the live-upgrade path.
# 3. SIGKILL while mirroring: after recover, nbd_mirror_failed is 1, the whole device is out of
#    sync (no bitmap file), mirror-start --resync makes the target identical again.
# 4. Refusals: a device that is still served, a device that does not exist, a missing image, an
#    image another process holds; then `delete` of a dead daemon's device makes waiting I/O fail
#    (an error, not a hang).
# 5. With a bitmap file: SIGKILL while mirroring under fio; the activity log, OR-ed into the
#    bitmap on recovery, covers every block where the legs differ (blkcmp --allowed), yet is
#    far smaller than the device; a resync converges.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
CYCLES=${CYCLES:-3}
L=$WORK/local.img R=$WORK/remote.img
make_image "$L" 512M
run_fio() { # NAME SECONDS: in the background, pid in FIO_PID
    fio_job "$1" --time_based --runtime="$2" > "$WORK/$1.out" 2>&1 &
    FIO_PID=$!
}
# resync_converges NAME: a new connection to the (restarted) target, mirror-start --resync,
# ready; then, paused, local and remote must be identical.
resync_converges() {
    mirror_to "$1" --resync
    ctl wait-ready > /dev/null || fail "$1: the resync did not become ready"
    ctl pause > /dev/null
    blkcmp "$L" "$R" > "$WORK/cmp.out" || { cat "$WORK/cmp.out"; fail "$1: not identical after the resync"; }
    ctl unpause > /dev/null
    ctl mirror-stop > /dev/null
}
fio_ok() { # NAME
    wait "$FIO_PID" || { cat "$WORK/$1.out"; fail "fio $1 failed: the guest saw an error"; }
    grep -q "err= 0" "$WORK/$1.out" || { cat "$WORK/$1.out"; fail "fio $1 reported errors"; }
}

# 1.
start_daemon "$L" --queues 2
id=$DEV_ID
run_fio crash $((8 * CYCLES + 6))
for c in $(seq "$CYCLES"); do
    sleep 4
    before=$(ctl_get stats ops.write.count)
    stop_pid "$DAEMON_PID" KILL
    [ -b "$DEV" ] || fail "cycle $c: $DEV disappeared with its daemon"
    [ -f "/run/ublk-mirror/$id.state" ] || fail "cycle $c: no state file after the crash"
    sleep 2   # guest I/O waits meanwhile
    kill -0 "$FIO_PID" || { cat "$WORK/crash.out"; fail "cycle $c: fio ended while no daemon served the device"; }
    t0=$(now_ms)
    recover_daemon "$id"
    [ "$DEV_ID" = "$id" ] || fail "recovered as $DEV, not device $id"
    log "cycle $c: SIGKILL after $before writes, recovered in $(( $(now_ms) - t0 )) ms"
done
fio_ok crash
log "fio verify through $CYCLES crash/recover cycles: 0 errors"
echo "CRASH CYCLES SURVIVED: $CYCLES"

# 2. Live upgrade: detach, recover.
run_fio upgrade 14
sleep 4
ctl shutdown --keep > /dev/null || fail "shutdown --keep failed"
wait "$DAEMON_PID" || fail "a detaching daemon must exit 0"
[ -b "$DEV" ] || fail "$DEV disappeared on detach"
grep -q '"detached": true' "/run/ublk-mirror/$id.state" || fail "the state file does not record the detach"
recover_daemon "$id"
fio_ok upgrade
grep -q "recovering ublk device $id" "$DAEMON_LOG" || fail "the new daemon did not log the recovery"
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "nbd_mirror_failed set after a detach without a mirror"
log "detach + recover under fio: 0 errors"

# 3. A crash while mirroring.
make_image "$R" 512M
start_target "$R"
mirror_to m1
run_fio mirrored 10
sleep 4
stop_pid "$DAEMON_PID" KILL
grep -q '"target": "m1"' "/run/ublk-mirror/$id.state" || fail "the state file does not record the mirror"
recover_daemon "$id"
fio_ok mirrored
[ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "nbd_mirror_failed is not 1 after recovering a mirroring daemon"
ctl_get stats mirror.last_error | grep -q "died while mirroring" || fail "no reason given for the failed mirror"
[ "$(ctl_get stats mirror.dirty_bytes)" = $((512 << 20)) ] || fail "without a bitmap file, everything must be out of sync"
stop_pid "$TARGET_PID"
start_target "$R"
resync_converges m2
stop_pid "$TARGET_PID"
log "crash while mirroring: flagged failed, resync converged"

# 4. Refusals.
out=$(ublk-mirror recover --dev-id "$id" 2>&1) && fail "recover of a served device succeeded"
echo "$out" | grep -q "served by a running daemon" || fail "unexpected message: $out"
out=$(ublk-mirror recover --dev-id 77 2>&1) && fail "recover of a nonexistent device succeeded"
echo "$out" | grep -qi "no state file\|no longer exists" || fail "unexpected message: $out"
stop_pid "$DAEMON_PID" KILL
mv "$L" "$L.away"
out=$(ublk-mirror recover --dev-id "$id" 2>&1) && fail "recover with a missing image succeeded"
echo "$out" | grep -q "is missing" || fail "unexpected message: $out"
mv "$L.away" "$L"
nbd-proxy serve --listen "unix:$WORK/holder.sock" --export "h=$L" > "$WORK/holder.out" 2>&1 &
holder=$!
for _ in $(seq 50); do grep -q listening "$WORK/holder.out" && break; sleep 0.1; done
out=$(ublk-mirror recover --dev-id "$id" 2>&1) && fail "recover of an image in use succeeded"
echo "$out" | grep -qi "in use\|locked" || fail "unexpected message: $out"
stop_pid "$holder"
[ -b "$DEV" ] || fail "a refused recover must leave the device in place"
echo "refusals: served, nonexistent, image missing, image in use"
# Delete instead of recover: I/O waiting on the device fails instead of hanging forever.
dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct skip=100 2> "$WORK/dd.err" &
dd_pid=$!
sleep 1
kill -0 "$dd_pid" 2>/dev/null || fail "a read completed while no daemon served the device"
ublk-mirror delete --dev-id "$id" > /dev/null || fail "delete of a dead daemon's device failed"
for _ in $(seq 200); do kill -0 "$dd_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$dd_pid" 2>/dev/null && fail "the waiting read still hangs 20 s after delete"
wait "$dd_pid" && fail "the waiting read succeeded after delete"
[ ! -e "$DEV" ] || fail "$DEV still exists after delete"
[ ! -e "/run/ublk-mirror/$id.state" ] || fail "the state file outlived the device"
log "delete: the waiting read failed ($(head -c 80 "$WORK/dd.err")), device and state gone"

# 5. The activity log.
make_image "$L" 512M; make_image "$R" 512M
start_target "$R"
start_daemon "$L" --bitmap "$WORK/bitmap"
id=$DEV_ID
mirror_to a1
fio_job al --rw=randwrite --offset=64M --size=64M --time_based --runtime=30 > "$WORK/al.out" 2>&1 &
FIO_PID=$!
sleep 5
[ "$(ctl_get stats mirror.activity_log_extents)" -gt 0 ] || fail "no extent in the activity log under mirrored writes"
stop_pid "$DAEMON_PID" KILL
stop_pid "$TARGET_PID"   # the target keeps what it got; the legs may now differ
recover_daemon "$id"
grep -q "came from the activity log" "$DAEMON_LOG" || { cat "$DAEMON_LOG"; fail "the recovered daemon did not absorb the activity log"; }
fio_ok al
ctl pause > /dev/null
dirty=$(ctl_get stats mirror.dirty_bytes)
[ "$dirty" -gt 0 ] && [ "$dirty" -le $((96 << 20)) ] || fail "dirty after recovery is $dirty bytes: expected the written region's extents"
blkcmp "$L" "$R" --allowed "$(ctl --json dirty-map)" > "$WORK/cmp.out" \
    || { cat "$WORK/cmp.out"; fail "the legs differ outside what the bitmap + activity log cover"; }
ctl unpause > /dev/null
log "activity log: $dirty bytes out of sync after the crash ($(grep -o '[0-9]* extents of' "$DAEMON_LOG" | head -n 1) 4 MiB), differences all inside"
start_target "$R"
resync_converges a2
stop_daemon
stop_pid "$TARGET_PID"
