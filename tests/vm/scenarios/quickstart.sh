#!/bin/bash
# The README's "Quick start" block, run exactly as written (read from README.md, which the
# initramfs carries), so the README cannot drift from the programs. Two adaptations to the VM,
# made here and not in the commands: `modprobe` is a function that checks the module is loaded
# (the guest loads its modules at boot and has no modules.dep), and /var/tmp is created.
# Passes when the block exits 0, prints both confirmations, and leaves no daemon or device.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
readme=/scenarios/README.md
[ -f "$readme" ] || readme=$(dirname "$0")/../../../README.md
block=$WORK/quickstart.sh
awk '/<!-- quickstart:begin -->/{p=1; next} /<!-- quickstart:end -->/{p=0} p && !/^```/' "$readme" > "$block"
[ "$(grep -c . "$block")" -ge 10 ] || fail "no quick start block in $readme"
log "the README's quick start ($(grep -c . "$block") commands):"
sed 's/^/  | /' "$block"
mkdir -p /var/tmp
rm -f /var/tmp/vm-disk.img /var/tmp/dest.img
{
    echo 'modprobe() { [ -d "/sys/module/$1" ] || { echo "modprobe: $1 is not loaded" >&2; return 1; }; }'
    echo 'set -e'
    cat "$block"
} > "$WORK/run.sh"
rc=0
(cd "$WORK" && timeout -k 5 300 bash "$WORK/run.sh") > "$WORK/out" 2>&1 || rc=$?
sed 's/^/  > /' "$WORK/out"
[ $rc -eq 0 ] || fail "the quick start exited $rc"
grep -qx "destination identical" "$WORK/out" || fail "the quick start did not print 'destination identical'"
grep -qx "guest data intact after cutover" "$WORK/out" || fail "the quick start did not print 'guest data intact after cutover'"
for d in /dev/ublkb0 /dev/ublkb1 /dev/ublkc0 /dev/ublkc1; do
    [ ! -e "$d" ] || fail "$d is left behind"
done
! pgrep -x ublk-mirror > /dev/null || fail "a ublk-mirror daemon is left running"
! pgrep -x nbd-proxy > /dev/null || fail "nbd-proxy is left running"
rm -f /var/tmp/vm-disk.img /var/tmp/dest.img
log "the quick start works as written"
