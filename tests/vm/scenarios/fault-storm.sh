#!/bin/bash
# Fault storm: STORM_SECS (default 150 in the test command; the documented full storm is 600+)
# of random faults while fio verifies the device, with zero tolerance.
#
# fio: 3 jobs, each on its own 96 MiB region (offset_increment), 4k-64k writes, a flush every
# 32, verify_backlog, verify_fatal. First a self-test proves the verifier has teeth: one block
# corrupted behind fio's back makes fio fail.
#
# Faults, one every 2-6 s at random: the NBD target killed and restarted; stalled past the
# mirror timeout (SIGSTOP/SIGCONT); answering EIO (nbdkit error filter); slowed down (nbdkit
# delay filter); the disk paused and unpaused; the mirror restarted with --resync; the daemon
# SIGKILLed and recovered. After each fault the mirror is healed the way an orchestrator would
# (new connection, mirror-start --resync, wait-ready). Whenever the daemon then reports the
# mirror healthy and, paused, idle, local and remote must be byte-identical.
#
# Pass: 0 fio verify errors, 0 guest-visible I/O errors, every divergence check identical.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
STORM_SECS=${STORM_SECS:-150}
L=$WORK/local.img R=$WORK/remote.img
PORT=10809
declare -A FAULTS=()
CHECKS=0 CRASHES=0 HEALS=0

# --- self-test: a corrupted block must fail fio's verify ---
make_image "$L" 64M
start_daemon "$L"
fio --name=selftest --filename="$DEV" --direct=1 --ioengine=io_uring --rw=write --bs=64k \
    --size=8M --verify=crc32c --do_verify=0 > "$WORK/selftest.out" 2>&1 || fail "self-test write failed"
dd if=/dev/urandom of="$DEV" bs=4k count=1 seek=300 oflag=direct conv=notrunc status=none
if fio --name=selftest --filename="$DEV" --direct=1 --ioengine=io_uring --rw=write --bs=64k \
    --size=8M --verify=crc32c --verify_only --verify_fatal=1 > "$WORK/selftest2.out" 2>&1; then
    fail "self-test: fio did not notice a corrupted block: the storm's verifier would be blind"
fi
grep -q "crc32c: verify failed\|bad magic\|verify: bad" "$WORK/selftest2.out" \
    || { cat "$WORK/selftest2.out"; fail "self-test: fio failed for another reason"; }
stop_daemon
log "self-test: fio caught the corrupted block"

# --- the target: nbdkit on the remote image with the error and delay filters ---
# mode: normal | eio (EIO on every write while $WORK/eio exists) | slow (20 ms per write)
start_nbdkit() { # MODE
    local extra=()
    [ "$1" = slow ] && extra=(delay-write=20ms delay-zero=20ms)
    nbdkit -f -i 127.0.0.1 -p $PORT --filter=error --filter=delay file "$R" \
        error-pwrite=EIO error-pwrite-rate=100% error-pwrite-file="$WORK/eio" "${extra[@]}" \
        2>> "$WORK/nbdkit.log" &
    TARGET_PID=$!
    wait_port $PORT "$WORK/nbdkit.log"
}
N=0
connect_mirror() { # [mirror-start args]: a new connection, mirroring with resync
    N=$((N + 1))
    nbd-proxy connect --to tcp:127.0.0.1:$PORT --export "" --handoff "$CTL" --name "s$N" > /dev/null 2>&1 \
        || return 1
    ctl mirror-start "s$N" --timeout 3 "$@" > /dev/null
}
healthy() {
    local s; s=$(ctl stats)
    grep -q "^nbd_mirror_failed: 0" <<<"$s" && grep -q "^mirror.state: active" <<<"$s" \
        && grep -q "^mirror.dirty_bytes: 0" <<<"$s"
}
# The orchestrator's job after a fault: a working target, a new connection, a resync.
heal() {
    local tries=0
    until healthy; do
        tries=$((tries + 1))
        [ $tries -le 5 ] || fail "the mirror could not be healed after 5 attempts: $(ctl_get stats mirror.last_error)"
        rm -f "$WORK/eio"
        kill -0 "$TARGET_PID" 2>/dev/null || start_nbdkit normal
        kill -CONT "$TARGET_PID" 2>/dev/null || true
        ctl mirror-stop > /dev/null 2>&1 || true
        connect_mirror --resync || { stop_pid "$TARGET_PID" KILL; start_nbdkit normal; continue; }
        ctl wait-ready > /dev/null 2>&1 || true
    done
    HEALS=$((HEALS + 1))
}
# Healthy and (paused) idle: the legs must be identical.
check_identical() {
    ctl pause > /dev/null || fail "pause failed during the storm"
    if healthy && [ "$(ctl_get stats reqs_outstanding)" = 0 ]; then
        blkcmp "$L" "$R" > "$WORK/cmp.out" || { cat "$WORK/cmp.out"; ctl unpause > /dev/null; fail "check $((CHECKS + 1)): healthy and idle, yet local and remote differ"; }
        CHECKS=$((CHECKS + 1))
        log "divergence check $CHECKS: identical"
    fi
    ctl unpause > /dev/null || fail "unpause failed during the storm"
}

