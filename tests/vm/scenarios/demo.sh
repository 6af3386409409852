#!/bin/bash
# The README's main command: a complete live storage migration of a busy disk, with cutover,
# between two "hosts": network namespaces joined by a veth pair with netem delay on each end.
#
#   netns demo-src (192.168.77.1)                   netns demo-dst (192.168.77.2)
#   ublk-mirror on source.img                        nbd-proxy serve dest.img (--control, TLS)
#   nbd-proxy connect (kTLS)      ==veth + netem==>  tcp:192.168.77.2:10809
#   (guest fio runs on /dev/ublkbN, a device of the one kernel both share)
#
# 1. source.img has data (scattered extents); dest.img is garbage, so every byte must be copied.
#    The link's round-trip time (ping) and the device's 4k QD1 write latency before mirroring.
# 2. A guest-like fio workload (4k random writes with crc32c, rate-limited) runs on the device.
# 3. nbd-proxy connect dials the export across the link over TLS, moves the session into the
#    kernel (kTLS) and hands the daemon the socket itself; mirror-start --copy mirrors every new
#    write and copies what was there before, with a progress display. Then the mirrored 4k QD1
#    write latency, next to the link's RTT.
# 4. Ready: pause (drains in-flight I/O), compare the destination's bytes with the source's,
#    print stats, stop mirroring and the source daemon.
# 5. Cutover: remove the export (flushes, releases the image), start ublk-mirror on dest.img in the
#    destination namespace, and verify the workload's data there with fio's own verify pass.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
SRC=$WORK/source.img DST=$WORK/dest.img TLS=$WORK/tls
SIZE_MIB=${DEMO_SIZE_MIB:-512}
WORKLOAD_MIB=64   # the region the guest workload writes (and fio re-verifies after the cutover)
[ "$SIZE_MIB" -ge 256 ] || fail "DEMO_SIZE_MIB must be at least 256 (workload at the start, QD1 runs at the end)"
NS_SRC=demo-src NS_DST=demo-dst SRC_IP=192.168.77.1 DST_IP=192.168.77.2 PORT=10809
DELAY=${DEMO_DELAY:-2ms}   # netem delay on each end of the veth pair: RTT about twice that
step() { echo; log "== $* =="; }
in_src() { ip netns exec "$NS_SRC" "$@"; }
in_dst() { ip netns exec "$NS_DST" "$@"; }

# Whatever is still running when the scenario ends (on a failure) is stopped, and the namespaces
# (with the veth pair in them) are deleted.
FIO="" RELAY_PID="" TARGET_PID="" DAEMON_PID="" MADE_VAR_RUN=""
delete_netns() {
    local ns rc=0
    for ns in "$NS_SRC" "$NS_DST"; do
        if [ -e "/var/run/netns/$ns" ]; then ip netns del "$ns" || rc=1; fi
    done
    if [ -n "$MADE_VAR_RUN" ]; then rm -f /var/run; MADE_VAR_RUN=""; fi
    return $rc
}
cleanup() {
    local p
    for p in $FIO $RELAY_PID $TARGET_PID; do stop_pid "$p"; done
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then stop_pid "$DAEMON_PID"; fi
    delete_netns 2>/dev/null || true
}
trap cleanup EXIT

# qd1_latency WHAT: 4k random writes at QD1 for 5 s on the last 64 MiB of $DEV (outside the
# workload's region, so its verify after the cutover is untouched). Prints "MEAN MEDIAN IOPS",
# latencies in ms (mean of fio's total latency, median of its completion latency).
qd1_latency() {
    local out=$WORK/qd1.$1
    fio --name="qd1-$1" --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
        --iodepth=1 --offset=$((SIZE_MIB - 64))M --size=64M --time_based --runtime=5 --ramp_time=1 \
        --output-format=terse --terse-version=3 > "$out" 2> "$out.err" \
        || { cat "$out.err" "$out" >&2; fail "fio 4k QD1 writes ($1) failed"; }
    # Terse v3, write side: 49 IOPS, 59-78 completion-latency percentiles, 81 mean latency (us).
    awk -F';' '$1 == 3 && $5 == 0 && $49 > 0 {
        for (i = 59; i <= 78; i++) if ($i ~ /^50\.0*%=/) { split($i, p, "="); med = p[2] }
        printf "%.2f %.2f %d\n", $81 / 1000, med / 1000, $49; found = 1 }
        END { exit !found }' "$out" || { cat "$out.err" "$out" >&2; fail "fio 4k QD1 writes ($1): no result"; }
}

