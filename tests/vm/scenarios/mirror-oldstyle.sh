#!/bin/bash
# A target like tapdisk's: the oldstyle handshake (nbdkit -o, as tapdisk's nbdserver<pid>.<minor>
# speaks it) and an export that offers no FLUSH, FUA, TRIM or WRITE_ZEROES (nbdkit's eval
# plugin over a file, saying so). The strict default refuses it, naming --allow-no-flush; with
# it the daemon runs the oldstyle handshake itself on the raw socket and mirrors under fio
# verify with fsync, O_SYNC writes, a discard and a write-zeroes; stats says durable: false;
# remote == local after wait-idle; and nbdkit's log shows that nothing but reads and writes
# arrived (no FLUSH, TRIM, WRITE_ZEROES, no FUA flag). (A greeting with flags 0, as tapdisk's
# own, is a unit test of the client: nbdkit always sets HAS_FLAGS.)
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
local_img=$WORK/local.img remote=$WORK/remote.img SIZE=$((64 << 20))
make_image "$local_img" 64M; make_image "$remote" 64M
start_tapdisk_like_target "$remote" $SIZE
nbdkit_pid=$NBDKIT_PID
start_daemon "$local_img"
handoff() { nbd-proxy connect --to tcp:127.0.0.1:10809 --handoff "$CTL" --name "$1" > /dev/null \
    || fail "nbd-proxy connect failed"; }

handoff strict
out=$(ctl mirror-start strict 2>&1) && fail "an export without FLUSH was accepted by default"
[[ $out == *FLUSH* && $out == *--allow-no-flush* ]] || fail "no clear refusal: $out"
log "refused by default: $out"

handoff tap
ctl mirror-start tap --allow-no-flush --timeout 60 > /dev/null || fail "mirror-start --allow-no-flush failed"
[ "$(ctl_get stats mirror.state)" = active ] || fail "mirror is not active"
[ "$(ctl_get stats mirror.durable)" = false ] || fail "stats mirror.durable: $(ctl_get stats mirror.durable), not false"
[ "$(ctl_get stats mirror.export_size)" = $SIZE ] || fail "export size $(ctl_get stats mirror.export_size)"
fio --name=mix --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=8 --rw=randwrite \
    --bsrange=4k-64k --size=32M --io_size=8M --fsync=16 --verify=crc32c --verify_backlog=64 \
    --verify_fatal=1 --randseed=5 > "$WORK/fio1.out" || { cat "$WORK/fio1.out"; fail "fio (mirrored) failed"; }
fio --name=fua --filename="$DEV" --direct=1 --ioengine=psync --rw=write --bs=4k --offset=40M \
    --size=256K --sync=1 > "$WORK/fio2.out" || { cat "$WORK/fio2.out"; fail "fio O_SYNC failed"; }
head -c 4M /dev/urandom | dd of="$DEV" bs=1M seek=48 oflag=direct status=none
blkdiscard -o $((48 << 20)) -l $((2 << 20)) "$DEV" || fail "blkdiscard failed"
head -c 4M /dev/urandom | dd of="$DEV" bs=1M seek=56 oflag=direct status=none
blkdiscard -z -o $((56 << 20)) -l $((2 << 20)) "$DEV" || fail "blkdiscard -z failed"
sync "$DEV" 2> /dev/null || true
rc=0; compare_legs "$local_img" "$remote" || rc=$?
[ $rc = 0 ] || { cat "$WORK/cmp.out"; fail "remote differs from local"; }
[ "$(ctl_get stats ops.flush.count)" -gt 0 ] || fail "the guest sent no flush: the test proves nothing"
writes=$(grep -c " Write id=" "$WORK/target.log" || true)
[ "$writes" -gt 0 ] || fail "no WRITE reached the target"
offered=$(sent_unoffered)
[ "$offered" = 0 ] || fail "$offered commands the export did not offer were sent"
log "oldstyle, no FLUSH: $MIRROR_OPS ops mirrored, $writes WRITEs and nothing else at the target; remote == local"
ctl mirror-stop > /dev/null
stop_daemon
stop_pid $nbdkit_pid
