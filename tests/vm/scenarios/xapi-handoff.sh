#!/bin/bash
# xapi's storage migration, as xapi and SM drive tapdisk, against a daemon in tapdisk mode
# (serve --tapdisk-compat) and a destination that greets as tapdisk's (oldstyle, flags 0:
# nothing but reads and writes; xapi-sim serve-oldstyle logs every request):
# - the fd hand-off exactly as mirror_pass_fds does it (xapi-sim pass-fd: connect to
#   nbdclient<pid>, one sendmsg with the name and the fd, close without reading);
# - ublk-tap-ctl pause, list (state=0x2a, parsed as xapi's Tapctl.list), unpause -a aio:PATH
#   (a block device: the leaf moved) -2 nbd:NAME, fio verify with fsync, O_SYNC and discards;
# - ublk-tap-ctl stats polled as xapi's watchdog and pre-deactivate hook do, each output parsed
#   as Tapctl.Stats requires (xapi-sim stats); legs identical; a killed target shows
#   "nbd_mirror_failed": 1; pause + unpause -2 null clears it;
# - unpause -2 nbd: with a peer that answers garbage resumes (flag 1, guest unaffected); with
#   an unknown name fails and the disk stays paused;
# - the receiver refuses a peer that is not root, and a daemon refuses a symlinked or
#   world-writable directory; its socket goes at exit, and after recover the new pid's is
#   there and the old one gone.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
SIZE=$((32 << 20)) DIR=/run/blktap-control
local_img=$WORK/local.img leaf=$WORK/leaf.img remote=$WORK/remote.img
make_image "$local_img" 32M; make_image "$remote" 32M
tapctl() { ublk-tap-ctl "$@"; }

# Unsafe directories are refused before any device exists.
mkdir -m 0777 "$WORK/open"; chmod 0777 "$WORK/open"
mkdir -m 0755 "$WORK/real"; ln -s "$WORK/real" "$WORK/link"
for bad in open link; do
    out=$(ublk-mirror serve --image "$local_img" --tapdisk-compat --tapdisk-dir "$WORK/$bad" 2>&1) \
        && fail "a daemon started with the $bad directory"
    [[ $out == *refusing* ]] || fail "no clear refusal of the $bad directory: $out"
    log "refused: ${out##*$'\n'}"
done

# The destination as tapdisk's nbdserver greets: oldstyle, flags 0 (not even HAS_FLAGS).
xapi-sim serve-oldstyle 10809 "$remote" > "$WORK/target.log" 2>&1 &
target_pid=$!
wait_port 10809 "$WORK/target.log"
start_daemon "$local_img" --tapdisk-compat
pid=$DAEMON_PID minor=$DEV_ID sock=$DIR/nbdclient$DAEMON_PID
[ -S "$sock" ] || fail "no $sock"
[ "$(stat -c %a "$sock")" = 600 ] || fail "$sock is mode $(stat -c %a "$sock")"
[ "$(ctl_get stats fd_receiver.socket)" = "$sock" ] || fail "stats.fd_receiver.socket"

# A peer that is not root is refused, even when the socket lets it connect.
chmod 0666 "$sock"
setpriv --reuid=65534 --regid=65534 --clear-groups "$(command -v xapi-sim)" pass-fd "$sock" sneaky \
    127.0.0.1:10809 > "$WORK/sneaky.out" 2>&1 || true
chmod 0600 "$sock"
for _ in $(seq 50); do [ "$(ctl_get stats fd_receiver.refused)" = 1 ] && break; sleep 0.1; done
[ "$(ctl_get stats fd_receiver.refused)" = 1 ] || { cat "$WORK/sneaky.out"; ctl stats | grep fd_receiver
    grep -i tapdisk "$DAEMON_LOG"; fail "the non-root peer was not refused"; }
ctl list-fds | grep -q sneaky && fail "a non-root peer's fd was stored"

# xapi's hand-off, then SM's pause and unpause with a new leaf and the secondary.
NAME=mirror_vbd/1/xvda
xapi-sim pass-fd "$sock" "$NAME" 127.0.0.1:10809 > /dev/null || fail "hand-off failed"
for _ in $(seq 50); do ctl list-fds | grep -q "$NAME" && break; sleep 0.1; done
ctl list-fds | grep -q "$NAME" || fail "the handed-off fd is not stored"
tapctl pause -p "$pid" -m "$minor" || fail "tap-ctl pause failed"
line=$(tapctl list | xapi-sim list "$pid" "$minor") || fail "xapi finds no line in: $(tapctl list)"
[[ $line == "state=0x2a paused=true args=aio:$local_img" ]] || fail "paused list line: $line"
# The leaf moves (SM's -a): a loop device over a copy of the image.
cp --sparse=always "$local_img" "$leaf"
loop=$(losetup -f --show "$leaf")
tapctl unpause -p "$pid" -m "$minor" -a "aio:$loop" -2 "nbd:$NAME" || fail "tap-ctl unpause failed"
line=$(tapctl list | xapi-sim list "$pid" "$minor")
[[ $line == "state=0 paused=false args=aio:$loop" ]] || fail "running list line: $line"
[ "$(ctl_get stats mirror.state)" = active ] || fail "not mirroring: $(ctl_get stats mirror.last_error)"
[ "$(ctl_get stats mirror.durable)" = false ] || fail "a target without FLUSH is reported durable"

