#!/bin/bash
# Benchmark (not part of the default test run): background copy throughput of a 1 GiB image
# (30% data in scattered extents, the rest holes) to nbd-proxy serve, against nbdcopy of the
# same image to the same server, interleaved, median of REPS; prints MB/s and the ratio.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
REPS=${REPS:-3}
L=$WORK/local.img R=$WORK/remote.img
fill_scattered "$L" 1024
ours=() theirs=()
for rep in $(seq "$REPS"); do
    make_image "$R" 1G
    start_target "$R"
    start_daemon "$L"
    mirror_to c$rep --copy
    ctl wait-ready > /dev/null || fail "copy not ready"
    secs=$(ctl_get stats mirror.copy.elapsed)
    ours+=("$(awk -v s="$secs" 'BEGIN{printf "%.1f", 1073.741824 / s}')")
    ctl mirror-stop > /dev/null
    stop_daemon
    stop_pid "$TARGET_PID"
    make_image "$R" 1G
    start_target "$R"
    t0=$(now_ms)
    nbdcopy --flush "$L" nbd://127.0.0.1:10809/disk || fail "nbdcopy failed"
    t1=$(now_ms)
    theirs+=("$(awk -v ms=$((t1 - t0)) 'BEGIN{printf "%.1f", 1073.741824 / (ms / 1000)}')")
    stop_pid "$TARGET_PID"
    log "rep $rep: ublk-mirror copy ${ours[-1]} MB/s, nbdcopy ${theirs[-1]} MB/s"
done
mo=$(median "${ours[@]}") mt=$(median "${theirs[@]}")
echo "BENCH background copy of 1 GiB (30% data): ublk-mirror $mo MB/s, nbdcopy $mt MB/s, ratio $(awk -v a="$mo" -v b="$mt" 'BEGIN{printf "%.2f", a/b}')"
