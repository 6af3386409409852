#!/bin/bash
# TLS on the migration link with the session in the kernel (kTLS). nbd-proxy connect runs
# STARTTLS, the TLS handshake and NBD_OPT_GO with rustls, then gives the session's keys to the
# kernel and hands the daemon the TCP socket itself, and exits: no relay process, and the
# daemon's queue rings send and receive on the socket as on a plain one. Against both TLS
# servers we have:
#   1. nbd-proxy serve (rustls; its side moves into the kernel too), 2 connections for 2 queues;
#   2. qemu-nbd (GnuTLS, which sends TLS 1.3 session tickets after its handshake: they must be
#      read before the switch, or the kernel would fail the first receive with EIO).
# Each under fio verify with fsync: remote == local, the mirror never failed, connect exited at
# once, and /proc/net/tls_stat counts the kernel sessions. Then 3. --tls-relay on both ends: the
# user-space relays (what runs where the kernel has no TLS) still carry the mirror.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
local_img=$WORK/local.img remote=$WORK/remote.img TLS=$WORK/tls
make_image "$local_img" 64M; make_image "$remote" 64M
make_tls_files "$TLS" localhost
[ -r /proc/net/tls_stat ] || fail "no /proc/net/tls_stat: the guest kernel has no TLS module loaded"
tls_stat() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat; }
start_daemon "$local_img" --queues 2

# tls_connect NAME N [connect args...]: connect over TLS to 127.0.0.1:10809 with N connections,
# in the foreground: it must come back by itself when the kernel carries TLS (a relay would
# stay running until the timeout). Prints how many sessions moved into the kernel.
tls_connect() {
    local name=$1 n=$2 port=$3; shift 3
    timeout 60 nbd-proxy connect --to tcp:127.0.0.1:$port --export disk --tls-ca "$TLS/ca-cert.pem" \
        --tls-hostname localhost --handoff "$CTL" --name "$name" --connections "$n" "$@" \
        > "$WORK/connect.out" 2> "$WORK/connect.log" \
        || { cat "$WORK/connect.log" "$WORK/target.log" "$WORK/qemu-nbd.log" >&2 2> /dev/null
             fail "nbd-proxy connect over TLS failed"; }
    grep -c "TLS in the kernel" "$WORK/connect.out" || true
}

# load_and_compare LABEL OFFSET: fio verify with fsync through the mirror, then remote == local.
load_and_compare() {
    fio --name="$1" --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
        --bsrange=4k-64k --offset="$2" --size=16M --io_size=8M --fsync=16 --verify=crc32c \
        --verify_backlog=64 --verify_fatal=1 --randseed=7 --numjobs=1 > "$WORK/fio-$1.out" \
        || { cat "$WORK/fio-$1.out"; fail "fio ($1) failed"; }
    local rc=0; compare_legs "$local_img" "$remote" || rc=$?
    [ $rc = 0 ] || { cat "$WORK/cmp.out"; fail "$1: remote differs from local"; }
    [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "$1: the mirror failed: $(ctl_get stats mirror.last_error)"
}

# 1. nbd-proxy serve, 2 connections.
tx0=$(tls_stat TlsTxSw) rx0=$(tls_stat TlsRxSw)
start_target "$remote" --tls-cert "$TLS/server-cert.pem" --tls-key "$TLS/server-key.pem"
kernel=$(tls_connect k 2 10809)
[ "$kernel" = 2 ] || { cat "$WORK/connect.out" "$WORK/connect.log"; fail "connect did not move both sessions into the kernel"; }
[ "$(grep -c "TLS in the kernel" "$WORK/target.log")" -ge 2 ] \
    || { cat "$WORK/target.log"; fail "nbd-proxy serve did not move its sessions into the kernel"; }
tx1=$(tls_stat TlsTxSw) rx1=$(tls_stat TlsRxSw)
# Both ends are in this guest: 2 connections x (client + server) sessions, each direction.
[ $((tx1 - tx0)) -ge 4 ] && [ $((rx1 - rx0)) -ge 4 ] \
    || { cat /proc/net/tls_stat; fail "kTLS sessions: TX +$((tx1 - tx0)), RX +$((rx1 - rx0)), expected +4 each"; }
ctl mirror-start k.0 k.1 --export disk > /dev/null || fail "mirror-start over 2 kTLS connections failed"
[ "$(ctl_get stats mirror.connections)" = 2 ] || fail "mirror connections: $(ctl_get stats mirror.connections)"
load_and_compare serve 0
decrypt_err=$(tls_stat TlsDecryptError)
[ "${decrypt_err:-0}" = 0 ] || fail "kTLS decrypt errors: $decrypt_err"
log "nbd-proxy serve: 2 kTLS connections (kernel sessions TX +$((tx1 - tx0)), RX +$((rx1 - rx0))), $MIRROR_OPS ops mirrored, remote == local"
ctl mirror-stop > /dev/null
stop_pid "$TARGET_PID"

# 2. qemu-nbd (GnuTLS), 1 connection for the 2 queues.
qemu-nbd -f raw -t -p 10812 -b 127.0.0.1 --object "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=$TLS" \
    --tls-creds tls0 -x disk "$remote" > "$WORK/qemu-nbd.log" 2>&1 &
QEMU_PID=$!
# GnuTLS's start under TCG can take longer than wait_port's 10 s.
for _ in $(seq 60); do (exec 9<>/dev/tcp/127.0.0.1/10812) 2>/dev/null && break; sleep 0.5; done
wait_port 10812 "$WORK/qemu-nbd.log"
kernel=$(tls_connect q 1 10812)
[ "$kernel" = 1 ] || { cat "$WORK/connect.out" "$WORK/connect.log"; fail "connect to qemu-nbd did not move the session into the kernel"; }
ctl mirror-start q --export disk > /dev/null || fail "mirror-start to qemu-nbd over kTLS failed"
load_and_compare qemu 16M
log "qemu-nbd (GnuTLS): 1 kTLS connection, $MIRROR_OPS ops mirrored, remote == local"
ctl mirror-stop > /dev/null
stop_pid "$QEMU_PID"

# 3. The relays: --tls-relay on both ends.
start_target "$remote" --tls-cert "$TLS/server-cert.pem" --tls-key "$TLS/server-key.pem" --tls-relay
nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --tls-ca "$TLS/ca-cert.pem" --tls-hostname localhost \
    --handoff "$CTL" --name r --tls-relay > "$WORK/relay.out" 2> "$WORK/relay.log" &
RELAY_PID=$!
for _ in $(seq 100); do grep -q "handed off" "$WORK/relay.out" 2>/dev/null && break; sleep 0.1; done
grep -q "relaying" "$WORK/relay.out" || { cat "$WORK/relay.out" "$WORK/relay.log"; fail "connect --tls-relay did not relay"; }
grep -q "TLS relayed by a thread (--tls-relay)" "$WORK/target.log" \
    || { cat "$WORK/target.log"; fail "serve --tls-relay did not relay"; }
ctl mirror-start r --export disk > /dev/null || fail "mirror-start over the TLS relay failed"
load_and_compare relay 32M
log "--tls-relay: relayed on both ends, $MIRROR_OPS ops mirrored, remote == local"
ctl mirror-stop > /dev/null
for _ in $(seq 100); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$RELAY_PID" 2>/dev/null && fail "the relay outlived mirror-stop"
wait "$RELAY_PID" || fail "the relay exited non-zero"
stop_pid "$TARGET_PID"
stop_daemon