# The watchdog's poll (every 5 s in xapi; here between the loads).
watchdog() {
    local out
    out=$(tapctl stats -p "$pid" -m "$minor" | xapi-sim stats) || fail "xapi cannot parse stats"
    echo "$out"
}
fio --name=mix --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=8 --rw=randwrite \
    --bsrange=4k-64k --size=16M --io_size=6M --fsync=16 --verify=crc32c --verify_backlog=64 \
    --verify_fatal=1 --randseed=9 > "$WORK/fio1.out" || { cat "$WORK/fio1.out"; fail "fio failed"; }
out=$(watchdog)
[[ $out == "nbd_mirror_failed=0 "* && $out == *"0:$loop"* && $out == *"15:$NAME"* ]] \
    || fail "stats while mirroring: $out"
fio --name=sync --filename="$DEV" --direct=1 --ioengine=psync --rw=write --bs=4k --offset=20M \
    --size=256K --sync=1 > "$WORK/fio2.out" || { cat "$WORK/fio2.out"; fail "fio O_SYNC failed"; }
head -c 2M /dev/urandom | dd of="$DEV" bs=1M seek=24 oflag=direct status=none
blkdiscard -o $((24 << 20)) -l $((1 << 20)) "$DEV" || fail "blkdiscard failed"
# The pre-deactivate hook: reqs_outstanding until 0, then nbd_mirror_failed decides.
for _ in $(seq 150); do
    out=$(watchdog)
    [[ $out == *" reqs_outstanding=0 "* ]] && break
    sleep 1
done
[[ $out == "nbd_mirror_failed=0 reqs_outstanding=0 "* ]] || fail "pre-deactivate: $out"
ctl pause > /dev/null
rc=0; blkcmp "$leaf" "$remote" > "$WORK/cmp.out" || rc=$?
[ $rc = 0 ] || { cat "$WORK/cmp.out"; fail "remote differs from the local leaf"; }
ctl unpause > /dev/null
offered=$(sent_unoffered)
[ "$offered" = 0 ] || fail "$offered commands tapdisk's server does not offer were sent"
writes=$(grep -c "^Write id=" "$WORK/target.log" || true)
[ "$writes" -gt 0 ] || fail "no WRITE reached the target"
log "mirrored through tap-ctl verbs to a flags-0 oldstyle target: $(ctl_get stats mirror.ops) ops, $writes WRITEs and nothing else; remote == local leaf"

# The target dies: the guest carries on, the flag says so, unpause -2 null clears it.
stop_pid $target_pid KILL
dd if=/dev/urandom of="$DEV" bs=64k count=4 seek=10 oflag=direct status=none || fail "guest write failed"
for _ in $(seq 100); do [[ $(watchdog) == "nbd_mirror_failed=1 "* ]] && break; sleep 0.2; done
[[ $(watchdog) == "nbd_mirror_failed=1 "* ]] || fail "a killed target is not reported"
tapctl stats -p "$pid" -m "$minor" | grep -q '"nbd_mirror_failed": *1' || fail "not 1 in the JSON"
tapctl pause -p "$pid" -m "$minor" && tapctl unpause -p "$pid" -m "$minor" -2 null \
    || fail "pause, unpause -2 null failed"
[[ $(watchdog) == "nbd_mirror_failed=0 "* ]] || fail "-2 null did not clear the flag"

# A secondary that answers garbage: the disk resumes and the flag is set.
xapi-sim pass-garbage "$sock" garbage > /dev/null
for _ in $(seq 50); do ctl list-fds | grep -q garbage && break; sleep 0.1; done
tapctl pause -p "$pid" -m "$minor" || fail "pause"
tapctl unpause -p "$pid" -m "$minor" -2 nbd:garbage || fail "unpause with a garbage secondary failed"
[[ $(tapctl list | xapi-sim list "$pid" "$minor") == state=0\ * ]] || fail "not running"
[[ $(watchdog) == "nbd_mirror_failed=1 "* ]] || fail "a garbage secondary is not reported failed"
ctl_get stats mirror.last_error | grep -qi handshake || fail "last_error: $(ctl_get stats mirror.last_error)"
dd if=/dev/urandom of="$WORK/chunk" bs=64k count=1 status=none
dd if="$WORK/chunk" of="$DEV" bs=64k seek=100 oflag=direct status=none || fail "guest write"
cmp <(dd if="$DEV" bs=64k skip=100 count=1 iflag=direct status=none) "$WORK/chunk" \
    || fail "guest read back differs"
# An unknown name: error, and the disk stays paused.
tapctl pause -p "$pid" -m "$minor" || fail "pause"
tapctl unpause -p "$pid" -m "$minor" -2 nbd:nosuch 2> "$WORK/err" && fail "unknown name accepted"
log "unknown name: $(cat "$WORK/err")"
[[ $(tapctl list | xapi-sim list "$pid" "$minor") == state=0x2a\ * ]] || fail "not paused after a refused unpause"
tapctl unpause -p "$pid" -m "$minor" -2 null || fail "plain unpause"

# After a crash and recover the new pid listens and the old socket is gone.
stop_pid "$DAEMON_PID" KILL
recover_daemon "$minor"
[ -S "$DIR/nbdclient$DAEMON_PID" ] || fail "the recovered daemon has no nbdclient socket"
[ ! -e "$sock" ] || fail "the dead daemon's $sock is still there"
sock=$DIR/nbdclient$DAEMON_PID
stop_daemon
[ ! -e "$sock" ] || fail "$sock left behind at exit"
losetup -d "$loop"
log "xapi hand-off, tap-ctl verbs and unpause semantics as tapdisk's"
