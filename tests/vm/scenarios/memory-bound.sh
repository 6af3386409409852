#!/bin/bash
# Memory stays bounded, and hostile clients leave the device serving.
# 1. The mirror target is stalled (SIGSTOP) while fio writes at QD128 with the largest requests
#    (512 KiB, the device's max I/O), with mirror timeout 0 (wait forever, the worst case):
#    the daemon's RSS is sampled every second for STALL_SECS (60) and must stay under the bound
#    the design gives (see README: per tag one I/O buffer, which the queue's own connection sends
#    from, with no copy, plus a constant); the control socket keeps answering during the stall; after
#    SIGCONT everything completes.
# 2. A flood of control connections and requests (more clients than the 16 allowed, garbage,
#    huge lines, fds of the wrong kind) while fio verify runs: fio sees no error and the daemon
#    answers stats afterwards.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
STALL_SECS=${STALL_SECS:-60}
L=$WORK/local.img R=$WORK/remote.img
make_image "$L" 1G; make_image "$R" 1G
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }

# 1.
start_target "$R"
start_daemon "$L" --depth 128
mirror_to m --timeout 0
idle_rss=$(rss_kb "$DAEMON_PID")
fio --name=stall --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=128 --rw=randwrite \
    --bs=512k --size=1G --time_based --runtime=$((STALL_SECS + 30)) > "$WORK/fio.out" 2>&1 &
fp=$!
sleep 3
kill -STOP "$TARGET_PID"
peak=0
for s in $(seq "$STALL_SECS"); do
    sleep 1
    r=$(rss_kb "$DAEMON_PID")
    [ "$r" -gt "$peak" ] && peak=$r
    if [ $((s % 20)) = 0 ]; then
        out=$(timeout 5 ublk-mirror-ctl --socket "$CTL" stats) || fail "stats not answered during the stall"
        log "stall ${s}s: RSS $((r / 1024)) MiB, in flight to the target: $(sed -n 's/^mirror.in_flight: //p' <<<"$out")"
    fi
done
hwm=$(awk '/^VmHWM/{print $2}' "/proc/$DAEMON_PID/status")
# Bound: every tag's 512 KiB buffer (the one queue owns the connection and sends from it: no
# copy), 64 MiB for everything else.
bound_kb=$(( (128 * 512) + 64 * 1024 ))
echo "PEAK RSS under a stalled target, QD128 x 512 KiB, ${STALL_SECS} s: $((peak / 1024)) MiB sampled, $((hwm / 1024)) MiB high-water (idle $((idle_rss / 1024)) MiB; bound $((bound_kb / 1024)) MiB)"
[ "$hwm" -le "$bound_kb" ] || fail "RSS high-water $((hwm / 1024)) MiB exceeds the bound $((bound_kb / 1024)) MiB"
kill -CONT "$TARGET_PID"
wait $fp || { cat "$WORK/fio.out"; fail "fio failed after the stall"; }
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "with timeout 0 a stall must not fail the mirror"
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$TARGET_PID"

# 2. Control flood.
make_image "$L" 1G
start_daemon "$L"
fio --name=flood --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
    --bsrange=4k-64k --size=512M --time_based --runtime=20 --verify=crc32c --verify_backlog=128 \
    --verify_fatal=1 > "$WORK/fio2.out" 2>&1 &
fp=$!
pids=()
big=$(head -c 200000 /dev/zero | tr '\0' 'x')
end=$(( $(date +%s) + 15 ))
for w in $(seq 40); do
    (
        while [ "$(date +%s)" -lt "$end" ]; do
            case $((w % 4)) in
                0) ublk-mirror-ctl --socket "$CTL" stats > /dev/null 2>&1 ;;
                1) ublk-mirror-ctl --socket "$CTL" raw "$big" > /dev/null 2>&1 ;;
                2) ublk-mirror-ctl --socket "$CTL" raw '{"cmd":"pass-fd","name":"x"}' > /dev/null 2>&1 ;;
                3) ublk-mirror-ctl --socket "$CTL" pass-fd "$(head -c 300 /dev/zero | tr '\0' n)" --fd 0 > /dev/null 2>&1 ;;
            esac
        done
    ) &
    pids+=($!)
done
wait "${pids[@]}" 2>/dev/null || true
wait $fp || { cat "$WORK/fio2.out"; fail "fio failed during the control flood"; }
grep -q "err= 0" "$WORK/fio2.out" || fail "fio errors during the control flood"
ctl stats > /dev/null || fail "the daemon stopped answering after the flood"
[ "$(ctl list-fds | grep -c name)" -le 40 ] || fail "more than 40 fds stored (MAX_FDS)"
log "control flood from 40 clients for 15 s: fio 0 errors, daemon answering"
stop_daemon
