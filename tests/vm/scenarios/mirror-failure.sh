#!/bin/bash
# Mirror failures the guest never sees: the target SIGKILLed, the target answering EIO
# (nbdkit's error filter), the target stalled (SIGSTOP) past the mirror timeout. Each time fio
# verify ends with zero errors, nbd_mirror_failed is 1, and every block where remote differs from
# local lies inside the daemon's dirty map; a stall releases guest I/O within timeout + 2 s.
# And the target SIGKILLed while the guest does no I/O at all: nbd_mirror_failed becomes 1 within
# 5 s without a write to notice it, and the next write is marked out of sync.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
L=$WORK/local.img R=$WORK/remote.img

fio_bg() { # RUNTIME: fio randwrite verify in the background, sets FIO_PID
    fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 --rw=randwrite \
        --bsrange=4k-64k --size=512M --time_based --runtime="$1" --verify=crc32c \
        --verify_backlog=256 --verify_fatal=1 > "$WORK/fio.out" 2>&1 &
    FIO_PID=$!
}
check_outcome() { # WHAT
    wait $FIO_PID || { cat "$WORK/fio.out"; fail "$1: fio failed"; }
    grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "$1: fio saw errors"; }
    [ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "$1: nbd_mirror_failed is not 1"
    [ "$(ctl_get stats mirror.state)" = failed ] || fail "$1: mirror state $(ctl_get stats mirror.state)"
    log "$1: mirror failed with: $(ctl_get stats mirror.last_error)"
    ctl pause > /dev/null
    blkcmp "$L" "$R" --allowed "$(ctl --json dirty-map)" > "$WORK/cmp.out" \
        || { cat "$WORK/cmp.out"; fail "$1: remote differs from local outside the dirty map"; }
    log "$1: $(head -n 1 "$WORK/cmp.out"); dirty map $(ctl_get dirty-map dirty_bytes) bytes; $(tail -n 1 "$WORK/cmp.out")"
    ctl unpause > /dev/null
    ctl mirror-stop > /dev/null
    [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "$1: mirror-stop did not clear the flag"
    stop_daemon
}

# 1. Target killed.
make_image "$L" 1G; make_image "$R" 1G
start_target "$R"
start_daemon "$L" --queues 2
mirror_to t1
fio_bg 10; sleep 4
stop_pid "$TARGET_PID" KILL
check_outcome "target SIGKILL"

# 2. Target answers EIO (from the moment the trigger file appears).
make_image "$L" 1G; make_image "$R" 1G
nbdkit -f -i 127.0.0.1 -p 10809 --filter=error file "$R" error-pwrite=EIO error-pwrite-rate=100% \
    error-pwrite-file="$WORK/trigger" 2> "$WORK/nbdkit.log" &
nk=$!
wait_port 10809
start_daemon "$L" --queues 2
mirror_to t2
fio_bg 10; sleep 4
touch "$WORK/trigger"
check_outcome "target EIO"
stop_pid $nk

# 3. Target stalls: guest I/O resumes within the mirror timeout + 2 s.
make_image "$L" 1G; make_image "$R" 1G
start_target "$R"
start_daemon "$L"
mirror_to t3 --timeout 3
fio_bg 12; sleep 3
kill -STOP "$TARGET_PID"
t0=$(now_ms)
dd if=/dev/urandom of="$DEV" bs=4k count=1 seek=1000 oflag=direct status=none || fail "write failed during a stall"
t1=$(now_ms)
log "a write issued as the target stalled completed after $((t1 - t0)) ms (timeout 3000 ms)"
[ $((t1 - t0)) -le 5000 ] || fail "guest I/O stalled $((t1 - t0)) ms, more than timeout + 2 s"
check_outcome "target SIGSTOP"
kill -CONT "$TARGET_PID"; stop_pid "$TARGET_PID"

# 4. Target killed while the guest is idle: each queue reads its connection from the moment the
#    mirror is published, so the failure shows without a write.
make_image "$L" 64M; make_image "$R" 64M
start_target "$R"
start_daemon "$L" --queues 2
mirror_to t4
idle_kill_fails "idle target SIGKILL" "$TARGET_PID"
dd if=/dev/urandom of="$DEV" bs=4k count=1 seek=10 oflag=direct status=none || fail "a write after the failure failed"
[ "$(ctl_get dirty-map dirty_bytes)" -ge 4096 ] || fail "the write after the idle failure is not marked out of sync"
ctl mirror-stop > /dev/null
stop_daemon
