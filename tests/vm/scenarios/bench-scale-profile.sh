#!/bin/bash
# Benchmark (not run by the test command): whether 16 daemons at once fall short of one alone
# (bench-matrix's scale row) where 16 kernel loop devices do not. The scale row's workload
# (4k randread QD32, 64 MiB images on ext4 over null_blk, one fio job per device split over
# CPUs 0-1; one device alone: 1 job on CPU 0) on 1 and 16 ublk-mirror daemons and on 1 and 16
# loop devices over the same images (the loop devices only read, beside the idle daemons),
# PROFILE_SECS (10) s each, PROFILE_REPS (5) reps with the four cases interleaved and their
# order rotated each rep. Prints per run: IOPS, the VM's CPU per I/O (busy time from
# /proc/stat), context switches and CPU migrations per I/O (`perf stat -a`); then the per-rep
# ratios 16/1 for daemons and loops and 16 daemons / 16 loops, with their medians; then, for
# one more 16-daemon run under perf record, perf's share of samples per command and symbol.
#   GUEST_EXTRA_TOOLS=$(command -v perf) VM_ENV="PROFILE_SECS PROFILE_REPS" tests/vm/run bench-scale-profile
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
command -v perf > /dev/null || fail "perf is not in the guest: GUEST_EXTRA_TOOLS=\$(command -v perf)"
SECS=${PROFILE_SECS:-10} REPS=${PROFILE_REPS:-5} N=16 MIB=64
CLEANUP=()
trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
echo -1 > /proc/sys/kernel/perf_event_paranoid 2>/dev/null || true
bench_store scaleprof $((N * MIB + 128))
devs=()
for i in $(seq "$N"); do
    store_image "s$i" "$MIB"
    start_daemon "$IMG" --queues 1 > /dev/null
    CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
    devs+=("$DEV")
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

# fio_ios FILE: the I/Os (reads) of the terse fio run in FILE.
fio_ios() { awk -F';' '$1 == 3 {print $8 * s}' s="$SECS" "$1"; }

# case_devs CASE: sets CASE_DEVS to the devices of CASE (one of CASES).
case_devs() {
    case $1 in
        "1 daemon") CASE_DEVS=("${devs[0]}") ;;
        "16 daemons") CASE_DEVS=("${devs[@]}") ;;
        "1 loop") CASE_DEVS=("${loops[0]}") ;;
        "16 loops") CASE_DEVS=("${loops[@]}") ;;
        *) fail "unknown case $1" ;;
    esac
}

# measure NAME DEVICE...: the scale row's fio run under perf stat, and the VM's busy time around
# it; sets IOPS.
measure() {
    local name=$1 b0 b1 ios; shift
    scale_args "$@"
    b0=$(busy_ticks)
    perf stat -a -x, -e context-switches,cpu-migrations -o "$WORK/$name.stat" -- fio "${FIO_ARGS[@]}" \
        > "$WORK/$name.fio" 2> "$WORK/$name.err" \
        || { cat "$WORK/$name.err"; fail "perf stat or fio failed on $name"; }
    b1=$(busy_ticks)
    ios=$(fio_ios "$WORK/$name.fio")
    IOPS=$((ios / SECS))
    # /proc/stat counts USER_HZ ticks, 1/100 s on Linux (no getconf in the guest).
    awk -v n="$name" -v ios="$ios" -v iops="$IOPS" -v busy=$((b1 - b0)) -v sw="$(switches_per_io "$WORK/$name.stat" "$ios")" \
        'BEGIN {printf "SCALEPROF %s: IOPS %d, VM CPU %.0f us per I/O, %s\n", n, iops, busy / 100 * 1e6 / ios, sw}'
}

loops=()
for i in $(seq "$N"); do loop_dev "$STORE/s$i.img"; loops+=("$LOOP"); done

# ratio A B: A / B to two places.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
CASES=("1 daemon" "16 daemons" "1 loop" "16 loops")
declare -A iops
r_daemons=() r_loops=() r_vs=()
for ((rep = 0; rep < REPS; rep++)); do
    for ((k = 0; k < ${#CASES[@]}; k++)); do
        c=${CASES[(k + rep) % ${#CASES[@]}]}
        case_devs "$c"
        measure "rep $rep, $c" "${CASE_DEVS[@]}"
        iops[$c]=$IOPS
    done
    r_daemons+=("$(ratio "${iops[16 daemons]}" "${iops[1 daemon]}")")
    r_loops+=("$(ratio "${iops[16 loops]}" "${iops[1 loop]}")")
    r_vs+=("$(ratio "${iops[16 daemons]}" "${iops[16 loops]}")")
    echo "SCALEPROF rep $rep: 16/1 daemons ${r_daemons[-1]}, 16/1 loops ${r_loops[-1]}, 16 daemons / 16 loops ${r_vs[-1]}"
done
echo "SCALEPROF median of $REPS reps: 16/1 daemons $(median "${r_daemons[@]}") (${r_daemons[*]}), 16/1 loops $(median "${r_loops[@]}") (${r_loops[*]}), 16 daemons / 16 loops $(median "${r_vs[@]}") (${r_vs[*]})"

# record NAME DEVICE...: the same fio run under perf record (cpu-clock at 499 Hz on every CPU);
# prints CPU time per I/O by command, then by command and symbol (each sample is 1/499 s of
# one CPU), so the 1- and 16-device runs compare per I/O, not as shares of different totals.
record() {
    local name=$1 ios; shift
    scale_args "$@"
    perf record -q -a -e cpu-clock -F 499 -o "$WORK/rec.data" -- fio "${FIO_ARGS[@]}" > "$WORK/rec.fio" 2> "$WORK/rec.err" \
        || { cat "$WORK/rec.err"; fail "perf record failed on $name"; }
    ios=$(fio_ios "$WORK/rec.fio")
    echo "SCALEPROF $name under perf record: IOPS $((ios / SECS)); CPU us per I/O by command, then by command and symbol (the idle task is idle time)"
    for sort in comm comm,dso,sym; do
        perf report -i "$WORK/rec.data" --stdio --no-children -n --sort "$sort" --percent-limit 0.7 2> /dev/null \
            | awk -v ios="$ios" '!/^#/ && NF > 2 {n = $2; $1 = ""; $2 = ""; printf "SCALEPROF   %7.1f us %s\n", n / 499 * 1e6 / ios, $0}' \
            | head -n 18 || true
    done
}
for c in "1 daemon" "16 daemons" "16 loops"; do case_devs "$c"; record "$c" "${CASE_DEVS[@]}"; done
