#!/bin/bash
# Benchmark (run by bench/profile, not by the test command): where a mirrored QD1 write's time
# goes. A 1-queue mirrored device (nbd-proxy serve in this VM as the target) and, beside it, the
# same device unmirrored; 4k randwrite QD1 on each for PROFILE_SECS (15) s while
# `perf record -a -g -e cpu-clock` samples every CPU (needs perf in the guest: bench/profile
# adds the host's). Prints, per device, fio's IOPS and mean latency, then perf's report: the
# share of samples per command, and the top symbols (kernel and user, with their callers
# folded in) of the daemon's queue thread and of the target.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
command -v perf > /dev/null || fail "perf is not in the guest: run this through bench/profile"
SECS=${PROFILE_SECS:-15}
CLEANUP=()
trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
make_image "$WORK/remote.img" 256M; make_image "$WORK/mir.img" 256M; make_image "$WORK/ublk.img" 256M
start_target "$WORK/remote.img"
CLEANUP+=("kill $TARGET_PID")
start_daemon "$WORK/ublk.img" --queues 1
ublk_dev=$DEV; CLEANUP+=("kill $DAEMON_PID")
start_daemon "$WORK/mir.img" --queues 1
mir_dev=$DEV; CLEANUP+=("kill $DAEMON_PID")
mirror_to p --timeout 30
echo 0 > /proc/sys/kernel/kptr_restrict 2>/dev/null || true
echo -1 > /proc/sys/kernel/perf_event_paranoid 2>/dev/null || true

profile() { # NAME DEVICE
    local name=$1 dev=$2
    perf record -q -a -g -e cpu-clock -F 499 -o "$WORK/$name.data" -- \
        fio --name=p --filename="$dev" --ioengine=io_uring --direct=1 --bs=4k --rw=randwrite \
            --iodepth=1 --numjobs=1 --cpus_allowed=0 --size=256M --time_based --runtime="$SECS" \
            --output-format=terse --terse-version=3 > "$WORK/$name.fio" 2> "$WORK/$name.perr" \
        || { cat "$WORK/$name.perr"; fail "perf record or fio failed on $name"; }
    awk -F';' '$1 == 3 {printf "PROFILE %s: IOPS %d, mean latency %.0f us\n", n, $49, $81}' n="$name" "$WORK/$name.fio"
    echo "PROFILE $name: samples per command (all CPUs; the idle task is the CPUs' idle time)"
    perf report -i "$WORK/$name.data" --stdio --no-children -g none --sort comm --percent-limit 1 2> /dev/null \
        | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 12
    echo "PROFILE $name: top symbols (self time, all CPUs, with the command and DSO)"
    perf report -i "$WORK/$name.data" --stdio --no-children -g none --sort comm,dso,sym \
        --percent-limit 0.7 2> /dev/null | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 45
    echo "PROFILE $name: the daemon's own samples, inclusive (callers fold in their callees)"
    perf report -i "$WORK/$name.data" --stdio --children -g none --comm ublk-mirror --sort sym \
        --percent-limit 3 2> /dev/null | grep -v '^#' | grep -v '^$' | sed "s/^/PROFILE $name   /" | head -n 60
}
profile ublk "$ublk_dev"
profile mirrored "$mir_dev"
[ "$(ctl_get stats mirror.state)" = active ] || fail "the mirror did not stay active while profiled"
