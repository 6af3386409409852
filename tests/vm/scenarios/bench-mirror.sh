#!/bin/bash
# Benchmark (not part of the default test run): fio 4k randwrite at QD32 and QD1 on the device
# with the mirror off and on (target: nbd-proxy serve in the same VM, images on tmpfs),
# interleaved off/on over REPS repetitions; prints medians and on/off ratios.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
REPS=${REPS:-3} SECS=${SECS:-6}
make_image "$WORK/local.img" 1G; make_image "$WORK/remote.img" 1G
start_target "$WORK/remote.img"
start_daemon "$WORK/local.img"
job() { # QD -> "iops lat_mean_us"
    fio --name=b --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
        --iodepth="$1" --size=1G --time_based --runtime="$SECS" --ramp_time=1 \
        --output-format=terse --terse-version=3 | awk -F';' '{printf "%d %.0f\n", $49, $81}'
}
declare -A r
n=0
for rep in $(seq "$REPS"); do
    for mode in off on; do
        if [ $mode = on ]; then n=$((n + 1)); mirror_to "b$n"; fi
        for qd in 32 1; do
            read -r iops lat < <(job $qd)
            r[$mode.$qd.iops]+="$iops " r[$mode.$qd.lat]+="$lat "
            log "rep $rep mirror $mode QD$qd: $iops IOPS, mean latency $lat us"
        done
        if [ $mode = on ]; then
            [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "mirror failed during the benchmark"
            ctl mirror-stop > /dev/null
        fi
    done
done
stop_daemon
stop_pid $TARGET_PID
for qd in 32 1; do
    off_i=$(median ${r[off.$qd.iops]}) on_i=$(median ${r[on.$qd.iops]})
    off_l=$(median ${r[off.$qd.lat]}) on_l=$(median ${r[on.$qd.lat]})
    echo "BENCH 4k randwrite QD$qd: IOPS off $off_i, on $on_i, on/off $(awk -v a="$on_i" -v b="$off_i" 'BEGIN{printf "%.2f", a/b}'); mean latency us off $off_l, on $on_l, on/off $(awk -v a="$on_l" -v b="$off_l" 'BEGIN{printf "%.2f", a/b}')"
done
