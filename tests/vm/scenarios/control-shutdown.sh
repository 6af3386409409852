#!/bin/bash
# Control plane: `shutdown` stops the daemon gracefully (exit 0, device, socket gone); a stale
# socket left by a killed process is replaced at start; serve --paused answers reads and holds
# writes until the first unpause.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 64M
start_daemon "$img" --dev-id 4
ctl shutdown > /dev/null || fail "shutdown request failed"
rc=0; wait "$DAEMON_PID" || rc=$?
[ $rc -eq 0 ] || { cat "$DAEMON_LOG"; fail "daemon exited $rc after shutdown"; }
[ ! -e "$DEV" ] && [ ! -e "$CTL" ] || fail "device or socket left after shutdown"
grep -q "control command shutdown" "$DAEMON_LOG" || fail "log does not say why it stopped"

# A stale socket (file present, nobody listening) is replaced.
mkdir -p /run/ublk-mirror && : > /run/ublk-mirror/4.sock
start_daemon "$img" --dev-id 4
[ -S "$CTL" ] || fail "stale socket not replaced"
stop_daemon

# serve --paused: reads answered, writes wait for unpause.
head -c 1M /dev/urandom > "$WORK/pat"
start_daemon "$img" --paused
[ "$(ctl_get stats state)" = attached ] || fail "state is not attached"
timeout 20 dd if="$DEV" of=/dev/null bs=1M count=4 iflag=direct status=none || fail "reads hang while attached"
dd if="$WORK/pat" of="$DEV" bs=1M seek=8 oflag=direct status=none &
w=$!
sleep 2
kill -0 $w 2>/dev/null || fail "a write completed before the first unpause"
[ "$(ctl_get stats reqs_parked)" -ge 1 ] || fail "the write is not parked"
ctl unpause > /dev/null
wait $w || fail "the parked write failed"
[ "$(dd if="$DEV" bs=1M skip=8 count=1 iflag=direct status=none | sha256sum)" = "$(sha256sum < "$WORK/pat")" ] || fail "parked write data wrong"
stop_daemon
log "shutdown, stale socket and serve --paused behave"
