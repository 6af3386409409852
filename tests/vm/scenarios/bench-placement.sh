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
# With BENCH_PLACEMENT=mirror, mirrored devices (each over its own nbd-proxy serve in this VM,
# which shares the VM's 2 CPUs as the bench's target does) and dm-raid1 for reference, ratios to
# the first: m-away (1 queue on CPU 1, the default for device id 0), m-fio (1 queue on CPU 0,
# with the one-job fio), m-away-t0 (on CPU 1, its target pinned to CPU 0), m2-away and m2-own
# (2 queues over 2 connections), dm-raid1 (loop + kernel nbd, 1 connection).
#   SCENARIO_TIMEOUT=1200 tests/vm/run bench-placement   (about 11 min; VM_ENV="BENCH_REPS BENCH_SECS BENCH_PLACEMENT")
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
REPS=${BENCH_REPS:-5} SECS=${BENCH_SECS:-4}
declare -A DEVS PIDS
PLACES=(q1 away any own)
[ "${BENCH_PLACEMENT:-}" = 1q ] && PLACES=(q1 own cpu0 cpu1)
CLEANUP=()
if [ "${BENCH_PLACEMENT:-}" = mirror ]; then
    PLACES=(m-away m-fio m-away-t0 m2-away m2-own dm-raid1)
    trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
    port=10820
    for d in "${PLACES[@]}"; do
        make_image "$WORK/$d.img" 256M; make_image "$WORK/$d-remote.img" 256M
        pin=""; [ "$d" = m-away-t0 ] && pin="taskset -c 0"
        $pin nbd-proxy serve --listen "tcp:127.0.0.1:$port" --export "disk=$WORK/$d-remote.img" \
            > "$WORK/$d-target.out" 2> "$WORK/$d-target.log" &
        CLEANUP+=("kill $!")
        wait_port "$port" "$WORK/$d-target.log"
        case $d in
            m-away) start_daemon "$WORK/$d.img" --queues 1 --dev-id 0 ;;
            m-fio) start_daemon "$WORK/$d.img" --queues 1 --dev-id 1 ;;
            m-away-t0) start_daemon "$WORK/$d.img" --queues 1 --dev-id 2 ;;
            m2-away) start_daemon "$WORK/$d.img" --queues 2 ;;
            m2-own) start_daemon "$WORK/$d.img" --queues 2 --queue-cpus own ;;
            dm-raid1)
                loop_dev "$WORK/$d.img"; nbd_attach /dev/nbd0 disk 1 "$port"
                dm_mirror place-raid1 "$LOOP" /dev/nbd0; DEVS[$d]=$DM ;;
        esac
        if [ "$d" != dm-raid1 ]; then
            DEVS[$d]=$DEV; CLEANUP+=("kill $DAEMON_PID")
            n=1; names=p; [ "${d#m2}" != "$d" ] && { n=2; names="p.0 p.1"; }
            nbd-proxy connect --to "tcp:127.0.0.1:$port" --export disk --handoff "$CTL" --name p \
                --connections "$n" > /dev/null || fail "$d: nbd-proxy connect failed"
            # shellcheck disable=SC2086
            ctl mirror-start $names --export disk --timeout 30 > /dev/null || fail "$d: mirror-start failed"
            grep "served on CPUs" "$DAEMON_LOG" | sed "s/^.*INFO/  $d:/" || true
        fi
        port=$((port + 1))
    done
else
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
fi
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
[ "${BENCH_PLACEMENT:-}" = mirror ] && JOBS=(write-qd1 write-1job read-1job write-2jobs)
for rep in $(seq "$REPS"); do
    for j in "${JOBS[@]}"; do
        for d in "${PLACES[@]}"; do R[$d.$j]="${R[$d.$j]:-} $(run "${DEVS[$d]}" "$j")"; done
    done
    log "rep $rep of $REPS done"
done
for j in "${JOBS[@]}"; do
    # shellcheck disable=SC2086
    base=$(median ${R[${PLACES[0]}.$j]})
    line="$j: ${PLACES[0]} $base [${R[${PLACES[0]}.$j]# }]"
    for d in "${PLACES[@]:1}"; do
        # shellcheck disable=SC2086
        m=$(median ${R[$d.$j]})
        line="$line, $d $m ($(awk -v a="$m" -v b="$base" 'BEGIN {printf "%.2fx", a / b}')) [${R[$d.$j]# }]"
    done
    echo "PLACEMENT $line"
done
[ "${BENCH_PLACEMENT:-}" = mirror ] && exit 0
for d in "${PLACES[@]}"; do DAEMON_PID=${PIDS[$d]} DEV=${DEVS[$d]}; DEV_ID=${DEV#/dev/ublkb}; stop_daemon; done
