#!/bin/bash
# Scenario 2: after a graceful stop, the image file holds exactly what was written through the
# device (and nothing else changed).
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 256M
head -c 32M /dev/urandom > "$WORK/pat1"
head -c 4M /dev/urandom > "$WORK/pat2"
start_daemon "$img" --queues 2
dd if="$WORK/pat1" of="$DEV" bs=1M seek=1 oflag=direct status=none
dd if="$WORK/pat2" of="$DEV" bs=1M seek=252 oflag=direct status=none   # the last 4 MiB
stop_daemon
want1=$(sha256sum < "$WORK/pat1"); want2=$(sha256sum < "$WORK/pat2")
got1=$(dd if="$img" bs=1M skip=1 count=32 status=none | sha256sum)
got2=$(dd if="$img" bs=1M skip=252 count=4 status=none | sha256sum)
[ "$got1" = "$want1" ] || fail "image bytes at 1 MiB differ from the pattern written"
[ "$got2" = "$want2" ] || fail "image's last 4 MiB differ from the pattern written"
cmp -n 1048576 "$img" /dev/zero || fail "the untouched first MiB changed"
dd if="$img" bs=1M skip=33 count=219 status=none | cmp - <(head -c $((219 << 20)) /dev/zero) \
    || fail "untouched middle of the image changed"
log "image bytes match: 32 MiB + 4 MiB patterns, untouched ranges still zero"
