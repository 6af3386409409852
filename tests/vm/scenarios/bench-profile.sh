#!/bin/bash
# Benchmark (run by bench/profile, not by the test command): where a mirrored write's time
# goes. A 1-queue mirrored device (nbd-proxy serve in this VM as the target), beside it the same
# device unmirrored, and the kernel's own mirror (dm-raid1 over a direct-io loop device and
# kernel nbd to the same target); local images on ext4 over null_blk as in bench-matrix
# (lib-bench.sh). 4k randwrite QD1 (or PROFILE_JOB) on each for PROFILE_SECS (15) s while
# `perf record -a -g -e cpu-clock` samples every CPU (needs perf in the guest: bench/profile
# adds the host's). Prints, per device, fio's IOPS (reads and writes) and mean write latency,
# then perf's report: the share of samples per command, and the top symbols (kernel and user,
# with their callers folded in) of the daemon's queue thread and of the target; then, from a
# second run of PROFILE_SECS under `perf stat -a`, context switches and CPU migrations per I/O
# (a switch between processes changes the page tables; a switch to a kernel thread keeps the
# last mm); from a third run, io_uring_enter calls per I/O of each thread alive when perf
# starts (the servers' threads, not fio's). PROFILE_DEVICES names the devices profiled, in
# order and comma-separated (default ublk,mirrored,dm-raid1); rublk adds rublk's loop target
# (lib-bench.sh start_rublk; bench/profile puts rublk in the guest).
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
command -v perf > /dev/null || fail "perf is not in the guest: run this through bench/profile"
SECS=${PROFILE_SECS:-15}
CLEANUP=()
trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
make_image "$WORK/remote.img" 256M; make_image "$WORK/dmr-remote.img" 256M
bench_store profstore $((4 * 256 + 128))   # ublk, mirrored, dm-raid1 and rublk images
start_target "$WORK/remote.img" --export "dmr=$WORK/dmr-remote.img"
CLEANUP+=("kill $TARGET_PID")
# Even device ids: both queue threads on the CPU away from fio's (placement.rs), as in bench-matrix.
store_image ublk 256; start_daemon "$IMG" --queues 1 --dev-id 0
ublk_dev=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
store_image mir 256; start_daemon "$IMG" --queues 1 --dev-id 2
mir_dev=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
mirror_to p --timeout 30
store_image dmr-local 256; loop_dev "$IMG"
nbd_attach /dev/nbd0 dmr 1
dm_mirror profile-raid1 "$LOOP" /dev/nbd0
IFS=, read -r -a DEVICES <<< "${PROFILE_DEVICES:-ublk,mirrored,dm-raid1}"
declare -A DEV=([ublk]=$ublk_dev [mirrored]=$mir_dev [dm-raid1]=$DM)
if [[ " ${DEVICES[*]} " == *" rublk "* ]]; then start_rublk 256; DEV[rublk]=$RUBLK_DEV; fi
for d in "${DEVICES[@]}"; do [ -n "${DEV[$d]:-}" ] || fail "PROFILE_DEVICES: unknown device $d (ublk mirrored dm-raid1 rublk)"; done
echo 0 > /proc/sys/kernel/kptr_restrict 2>/dev/null || true
echo -1 > /proc/sys/kernel/perf_event_paranoid 2>/dev/null || true

# The profiled job (fio's arguments but the device) for SECS s, a terse line: PROFILE_JOB picks
# one of bench-matrix's jobs (MATRIX_JOBS), 4k randwrite QD1 by default, on one submitter.
job=${PROFILE_JOB:-randwrite-4k-qd1}
[ -n "${MATRIX_JOBS[$job]:-}" ] || fail "PROFILE_JOB=$job: one of ${!MATRIX_JOBS[*]}"
read -r rw bs qd <<< "${MATRIX_JOBS[$job]}"
shape=(--rw="$rw" --bs="$bs" --iodepth="$qd")
echo "PROFILE job: $job (${shape[*]}), $SECS s per device"
JOB=(--name=p --ioengine=io_uring --direct=1 "${shape[@]}" --numjobs=1
    --cpus_allowed=0 --size=256M --time_based --runtime="$SECS" --output-format=terse --terse-version=3)
