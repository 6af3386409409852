#!/bin/bash
# Live upgrade across builds (run by scripts/upgrade-test, not by the test command): the device
# is served by an OLDER build (ublk-mirror-$UPGRADE_FROM, put in the guest by
# scripts/build-rev), mirroring to nbd-proxy serve, under fio verify (mixed sizes, QD32,
# flushes); that daemon detaches with `shutdown --keep`, and this build's `ublk-mirror recover`
# takes the device over. fio sees no error; the new daemon's stats carry every key the old
# one's did (the raw JSON replies' key names, compared as sets); after the takeover a mirror
# to the same target with --resync converges (the old daemon's mirror ended with the detach).
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
from=${UPGRADE_FROM:?UPGRADE_FROM names the older build (scripts/upgrade-test sets it)}
command -v "ublk-mirror-$from" > /dev/null && command -v "ublk-mirror-ctl-$from" > /dev/null \
    || fail "ublk-mirror-$from and ublk-mirror-ctl-$from are not in the guest"
L=$WORK/local.img R=$WORK/remote.img
make_image "$L" 512M
make_image "$R" 512M
start_target "$R"
keys() { grep -o '"[a-z_]*":' | sort -u; }

UBLK_MIRROR=ublk-mirror-$from start_daemon "$L" --queues 2
id=$DEV_ID old_pid=$DAEMON_PID
UBLK_MIRROR_CTL=ublk-mirror-ctl-$from mirror_to old --timeout 30
UBLK_MIRROR_CTL=ublk-mirror-ctl-$from ctl raw '{"v":1,"id":1,"cmd":"stats"}' | keys > "$WORK/old.keys"
[ -s "$WORK/old.keys" ] || fail "no stats from the old build"
fio_job up --time_based --runtime=16 > "$WORK/fio.out" 2>&1 &
fio_pid=$!
sleep 5
UBLK_MIRROR_CTL=ublk-mirror-ctl-$from ctl shutdown --keep > /dev/null || fail "the old build's shutdown --keep failed"
wait "$old_pid" || fail "the old build did not exit 0 on detach"
[ -b "$DEV" ] || fail "$DEV disappeared on detach"
kill -0 "$fio_pid" || { cat "$WORK/fio.out"; fail "fio ended while no daemon served the device"; }
recover_daemon "$id"
[ "$DEV_ID" = "$id" ] || fail "recovered as $DEV, not device $id"
grep -q "recovering ublk device $id" "$DAEMON_LOG" || fail "the new build did not log the recovery"
wait "$fio_pid" || { cat "$WORK/fio.out"; fail "fio failed across the upgrade: the guest saw an error"; }
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio reported errors"; }
log "old build $from detached, this build recovered device $id under fio: 0 errors"

# The old mirror ended with its daemon: the recovered one marks everything out of sync.
[ "$(ctl_get stats nbd_mirror_failed)" = 1 ] || fail "a recovered daemon that was mirroring must report nbd_mirror_failed 1"
mirror_to new --resync --timeout 30
# Both snapshots with a mirror attached (the reply's shape depends on it).
ctl raw '{"v":1,"id":1,"cmd":"stats"}' | keys > "$WORK/new.keys"
missing=$(grep -Fxv -f "$WORK/new.keys" "$WORK/old.keys" || true)
[ -z "$missing" ] || fail "stats keys of $from missing after the upgrade: $missing"
log "stats keys: $(wc -l < "$WORK/old.keys") before, all present after; new: $(grep -Fxv -f "$WORK/old.keys" "$WORK/new.keys" | tr -d '":' | tr '\n' ' ')"
ctl wait-ready > /dev/null || fail "the resync after the upgrade did not become ready"
ctl pause > /dev/null
blkcmp "$L" "$R" > "$WORK/cmp.out" || { cat "$WORK/cmp.out"; fail "local and target differ after the resync"; }
ctl unpause > /dev/null
ctl mirror-stop > /dev/null
echo "LIVE UPGRADE from $from: fio 0 errors, stats keys kept, resync converged"
stop_daemon
stop_pid "$TARGET_PID"
