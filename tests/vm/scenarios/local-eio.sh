#!/bin/bash
# A local-leg failure while the target takes the write. The local image is a device-mapper
# device with an `error` segment (8 MiB at 32 MiB), mirrored to nbd-proxy serve. A guest write
# there fails locally with EIO, which the guest sees, while the target takes it: the legs now
# differ, so the range must be out of sync (a later --resync copies the local range over). The
# mirror does not fail, and a write elsewhere reaches both legs.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
backing=$WORK/backing.img remote=$WORK/remote.img
make_image "$backing" 64M; make_image "$remote" 64M
loop=$(losetup --show -f "$backing") || fail "losetup failed"
trap 'dmsetup remove --noudevsync local-eio 2> /dev/null; losetup -d "$loop" 2> /dev/null' EXIT
# Sectors: linear 0-32 MiB, error 32-40 MiB, linear 40-64 MiB.
printf '0 65536 linear %s 0\n65536 16384 error\n81920 49152 linear %s 81920\n' "$loop" "$loop" \
    | dmsetup create local-eio --noudevsync || fail "dmsetup create failed"
dm=""
for s in /sys/block/dm-*; do [ "$(cat "$s/dm/name")" = local-eio ] && dm=/dev/${s##*/}; done
[ -b "$dm" ] || fail "no device for local-eio"
start_daemon "$dm"
start_target "$remote"
mirror_to t
head -c 1M /dev/urandom > "$WORK/pat"

dd if="$WORK/pat" of="$DEV" bs=1M seek=33 count=1 oflag=direct status=none 2> "$WORK/dd.err" \
    && fail "a write to the local image's error segment succeeded"
log "the guest saw the local failure: $(head -n 1 "$WORK/dd.err")"
dd if="$WORK/pat" of="$DEV" bs=1M seek=8 count=1 oflag=direct conv=fsync status=none \
    || fail "a write outside the error segment failed"
ctl wait-idle > /dev/null
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "the mirror failed: $(ctl_get stats mirror.last_error)"
[ "$(ctl_get stats ops.errors)" -gt 0 ] || fail "the daemon counted no failed request"
cmp -s <(dd if="$remote" bs=1M skip=8 count=1 status=none) "$WORK/pat" || fail "the write at 8 MiB is not on the target"
# The target took the failed write (the legs differ there) ...
cmp -s <(dd if="$remote" bs=1M skip=33 count=1 status=none) "$WORK/pat" \
    || fail "the target does not hold the write whose local leg failed: the test proves nothing"
# ... so [33 MiB, 34 MiB) must be out of sync, and nothing else is.
dirty=$(ctl_get dirty-map dirty_bytes)
[ "$dirty" -ge $((1 << 20)) ] || fail "the range where the legs differ is not out of sync (dirty map: $dirty bytes)"
[ "$dirty" -le $((2 << 20)) ] || fail "more than that range is out of sync: $dirty bytes"
log "local EIO, target took the write: $dirty bytes out of sync, mirror still active"
ctl mirror-stop > /dev/null
stop_daemon
stop_pid "$TARGET_PID"
