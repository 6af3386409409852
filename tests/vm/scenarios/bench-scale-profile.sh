#!/bin/bash
# Benchmark (not run by the test command): why 16 daemons at once fall short of one alone
# (bench-matrix's scale row) while 16 kernel loop devices do not. The scale row's workload
# (4k randread QD32, 64 MiB images on ext4 over null_blk, one fio job per device split over
# CPUs 0-1; one device alone: 1 job on CPU 0) on 1 and 16 ublk-mirror daemons and on 1 and 16
# loop devices over the same images, PROFILE_SECS (10) s each. Prints per run: IOPS, the VM's
# CPU per I/O (busy time from /proc/stat), context switches and CPU migrations per I/O
# (`perf stat -a`), and for the 16-daemon run perf's share of samples per command.
#   GUEST_EXTRA_TOOLS=$(command -v perf) VM_ENV=PROFILE_SECS tests/vm/run bench-scale-profile
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
command -v perf > /dev/null || fail "perf is not in the guest: GUEST_EXTRA_TOOLS=\$(command -v perf)"
SECS=${PROFILE_SECS:-10} N=16 MIB=64
CLEANUP=()
trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
echo -1 > /proc/sys/kernel/perf_event_paranoid 2>/dev/null || true
bench_store scaleprof $((N * MIB + 128))
devs=() pids=()
for i in $(seq "$N"); do
    store_image "s$i" "$MIB"
    start_daemon "$IMG" --queues 1 > /dev/null
    CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
    devs+=("$DEV"); pids+=("$DAEMON_PID")
done

# busy_ticks: the VM's busy jiffies so far (every CPU, all but idle and iowait).
busy_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# scale_args DEVICE...: sets FIO_ARGS to the scale row's fio run on the devices given (one
# device: 1 job on CPU 0; more: one job each, split over CPUs 0-1), a terse line on stdout.
scale_args() {
    local i cpus=(--cpus_allowed=0)
    [ $# -gt 1 ] && cpus=(--cpus_allowed=0-1 --cpus_allowed_policy=split)
    FIO_ARGS=(--ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --time_based
        --runtime="$SECS" --group_reporting --output-format=terse --terse-version=3 "${cpus[@]}")
    for ((i = 1; i <= $#; i++)); do FIO_ARGS+=(--name="j$i" --filename="${!i}"); done
}

# measure NAME DEVICE...: the scale row's fio run under perf stat, and the VM's busy time around it.
measure() {
    local name=$1 b0 b1 ios; shift
    scale_args "$@"
    b0=$(busy_ticks)
    perf stat -a -x, -e context-switches,cpu-migrations -o "$WORK/$name.stat" -- fio "${FIO_ARGS[@]}" \
        > "$WORK/$name.fio" 2> "$WORK/$name.err" \
        || { cat "$WORK/$name.err"; fail "perf stat or fio failed on $name"; }
    b1=$(busy_ticks)
    ios=$(awk -F';' '$1 == 3 {print $8 * s}' s="$SECS" "$WORK/$name.fio")
    # /proc/stat counts USER_HZ ticks, 1/100 s on Linux (no getconf in the guest).
    awk -v n="$name" -v ios="$ios" -v busy=$((b1 - b0)) -v s="$SECS" -v sw="$(switches_per_io "$WORK/$name.stat" "$ios")" \
        'BEGIN {printf "SCALEPROF %s: IOPS %d, VM CPU %.0f us per I/O, %s\n", n, ios / s, busy / 100 * 1e6 / ios, sw}'
}

measure "1 daemon" "${devs[0]}"
measure "16 daemons" "${devs[@]}"
scale_args "${devs[@]}"
perf record -q -a -e cpu-clock -F 499 -o "$WORK/all.data" -- fio "${FIO_ARGS[@]}" > /dev/null 2> "$WORK/rec.err" \
    || { cat "$WORK/rec.err"; fail "perf record failed"; }
echo "SCALEPROF 16 daemons: samples per command (the idle task is the CPUs' idle time)"
perf report -i "$WORK/all.data" --stdio --no-children --sort comm --percent-limit 1 2> /dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/^/SCALEPROF   /' | head -n 12 || true
echo "SCALEPROF 16 daemons: top kernel and user symbols (self time, all CPUs)"
perf report -i "$WORK/all.data" --stdio --no-children --sort comm,sym --percent-limit 1 2> /dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/^/SCALEPROF   /' | head -n 25 || true

for p in "${pids[@]}"; do kill "$p"; wait "$p" || true; done
loops=()
for i in $(seq "$N"); do loop_dev "$STORE/s$i.img"; loops+=("$LOOP"); done
measure "1 loop" "${loops[0]}"
measure "16 loops" "${loops[@]}"
