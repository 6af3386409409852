#!/bin/bash
# Control plane: pause/unpause while fio QD32 verifies. fio sees no error; stats requests sent
# during the pause calls are all answered (the drain takes milliseconds here; the unit tests in
# shared.rs hold a drain open to check stats mid-drain); reqs_outstanding is 0 and writes wait
# (reqs_parked) while paused, and complete after unpause; the image is closed (its OFD lock gone
# from /proc/locks) while paused and locked again after unpause.
# Prints the pause latency (client round trip and the daemon's drain), median of 5.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 1G
start_daemon "$img" --queues 2 --label pause-test
# The daemon's OFD lock on the image (/proc/locks: "N: OFDLCK ADVISORY WRITE -1 MAJ:MIN:INODE ...").
image_locked() { grep -q "OFDLCK.*:$(stat -c %i "$img") " /proc/locks; }
image_locked || { cat /proc/locks; fail "the running daemon holds no lock on its image"; }
[ -S "$CTL" ] || fail "no control socket at $CTL"
[ "$(stat -c %a "$CTL")" = 600 ] || fail "control socket mode $(stat -c %a "$CTL")"
[ "$(stat -c %a /run/ublk-mirror)" = 700 ] || fail "runtime dir mode $(stat -c %a /run/ublk-mirror)"
listed=$(ublk-mirror-ctl list)
[[ $listed == *"$DEV"*running*pause-test* ]] || fail "ublk-mirror-ctl list does not show the daemon: $listed"
fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
    --bs=4k --bsrange=4k-1m --size=1G --time_based --runtime=600 --verify=crc32c \
    --verify_backlog=256 --verify_fatal=1 > "$WORK/fio.out" 2>&1 &
fio_pid=$!
sleep 3
lat=() drain=()
for i in 1 2 3 4 5; do
    # Poll stats while the pause drains: every poll must be answered.
    ( while [ ! -e "$WORK/paused.$i" ]; do
          ctl stats > "$WORK/during.$i.$RANDOM" || echo "STATS FAILED" > "$WORK/stats-failed"
      done ) &
    poller=$!
    t0=$(now_ms)
    ctl pause --timeout 30 > "$WORK/pause.$i" || { cat "$WORK/pause.$i"; fail "pause $i failed"; }
    t1=$(now_ms)
    touch "$WORK/paused.$i"; wait $poller
    [ ! -e "$WORK/stats-failed" ] || fail "a stats request was not answered during a pause"
    lat+=($((t1 - t0)))
    drain+=("$(sed -n 's/^drain_ms: //p' "$WORK/pause.$i")")
    [ "$(ctl_get stats state)" = paused ] || fail "state is not paused"
    [ "$(ctl_get stats reqs_outstanding)" = 0 ] || fail "requests outstanding while paused"
    [ "$(ctl_get info image_open)" = false ] || fail "image still open while paused"
    # Closed means its lock is gone too: no queue ring may still hold the image as a fixed file.
    image_locked && { cat /proc/locks; fail "the image's lock is still held while paused"; }
    sleep 1
    parked=$(ctl_get stats reqs_parked)
    [ "$parked" -gt 0 ] || fail "no request parked while fio runs (got $parked)"
    ctl pause > /dev/null || fail "pausing a paused device must be a no-op"
    before=$(ctl_get stats ops.write.count)
    ctl unpause > /dev/null || fail "unpause $i failed"
    image_locked || { cat /proc/locks; fail "the image is not locked again after unpause"; }
    # Writes must resume: poll (bounded) rather than assume how soon a loaded VM runs fio.
    resumed=0
    for _ in $(seq 300); do
        after=$(ctl_get stats ops.write.count)
        [ "$after" -gt "$before" ] && { resumed=1; break; }
        sleep 0.1
    done
    if [ $resumed = 0 ]; then
        ctl stats; tail -n 20 "$WORK/fio.out"; tail -n 20 "$DAEMON_LOG"
        fail "no writes completed within 30 s after unpause $i"
    fi
    log "cycle $i: pause took ${lat[-1]} ms (client-side), $parked requests parked, writes resumed"
done
kill -INT $fio_pid 2>/dev/null || true; wait $fio_pid || true
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio saw errors"; }
grep -qi "verify:.*bad\|error" "$WORK/fio.out" && { cat "$WORK/fio.out"; fail "fio reported a verify error"; }
echo "PAUSE LATENCY ms (fio QD32 running): round trip ${lat[*]} median $(median "${lat[@]}"); daemon drain ${drain[*]} median $(median "${drain[@]}")"
stop_daemon
[ ! -e "$CTL" ] || fail "control socket left behind"
