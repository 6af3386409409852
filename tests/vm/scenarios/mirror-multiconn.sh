#!/bin/bash
# Mirroring over 2 connections on a 2-queue device (each queue drives its own connection on its
# ring), and over 1 connection on 2 queues (queue 1 forwards to queue 0):
#  1. overlap stress: 2 fio jobs, one per CPU (so both queues submit), overlapping random writes
#     to a target that reorders replies; remote == local, 2 runs of 2; and with the range lock
#     off the legs must diverge (the test has teeth);
#  2. 1 connection for 2 queues: the same load, remote == local;
#  3. one of the two connections killed mid-run (its own server SIGKILLed): mirror failed, fio
#     verify clean, every differing block inside the dirty map; and queue 1's connection killed
#     while the guest is idle: the mirror fails within 5 s without a write;
#  4. one connection stalled (its server SIGSTOPped): guest I/O resumes within the timeout + 2 s;
#  5. a target without CAN_MULTI_CONN: 2 connections are refused with the reason, 1 works;
#  6. SIGKILL of a daemon mirroring over 2 connections, then `recover`: the state file named both
#     connections, the successor reports nbd_mirror_failed=1, and fio verify reads back clean.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
L=$WORK/local.img R=$WORK/remote.img RUNTIME=${OVERLAP_RUNTIME:-20}

# connect_n NAME N [PORT]: N connections to 127.0.0.1:PORT (10809) handed over as NAME.0...
connect_n() {
    nbd-proxy connect --to "tcp:127.0.0.1:${3:-10809}" --export disk --handoff "$CTL" --name "$1" \
        --connections "$2" > "$WORK/connect.out" || { cat "$WORK/connect.out"; fail "nbd-proxy connect --connections $2 failed"; }
}
overlap_fio() {
    fio --name=ov --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-64k \
        --norandommap --randrepeat=0 --size=1M --iodepth=32 --numjobs=2 --cpus_allowed=0-1 \
        --cpus_allowed_policy=split --time_based --runtime="$RUNTIME" --group_reporting \
        > "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio failed"; }
}
overlap_run() { # CONNECTIONS -> 0 identical, 1 diverged
    make_image "$L" 64M; make_image "$R" 64M
    start_target "$R" --reorder-jitter 5 --workers 8
    start_daemon "$L" --queues 2
    connect_n ov "$1"
    if [ "$1" = 1 ]; then names=ov; else names="ov.0 ov.1"; fi
    # shellcheck disable=SC2086
    ctl mirror-start $names --export disk > /dev/null || fail "mirror-start $names failed"
    [ "$(ctl_get stats mirror.connections)" = "$1" ] || fail "stats: $(ctl_get stats mirror.connections) connections, not $1"
    overlap_fio
    local rc=0; compare_legs "$L" "$R" || rc=$?
    ctl mirror-stop > /dev/null
    stop_daemon
    stop_pid $TARGET_PID
    local opened; opened=$(grep -c "NBD_CMD_DISC" "$WORK/target.log" || true)
    log "$1 connection(s): $(grep -o 'IOPS=[^,]*' "$WORK/fio.out" | head -n 1), $MIRROR_OPS ops mirrored, $opened ended with DISC: $(head -n 1 "$WORK/cmp.out")"
    [ "$opened" -ge "$1" ] || fail "mirror-stop did not end every connection with NBD_CMD_DISC ($opened of $1)"
    return $rc
}

# 1 and 2.
for run in 1 2; do
    overlap_run 2 || fail "run $run: 2 connections: remote diverged from local with the range lock on"
done
overlap_run 1 || fail "1 connection, 2 queues: remote diverged from local"
export UBLK_MIRROR_DEBUG_NO_RANGE_LOCK=1
if overlap_run 2; then
    fail "with the range lock disabled the legs did not diverge over 2 connections: this test cannot tell"
fi
unset UBLK_MIRROR_DEBUG_NO_RANGE_LOCK
log "without the range lock the legs diverged over 2 connections, as they must"

# Two nbdkit servers on one image: the connections are independent, so one can die alone.
two_servers() { # [--filter=F ...] [-- KEY=VALUE ...]: the same nbdkit options for both
    local filters=() params=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do filters+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    params=("$@")
    nbdkit -f -i 127.0.0.1 -p 10810 -e disk "${filters[@]}" file "$R" "${params[@]}" 2> "$WORK/nbdkit-a.log" & NKA=$!
    nbdkit -f -i 127.0.0.1 -p 10811 -e disk "${filters[@]}" file "$R" "${params[@]}" 2> "$WORK/nbdkit-b.log" & NKB=$!
    wait_port 10810 "$WORK/nbdkit-a.log"; wait_port 10811 "$WORK/nbdkit-b.log"
}
hand_two() { # NAME: NAME.0 to server a, NAME.1 to server b
    for i in 0 1; do
        nbd-proxy connect --to "tcp:127.0.0.1:$((10810 + i))" --export disk --handoff "$CTL" --name "$1.$i" \
            > /dev/null || fail "nbd-proxy connect to server $i failed"
    done
}
fio_bg() { # RUNTIME
    fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
        --bsrange=4k-64k --size=512M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --offset_increment=256M --time_based --runtime="$1" --verify=crc32c --verify_backlog=256 \
        --verify_fatal=1 --group_reporting > "$WORK/fio.out" 2>&1 &
    FIO_PID=$!
}
check_failed() { # WHAT
    wait $FIO_PID || { cat "$WORK/fio.out"; fail "$1: fio failed"; }
    grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "$1: fio saw errors"; }
    [ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "$1: nbd_mirror_failed is not 1"
    log "$1: mirror failed with: $(ctl_get stats mirror.last_error)"
    ctl pause > /dev/null
    blkcmp "$L" "$R" --allowed "$(ctl --json dirty-map)" > "$WORK/cmp.out" \
        || { cat "$WORK/cmp.out"; fail "$1: remote differs from local outside the dirty map"; }
    log "$1: $(head -n 1 "$WORK/cmp.out"); dirty map $(ctl_get dirty-map dirty_bytes) bytes"
    ctl unpause > /dev/null
    ctl mirror-stop > /dev/null
    stop_daemon
}