step "1. images: source with data, destination full of garbage"
fill_scattered "$SRC" "$SIZE_MIB"
head -c "${SIZE_MIB}M" < <(tr '\0' '\125' < /dev/zero) > "$DST"
echo "  source.img: $SIZE_MIB MiB, $(du -m "$SRC" | cut -f1) MiB allocated (the rest holes)"
echo "  dest.img:   $SIZE_MIB MiB of 0x55 bytes"

step "two hosts: network namespaces $NS_SRC and $NS_DST, a veth pair, netem $DELAY each way"
# ip netns keeps its namespaces under /var/run/netns; the test VM has /run only.
if [ ! -e /var/run ]; then ln -s /run /var/run; MADE_VAR_RUN=1; fi
for ns in "$NS_SRC" "$NS_DST"; do
    [ ! -e "/var/run/netns/$ns" ] || ip netns del "$ns" || fail "a stale namespace $ns cannot be deleted"
    ip netns add "$ns" || fail "ip netns add $ns failed"
    ip -n "$ns" link set lo up
done
ip -n "$NS_SRC" link add veth-src type veth peer name veth-dst netns "$NS_DST" \
    || fail "cannot create the veth pair (module veth?)"
ip -n "$NS_SRC" addr add "$SRC_IP/24" dev veth-src
ip -n "$NS_DST" addr add "$DST_IP/24" dev veth-dst
ip -n "$NS_SRC" link set veth-src up
ip -n "$NS_DST" link set veth-dst up
in_src tc qdisc add dev veth-src root netem delay "$DELAY" || fail "tc netem on veth-src failed (module sch_netem?)"
in_dst tc qdisc add dev veth-dst root netem delay "$DELAY" || fail "tc netem on veth-dst failed (module sch_netem?)"
echo "  $NS_SRC: veth-src $SRC_IP/24, $(in_src tc qdisc show dev veth-src | head -n 1)"
echo "  $NS_DST: veth-dst $DST_IP/24, $(in_dst tc qdisc show dev veth-dst | head -n 1)"
# One ping first (ARP, a cold path), then the ten that are measured.
in_src ping -c 1 -W 5 "$DST_IP" > "$WORK/ping.out" 2>&1 \
    && in_src ping -c 10 -i 0.2 -q "$DST_IP" > "$WORK/ping.out" 2>&1 \
    || { cat "$WORK/ping.out" >&2; fail "$NS_SRC cannot ping $DST_IP across the veth pair"; }
RTT=$(sed -n 's|.*min/avg/max[^=]*= *[0-9.]*/\([0-9.]*\)/.*|\1|p' "$WORK/ping.out")
[ -n "$RTT" ] || { cat "$WORK/ping.out" >&2; fail "no round-trip time in ping's output"; }
RTT=$(printf %.1f "$RTT")
echo "  link RTT $RTT ms ($NS_SRC -> $DST_IP, ping, average of 10)"

step "TLS: a test CA and a certificate for the destination ($DST_IP)"
make_tls_files "$TLS" "$DST_IP"
echo "  $TLS: ca-cert.pem, server-cert.pem, server-key.pem (openssl, P-256)"