make_image "$L" 384M; make_image "$R" 384M
start_nbdkit normal
start_daemon "$L" --queues 2
ID=$DEV_ID
connect_mirror --copy
ctl wait-ready > /dev/null || fail "initial copy failed"
fio --name=storm --filename="$DEV" --direct=1 --ioengine=io_uring --numjobs=3 --offset_increment=96M \
    --size=96M --rw=randwrite --bsrange=4k-64k --iodepth=8 --fsync=32 --verify=crc32c \
    --verify_backlog=64 --verify_fatal=1 --time_based --runtime=$((STORM_SECS + 30)) \
    --group_reporting > "$WORK/fio.out" 2>&1 &
FIO_PID=$!
start=$(date +%s)
kinds=(target-kill target-stall target-eio target-slow pause resync daemon-kill)
while [ $(( $(date +%s) - start )) -lt "$STORM_SECS" ]; do
    kill -0 $FIO_PID 2>/dev/null || { cat "$WORK/fio.out"; fail "fio ended during the storm"; }
    sleep $((RANDOM % 5 + 2))
    kind=${kinds[RANDOM % ${#kinds[@]}]}
    FAULTS[$kind]=$(( ${FAULTS[$kind]:-0} + 1 ))
    log "fault: $kind"
    case $kind in
        target-kill) stop_pid "$TARGET_PID" KILL; sleep 1; start_nbdkit normal ;;
        target-stall) kill -STOP "$TARGET_PID"; sleep 4; kill -CONT "$TARGET_PID" ;;
        target-eio) touch "$WORK/eio"; sleep 2; rm -f "$WORK/eio" ;;
        target-slow) stop_pid "$TARGET_PID" KILL; start_nbdkit slow; heal; sleep 3; stop_pid "$TARGET_PID" KILL; start_nbdkit normal ;;
        pause) ctl pause > /dev/null || fail "pause failed"; sleep 1; ctl unpause > /dev/null || fail "unpause failed" ;;
        resync) ctl mirror-stop > /dev/null; connect_mirror --resync || true ;;
        daemon-kill)
            stop_pid "$DAEMON_PID" KILL
            sleep 1
            recover_daemon "$ID"
            [ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "a recovered daemon must report the mirror failed"
            CRASHES=$((CRASHES + 1)) ;;
    esac
    heal
    if [ $((RANDOM % 2)) = 0 ]; then check_identical; fi
done
heal
check_identical
log "storm over after $(( $(date +%s) - start )) s; waiting for fio"
wait $FIO_PID || { cat "$WORK/fio.out"; fail "fio failed: the guest saw an error"; }
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio reported errors"; }
grep -E "^ *(write|read):" "$WORK/fio.out" | sed 's/^ */  /'
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$TARGET_PID" KILL
summary=""
for k in "${kinds[@]}"; do summary+=" $k=${FAULTS[$k]:-0}"; done
total=0; for k in "${!FAULTS[@]}"; do total=$((total + FAULTS[$k])); done
echo "STORM: ${STORM_SECS} s, $total faults:$summary; crash/recover cycles $CRASHES; heals $HEALS; divergence checks passed $CHECKS; fio verify errors 0"
[ "$CHECKS" -ge 2 ] || fail "only $CHECKS divergence checks ran"