profile() { # NAME DEVICE
    local name=$1 dev=$2
    perf record -q -a -g -e cpu-clock -F 499 -o "$WORK/$name.data" -- fio --filename="$dev" "${JOB[@]}" \
        > "$WORK/$name.fio" 2> "$WORK/$name.perr" \
        || { cat "$WORK/$name.perr"; fail "perf record or fio failed on $name"; }
    awk -F';' '$1 == 3 {printf "PROFILE %s: IOPS %d, mean write latency %.0f us\n", n, $8 + $49, $81}' n="$name" "$WORK/$name.fio"
    echo "PROFILE $name: samples per command (all CPUs; the idle task is the CPUs' idle time)"
    perf report -i "$WORK/$name.data" --stdio --no-children -g none --sort comm --percent-limit 1 2> /dev/null \
        | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 12
    echo "PROFILE $name: top symbols (self time, all CPUs, with the command and DSO)"
    perf report -i "$WORK/$name.data" --stdio --no-children -g none --sort comm,dso,sym \
        --percent-limit 0.7 2> /dev/null | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 45
    local comm=ublk-mirror
    case $name in
        dm-raid1) return ;;   # no daemon: the kernel's mirror runs in fio and kworkers
        rublk) comm=rublk ;;
    esac
    echo "PROFILE $name: the daemon's own samples, inclusive (callers fold in their callees)"
    perf report -i "$WORK/$name.data" --stdio --children -g none --comm "$comm" --sort sym \
        --percent-limit 3 2> /dev/null | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 60
    echo "PROFILE $name: the daemon's user-space code, self time (share of all samples)"
    perf report -i "$WORK/$name.data" --stdio --no-children -g none --comm "$comm" --sort dso,sym \
        --percent-limit 0.15 2> /dev/null | grep -v '^#' | grep -v '^$' | grep -v '\[k\]' \
        | sed "s/^/PROFILE $name   /" | head -n 25
}
# switches NAME DEVICE: context switches and CPU migrations per I/O, whole VM, the same fio job.
switches() {
    local name=$1 dev=$2 ios
    perf stat -a -x, -e context-switches,cpu-migrations -o "$WORK/$name.stat" -- fio --filename="$dev" "${JOB[@]}" \
        > "$WORK/$name.sfio" 2> "$WORK/$name.serr" \
        || { cat "$WORK/$name.serr"; fail "perf stat or fio failed on $name"; }
    ios=$(awk -F';' '$1 == 3 {print ($8 + $49) * s}' s="$SECS" "$WORK/$name.sfio")
    echo "PROFILE $name: $(switches_per_io "$WORK/$name.stat" "$ios") ($ios I/Os)"
    # io_uring_enter calls per I/O (how well the server batches), per command of the threads
    # alive when perf starts (fio's start later and are not listed), where the kernel has the
    # syscall tracepoints.
    if perf stat --per-thread -a -x, -e syscalls:sys_enter_io_uring_enter -o "$WORK/$name.enters" \
        -- fio --filename="$dev" "${JOB[@]}" > "$WORK/$name.efio" 2> "$WORK/$name.eerr"; then
        ios=$(awk -F';' '$1 == 3 {print ($8 + $49) * s}' s="$SECS" "$WORK/$name.efio")
        echo "PROFILE $name: io_uring_enter calls per I/O: $(awk -F, -v ios="$ios" '
            NF > 2 && $2 + 0 > 0 {c = $1; sub(/-[0-9]+$/, "", c); n[c] += $2}
            END {for (c in n) printf "%s %.2f  ", c, n[c] / ios}' "$WORK/$name.enters")"
    else
        echo "PROFILE $name: io_uring_enter calls per I/O: not counted ($(tail -n 1 "$WORK/$name.eerr"))"
    fi
}
for d in "${DEVICES[@]}"; do profile "$d" "${DEV[$d]}"; done
for d in "${DEVICES[@]}"; do switches "$d" "${DEV[$d]}"; done
[ "$(ctl_get stats mirror.state)" = active ] || fail "the mirror did not stay active while profiled"