step "source daemon ($NS_SRC) and destination export ($NS_DST, TLS)"
UBLK_MIRROR="ip netns exec $NS_SRC ublk-mirror" start_daemon "$SRC" --queues 2 --label demo-source
in_dst nbd-proxy serve --listen "tcp:$DST_IP:$PORT" --export "disk=$DST" --control "$WORK/nbd-proxy.sock" \
    --tls-cert "$TLS/server-cert.pem" --tls-key "$TLS/server-key.pem" > "$WORK/target.out" 2> "$WORK/target.log" &
TARGET_PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/target.out" 2>/dev/null && break; sleep 0.1; done
grep -q listening "$WORK/target.out" || { cat "$WORK/target.log" >&2; fail "nbd-proxy serve did not start in $NS_DST"; }
echo "  nbd-proxy serve exports dest.img as 'disk' on tcp:$DST_IP:$PORT, TLS required"
r=$(qd1_latency local); read -r LOCAL_MEAN LOCAL_MED LOCAL_IOPS <<< "$r"
echo "  $DEV, not mirrored yet: 4k write QD1 latency $LOCAL_MEAN ms mean, $LOCAL_MED ms median ($LOCAL_IOPS IOPS)"

step "2. guest workload on $DEV: 4k random writes over its first $WORKLOAD_MIB MiB, crc32c, QD16, 2500 IOPS"
# A fixed sequence (not time-based) so the same job can re-verify it after the cutover.
JOB=(--name=guest --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k
     --iodepth=16 --offset=0 --size=${WORKLOAD_MIB}M --randrepeat=1 --verify=crc32c --verify_fatal=1 --fsync=64)
fio "${JOB[@]}" --rate_iops=2500 --verify_backlog=512 > "$WORK/fio.out" 2>&1 &
FIO=$!
sleep 2

step "3. connect across the link over TLS, hand off the socket, mirror with background copy"
# With --tls-ca, connect negotiates STARTTLS and GO, moves the TLS session into the kernel and hands
# the daemon the TCP socket itself; where the kernel had no TLS it would stay running as a relay.
in_src nbd-proxy connect --to "tcp:$DST_IP:$PORT" --export disk --tls-ca "$TLS/ca-cert.pem" \
    --handoff "$CTL" --name dest > "$WORK/relay.out" 2> "$WORK/relay.log" &
RELAY_PID=$!
for _ in $(seq 100); do
    grep -q "handed off" "$WORK/relay.out" 2>/dev/null && break
    kill -0 "$RELAY_PID" 2>/dev/null || break
    sleep 0.1
done
grep -q "handed off" "$WORK/relay.out" \
    || { cat "$WORK/relay.log" "$WORK/target.log" >&2; fail "nbd-proxy connect over TLS did not hand off a socket"; }
sed 's/^/  /' "$WORK/relay.out"
grep -q "TLS in the kernel" "$WORK/relay.out" || { cat "$WORK/relay.log" >&2; fail "the TLS session did not move into the kernel"; }
echo "  kernel TLS sessions in $NS_SRC: $(ip netns exec "$NS_SRC" awk '$1 ~ /^TlsCurr(Tx|Rx)Sw$/ { printf "%s %s ", $1, $2 }' /proc/net/tls_stat)"
ctl list-fds | sed 's/^/  /'
ctl mirror-start dest --export disk --copy --timeout 10 | sed 's/^/  /'
script -qec "ublk-mirror-ctl --socket $CTL mirror-wait-ready --progress" /dev/null | tr '\r' '\n' \
    | awk 'NR % 8 == 1 || /ready/' | sed 's/^/  /'
[ "$(ctl_get stats mirror.copy.state)" = ready ] || fail "background copy did not become ready"
log "background copy ready in $(printf %.1f "$(ctl_get stats mirror.copy.elapsed)") s; every write is now on both sides"

