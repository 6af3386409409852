#!/bin/bash
# Scenario 5: SIGTERM while fio is writing. The daemon exits 0, the device node disappears,
# and every write fio saw complete is in the image: fio saves its verify state when the device
# goes away, and a verify_only pass against a new device on the same image checks it.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 1G
job=(--name=crash --filename=/dev/ublkb3 --direct=1 --ioengine=io_uring --iodepth=32
     --rw=randwrite --bs=4k --size=1G --io_size=900M --randseed=4242 --verify=crc32c
     --verify_state_save=1)
start_daemon "$img" --dev-id 3 --queues 2
fio "${job[@]}" > "$WORK/fio1.out" 2>&1 &
fio_pid=$!
sleep 4
log "SIGTERM to the daemon while fio runs"
stop_daemon TERM
fio_rc=0; wait $fio_pid || fio_rc=$?
log "fio exited $fio_rc (errors expected: its device went away)"
grep -E "^ *write:|err=" "$WORK/fio1.out" || true
ls "$WORK"/*verify.state >/dev/null 2>&1 || { cat "$WORK/fio1.out"; fail "fio saved no verify state"; }
start_daemon "$img" --dev-id 3 --queues 2
# iodepth=1: fio 3.33 decides which of the last `depth` writes to skip by counting completed
# reads, which at a higher verify depth lags by up to that depth and wrongly checks writes that
# failed when the device went away.
fio "${job[@]}" --iodepth=1 --verify_only --verify_state_load=1 > "$WORK/fio2.out" 2>&1 \
    || { cat "$WORK/fio2.out"; fail "writes fio saw complete are missing from the image"; }
grep -E "^ *read:|err=" "$WORK/fio2.out"
verified=$(grep -o "read: IOPS=[^,]*" "$WORK/fio2.out" || true)
[ -n "$verified" ] || fail "the verify pass read nothing"
stop_daemon