# 3. One connection killed.
make_image "$L" 1G; make_image "$R" 1G
two_servers
start_daemon "$L" --queues 2
hand_two k
ctl mirror-start k.0 k.1 --export disk > /dev/null || fail "mirror-start over two servers failed"
fio_bg 10; sleep 4
stop_pid "$NKB" KILL
check_failed "connection 1 of 2 killed"
stop_pid "$NKA"

# 3b. Queue 1's connection killed while the guest is idle: queue 1 reads it from the start.
make_image "$L" 64M; make_image "$R" 64M
two_servers
start_daemon "$L" --queues 2
hand_two i
ctl mirror-start i.0 i.1 --export disk > /dev/null || fail "mirror-start over two servers failed"
idle_kill_fails "idle, connection 1 of 2 killed" "$NKB"
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$NKA"

# 4. One connection stalled: a write issued during the stall completes within timeout + 2 s.
make_image "$L" 1G; make_image "$R" 1G
two_servers
start_daemon "$L" --queues 2
hand_two s
ctl mirror-start s.0 s.1 --export disk --timeout 3 > /dev/null || fail "mirror-start failed"
fio_bg 12; sleep 3
kill -STOP "$NKB"
t0=$(now_ms)
for cpu in 0 1; do
    taskset -c "$cpu" dd if=/dev/urandom of="$DEV" bs=4k count=1 seek=$((1000 + cpu)) oflag=direct status=none \
        || fail "write from cpu $cpu failed during a stall"
done
t1=$(now_ms)
log "writes from both CPUs issued as one connection stalled completed after $((t1 - t0)) ms (timeout 3000 ms)"
[ $((t1 - t0)) -le 5000 ] || fail "guest I/O stalled $((t1 - t0)) ms, more than timeout + 2 s"
check_failed "connection 1 of 2 stalled"
kill -CONT "$NKB"; stop_pid "$NKB"; stop_pid "$NKA"

# 5. No CAN_MULTI_CONN: two connections refused, one accepted.
make_image "$L" 64M; make_image "$R" 64M
two_servers --filter=multi-conn -- multi-conn-mode=disable
start_daemon "$L" --queues 2
hand_two m
out=$(ctl mirror-start m.0 m.1 --export disk 2>&1) && fail "2 connections to an export without CAN_MULTI_CONN were accepted"
echo "$out" | grep -q CAN_MULTI_CONN || fail "the refusal does not say why: $out"
log "2 connections without CAN_MULTI_CONN refused: $out"
hand_two m1
ctl mirror-start m1.0 --export disk > /dev/null || fail "1 connection without CAN_MULTI_CONN refused"
dd if=/dev/urandom of="$DEV" bs=64k count=16 oflag=direct status=none
ctl wait-idle > /dev/null
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "mirror over 1 connection failed: $(ctl_get stats mirror.last_error)"
ctl pause > /dev/null
blkcmp "$L" "$R" > /dev/null || fail "1 connection, 2 queues: remote differs"
ctl unpause > /dev/null
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$NKA"; stop_pid "$NKB"

# 6. Crash and recover while mirroring over 2 connections.
make_image "$L" 1G; make_image "$R" 1G
start_target "$R"
start_daemon "$L" --queues 2
connect_n c 2
ctl mirror-start c.0 c.1 --export disk > /dev/null || fail "mirror-start failed"
dev_id=$DEV_ID
grep -q '"c.0"' "/run/ublk-mirror/$dev_id.state" && grep -q '"c.1"' "/run/ublk-mirror/$dev_id.state" \
    || { cat "/run/ublk-mirror/$dev_id.state"; fail "the state file does not name both connections"; }
dd if=/dev/urandom of="$WORK/pattern" bs=1M count=16 status=none
dd if="$WORK/pattern" of="$DEV" bs=64k seek=256 oflag=direct status=none || fail "write failed"
kill -KILL "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
recover_daemon "$dev_id"
[ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "the successor does not report nbd_mirror_failed=1"
dd if="$DEV" of="$WORK/back" bs=64k skip=256 count=256 iflag=direct status=none || fail "read back failed"
cmp "$WORK/pattern" "$WORK/back" || fail "data written before the crash does not read back"
log "recovered a daemon that mirrored over 2 connections: nbd_mirror_failed=1, data verified"
stop_daemon
stop_pid "$TARGET_PID"
log "mirror-multiconn: all cases passed"
