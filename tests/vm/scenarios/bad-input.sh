#!/bin/bash
# Scenario 6: each kind of bad input exits non-zero with its documented message and leaves no
# device behind.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
devs() { { ls /dev/ublkb* /dev/ublkc* 2>/dev/null || true; } | tr '\n' ' '; }
# expect_refusal "MESSAGE" serve-args...: exits non-zero, says MESSAGE, adds no device.
expect_refusal() {
    local want=$1; shift
    local before; before=$(devs)
    local rc=0
    ublk-mirror serve "$@" > "$WORK/out" 2> "$WORK/err" < /dev/null || rc=$?
    [ $rc -ne 0 ] || fail "'serve $*' succeeded; expected: $want"
    grep -qF -- "$want" "$WORK/err" || { cat "$WORK/err"; fail "'serve $*' did not say: $want"; }
    [ "$(devs)" = "$before" ] || fail "'serve $*' left devices: $(devs) (before: $before)"
    log "refused (exit $rc): $(grep -F -- "$want" "$WORK/err" | head -n 1)"
}
make_image "$WORK/good.img" 64M
make_image "$WORK/other.img" 64M
: > "$WORK/empty.img"
head -c 1000 /dev/zero > "$WORK/odd.img"

expect_refusal "cannot open" --image "$WORK/missing.img"
expect_refusal "is empty (0 bytes)" --image "$WORK/empty.img"
expect_refusal "is not a multiple of the 512-byte logical block size" --image "$WORK/odd.img"
expect_refusal "must be a multiple of 4096" --image "$WORK/good.img" --max-io 1000

start_daemon "$WORK/good.img" --dev-id 5
expect_refusal "locked by another process" --image "$WORK/good.img"
expect_refusal "ublk device id 5 is already in use" --image "$WORK/other.img" --dev-id 5
stop_daemon

rmmod ublk_drv || fail "cannot unload ublk_drv to test the missing-driver message"
expect_refusal "modprobe ublk_drv" --image "$WORK/good.img"
insmod /lib/modules/ublk_drv.ko || fail "cannot reload ublk_drv"

# delete: a live daemon's device is refused without --force; a missing device is an error.
start_daemon "$WORK/good.img"
rc=0; ublk-mirror delete --dev-id "$DEV_ID" 2> "$WORK/err" || rc=$?
[ $rc -ne 0 ] && grep -q "still served by pid" "$WORK/err" || fail "delete of a live device was not refused"
stop_daemon
rc=0; ublk-mirror delete --dev-id 77 2> "$WORK/err" || rc=$?
[ $rc -ne 0 ] || fail "delete of a missing device succeeded"
log "delete of a missing device: $(cat "$WORK/err")"

# delete --force under a live daemon: the device goes, and the daemon notices and exits
# instead of holding the char device forever (which would hang DEL_DEV).
start_daemon "$WORK/good.img"
timeout 30 ublk-mirror delete --force --dev-id "$DEV_ID" || fail "delete --force of a live device failed or hung"
for _ in $(seq 60); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.5; done
kill -0 "$DAEMON_PID" 2>/dev/null && fail "daemon still running after its device was deleted"
wait "$DAEMON_PID" || true
grep -q "stopped from outside" "$DAEMON_LOG" || { cat "$DAEMON_LOG"; fail "daemon did not say why it stopped"; }
[ ! -e "$DEV" ] && [ ! -e "/dev/ublkc$DEV_ID" ] || fail "device left after delete --force"
log "delete --force of a live device: daemon exited, device gone"
