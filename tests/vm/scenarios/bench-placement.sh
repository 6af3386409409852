#!/bin/bash
# Benchmark (not run by the test command): where the queue threads of a 2-queue device should
# run (`serve --queue-cpus`), against 1 queue, interleaved, medians of BENCH_REPS (5) reps of
# BENCH_SECS (4) s: 4k randread and randwrite at total QD32, one fio job (pinned to CPU 0) and
# two (one per CPU, QD16 each); 4k randwrite QD1 on one job. Prints one line per device and job
# and the ratios to 1 queue.
# With BENCH_PLACEMENT=1q, one queue placed four ways instead, ratios to the first: q1 (the
# default: free to run on any CPU), own (libublk's random pin), cpu0 (the daemon started under
# `taskset -c 0`: on the CPU the one-job runs' fio is pinned to) and cpu1 (`taskset -c 1`: away
# from it).
#   SCENARIO_TIMEOUT=1200 tests/vm/run bench-placement   (about 11 min; VM_ENV="BENCH_REPS BENCH_SECS BENCH_PLACEMENT")
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
REPS=${BENCH_REPS:-5} SECS=${BENCH_SECS:-4}
declare -A DEVS PIDS
PLACES=(q1 away any own)
[ "${BENCH_PLACEMENT:-}" = 1q ] && PLACES=(q1 own cpu0 cpu1)
for d in "${PLACES[@]}"; do
    make_image "$WORK/$d.img" 256M
    case ${BENCH_PLACEMENT:-}:$d in
        *:q1) start_daemon "$WORK/$d.img" --queues 1 ;;
        1q:own) start_daemon "$WORK/$d.img" --queues 1 --queue-cpus own ;;
        1q:cpu0) UBLK_MIRROR="taskset -c 0 ublk-mirror" start_daemon "$WORK/$d.img" --queues 1 ;;
        1q:cpu1) UBLK_MIRROR="taskset -c 1 ublk-mirror" start_daemon "$WORK/$d.img" --queues 1 ;;
        *) start_daemon "$WORK/$d.img" --queues 2 --queue-cpus "$d" ;;
    esac
    DEVS[$d]=$DEV PIDS[$d]=$DAEMON_PID
    grep "served on CPUs" "$DAEMON_LOG" | sed 's/^.*INFO/  /' || true
done
declare -A R
run() { # DEV JOB -> IOPS
    local args
    case $2 in
        read-1job) args="--rw=randread --iodepth=32 --numjobs=1 --cpus_allowed=0" ;;
        write-1job) args="--rw=randwrite --iodepth=32 --numjobs=1 --cpus_allowed=0" ;;
        read-2jobs) args="--rw=randread --iodepth=16 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split" ;;
        write-2jobs) args="--rw=randwrite --iodepth=16 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split" ;;
        write-qd1) args="--rw=randwrite --iodepth=1 --numjobs=1 --cpus_allowed=0" ;;
    esac
    # shellcheck disable=SC2086
    fio --name=p --filename="$1" --direct=1 --ioengine=io_uring --bs=4k --size=256M --time_based \
        --runtime="$SECS" --ramp_time=1 --group_reporting $args --output-format=terse --terse-version=3 \
        2> /dev/null | awk -F';' '$1 == 3 {print $8 + $49}'
}
JOBS=(read-1job write-1job read-2jobs write-2jobs write-qd1)
for rep in $(seq "$REPS"); do
    for j in "${JOBS[@]}"; do
        for d in "${PLACES[@]}"; do R[$d.$j]="${R[$d.$j]:-} $(run "${DEVS[$d]}" "$j")"; done
    done
    log "rep $rep of $REPS done"
done
for j in "${JOBS[@]}"; do
    # shellcheck disable=SC2086
    base=$(median ${R[q1.$j]})
    line="$j: q1 $base"
    for d in "${PLACES[@]:1}"; do
        # shellcheck disable=SC2086
        m=$(median ${R[$d.$j]})
        line="$line, $d $m ($(awk -v a="$m" -v b="$base" 'BEGIN {printf "%.2fx", a / b}'))"
    done
    echo "PLACEMENT $line"
done
for d in "${PLACES[@]}"; do DAEMON_PID=${PIDS[$d]} DEV=${DEVS[$d]}; DEV_ID=${DEV#/dev/ublkb}; stop_daemon; done