log "waiting for the guest workload to finish its writes and verify pass"
wait $FIO || { FIO=""; cat "$WORK/fio.out"; fail "the guest workload failed"; }
FIO=""
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "the guest workload saw errors"; }
grep -E "^ *(write|read):" "$WORK/fio.out" | sed 's/^ */  /'
r=$(qd1_latency mirrored); read -r MIR_MEAN MIR_MED MIR_IOPS <<< "$r"
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "the mirror failed during the QD1 run: $(ctl_get stats mirror.last_error)"
echo "  mirrored 4k write QD1: $MIR_MEAN ms mean, $MIR_MED ms median ($MIR_IOPS IOPS)"
LATENCY_LINE="link RTT $RTT ms; mirrored 4k write QD1 latency $MIR_MEAN ms (local-only $LOCAL_MEAN ms), over TLS"
log "$LATENCY_LINE"

step "4. pause, compare destination with source, stats"
ctl pause | sed 's/^/  /'
[ "$(ctl_get stats reqs_outstanding)" = 0 ] || fail "requests outstanding after pause"
blkcmp "$SRC" "$DST" | sed 's/^/  /' || fail "destination differs from source"
# Both checksums at once (one per CPU).
sha256sum < "$SRC" > "$WORK/source.sum" & sum1=$!
sha256sum < "$DST" > "$WORK/dest.sum" & sum2=$!
wait $sum1 && wait $sum2 || fail "sha256sum of the images failed"
src_sum=$(cut -d' ' -f1 "$WORK/source.sum")
dst_sum=$(cut -d' ' -f1 "$WORK/dest.sum")
echo "  sha256 source: $src_sum"
echo "  sha256 dest:   $dst_sum"
[ "$src_sum" = "$dst_sum" ] || fail "checksums differ"
ctl stats | grep -E '^(state|reqs_|nbd_mirror_failed|ops\.(write|flush|errors)|mirror\.(state|target|export|ops|bytes_mirrored|dirty_bytes|last_error|copy\.(state|bytes_done|elapsed)))' \
    | sed 's/^/  /'
[ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "nbd_mirror_failed is set"
ctl mirror-stop > /dev/null
stop_daemon; DAEMON_PID=""
log "source daemon stopped (the VM has moved)"
# connect exited after the hand-off (kTLS); had it relayed, it ends with the daemon's socket.
for _ in $(seq 50); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$RELAY_PID" 2>/dev/null; then
    cat "$WORK/relay.log" >&2; fail "the TLS relay (nbd-proxy connect) outlived the daemon"
fi
wait "$RELAY_PID" || { cat "$WORK/relay.log" >&2; fail "the TLS relay (nbd-proxy connect) exited non-zero"; }
RELAY_PID=""

step "5. cutover: remove the export, start ublk-mirror on the destination image in $NS_DST"
nbd-proxy control --socket "$WORK/nbd-proxy.sock" remove disk | sed 's/^/  /'
stop_pid "$TARGET_PID"; TARGET_PID=""
UBLK_MIRROR="ip netns exec $NS_DST ublk-mirror" start_daemon "$DST" --label demo-destination
log "re-verifying the guest's writes on the destination device $DEV"
fio "${JOB[@]}" --verify_only > "$WORK/verify.out" 2>&1 \
    || { cat "$WORK/verify.out"; fail "the workload's data does not verify on the destination"; }
grep -q "err= 0" "$WORK/verify.out" || { cat "$WORK/verify.out"; fail "verify errors on the destination"; }
grep -E "^ *read:" "$WORK/verify.out" | sed 's/^ */  /'
dev_sum=$(sha256sum < "$DEV" | cut -d' ' -f1)
echo "  sha256 of $DEV on the destination: $dev_sum"
[ "$dev_sum" = "$src_sum" ] || fail "the destination device does not read back the source's bytes"
stop_daemon; DAEMON_PID=""
delete_netns || fail "the namespaces $NS_SRC and $NS_DST could not be deleted"
echo
echo "$LATENCY_LINE"
echo "MIGRATION SUCCEEDED: destination identical to source (sha256 ${src_sum:0:16}...), guest data verified after cutover, 0 I/O errors"
