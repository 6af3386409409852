#!/bin/bash
# Overlapping writes reach both legs in the same order: fio random writes with norandommap into
# a 1 MiB region, 4 jobs at iodepth 64, 30 s, mirrored to a target that reorders its replies
# (nbd-proxy serve --reorder-jitter); remote == local afterwards, 5 runs out of 5. The same run
# with the range lock disabled (a debug switch) must diverge, or this test proves nothing.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
L=$WORK/local.img R=$WORK/remote.img RUNTIME=${OVERLAP_RUNTIME:-30}
one_run() { # -> 0 identical, 1 diverged
    make_image "$L" 64M; make_image "$R" 64M
    start_target "$R" --reorder-jitter 5 --workers 8
    start_daemon "$L" --queues 2
    mirror_to ov
    fio --name=ov --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-64k \
        --norandommap --randrepeat=0 --size=1M --iodepth=64 --numjobs=4 --time_based \
        --runtime="$RUNTIME" --group_reporting > "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio failed"; }
    local rc=0; compare_legs "$L" "$R" || rc=$?
    stop_daemon
    stop_pid $TARGET_PID
    log "$(grep -o 'IOPS=[^,]*' "$WORK/fio.out" | head -n 1), $MIRROR_OPS ops mirrored: $(head -n 1 "$WORK/cmp.out")"
    return $rc
}
for run in 1 2 3 4 5; do
    one_run || fail "run $run: remote diverged from local with the range lock on"
    log "run $run: remote == local"
done
export UBLK_MIRROR_DEBUG_NO_RANGE_LOCK=1
if one_run; then
    fail "with the range lock disabled the legs did not diverge: this test cannot tell"
fi
unset UBLK_MIRROR_DEBUG_NO_RANGE_LOCK
log "without the range lock the legs diverged, as they must: the test has teeth"
