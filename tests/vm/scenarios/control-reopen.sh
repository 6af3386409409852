#!/bin/bash
# Control plane: unpause onto a copy of the image at a new path: data written before and
# after is all there. A wrong-size image is refused and the device stays paused on the old one.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img new=$WORK/moved.img small=$WORK/small.img
make_image "$img" 256M
make_image "$small" 128M
head -c 8M /dev/urandom > "$WORK/a"; head -c 8M /dev/urandom > "$WORK/b"
start_daemon "$img"
dd if="$WORK/a" of="$DEV" bs=1M seek=0 oflag=direct status=none
ctl pause > /dev/null
cp "$img" "$new"
rc=0; ctl unpause --image "$small" 2> "$WORK/err" || rc=$?
[ $rc -ne 0 ] && grep -q "stays paused" "$WORK/err" || { cat "$WORK/err"; fail "wrong-size image not refused"; }
[ "$(ctl_get stats state)" = paused ] || fail "device not paused after a refused unpause"
ctl unpause --image "$new" > /dev/null || fail "unpause onto the moved image failed"
[ "$(ctl_get info image)" = "$new" ] || fail "info does not show the new image"
dd if="$WORK/b" of="$DEV" bs=1M seek=64 oflag=direct status=none
stop_daemon
[ "$(dd if="$new" bs=1M count=8 status=none | sha256sum)" = "$(sha256sum < "$WORK/a")" ] || fail "data written before the move is missing"
[ "$(dd if="$new" bs=1M skip=64 count=8 status=none | sha256sum)" = "$(sha256sum < "$WORK/b")" ] || fail "data written after the move is missing"
[ "$(dd if="$img" bs=1M skip=64 count=8 status=none | sha256sum)" != "$(sha256sum < "$WORK/b")" ] || fail "the old image got writes after the move"
log "unpause --image: data before and after the move is in the new image; old image untouched"
