#!/usr/bin/env bash
# Throughput of nbdcopy copying the same file into `nbd-proxy serve` and into qemu-nbd,
# after one warm-up each, interleaved with alternating order, median of REPS runs, on this
# host (no ublk needed).
#
#   bench/nbdcopy-vs-qemu-nbd.sh [SIZE_MIB=256] [REPS=3]
#
# Both servers export a fresh file on the same filesystem (TMPDIR) with their default caching;
# qemu-nbd is allowed several connections (-e 8) since ours advertises CAN_MULTI_CONN.
set -euo pipefail
size_mib=${1:-256} reps=${2:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)
proxy=$repo/target/release/nbd-proxy
[ -x "$proxy" ] || { echo "build first: cargo build --release -p nbd-proxy" >&2; exit 2; }
for t in nbdcopy qemu-nbd; do command -v $t >/dev/null || { echo "$t missing: scripts/setup-host" >&2; exit 2; }; done
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
head -c $((size_mib << 20)) /dev/urandom > "$work/src.img"

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
one_run() { # $1 = ours|qemu; prints MB/s
    local kind=$1 dst=$work/dst.img sock=$work/$1.sock
    rm -f "$dst" "$sock"; truncate -s $((size_mib << 20)) "$dst"
    if [ "$kind" = ours ]; then
        "$proxy" serve --listen "unix:$sock" --export "disk=$dst" >/dev/null 2>&1 & pids+=($!)
    else
        qemu-nbd -f raw -t -e 8 -x disk -k "$sock" "$dst" >/dev/null 2>&1 & pids+=($!)
    fi
    local pid=$!
    wait_sock "$sock"
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy --flush "$work/src.img" "nbd+unix:///disk?socket=$sock"
    t1=$(date +%s.%N)
    kill "$pid"; wait "$pid" 2>/dev/null || true
    cmp -s "$work/src.img" "$dst" || { echo "$kind: copy differs from the source" >&2; exit 1; }
    echo "$size_mib $t0 $t1" | awk '{printf "%.1f\n", $1 * 1.048576 / ($3 - $2)}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ours=() qemu=()
one_run ours >/dev/null; one_run qemu >/dev/null   # warm-up: caches, allocation, not counted
for r in $(seq "$reps"); do
    # Alternate who goes first, so neither side always gets the colder slot.
    if [ $((r % 2)) = 1 ]; then
        ours+=("$(one_run ours)"); qemu+=("$(one_run qemu)")
    else
        qemu+=("$(one_run qemu)"); ours+=("$(one_run ours)")
    fi
    echo "rep $r: nbd-proxy ${ours[-1]} MB/s, qemu-nbd ${qemu[-1]} MB/s" >&2
done
mo=$(printf '%s\n' "${ours[@]}" | median); mq=$(printf '%s\n' "${qemu[@]}" | median)
echo "nbdcopy of ${size_mib} MiB, median of $reps (MB/s): nbd-proxy $mo, qemu-nbd $mq, ratio $(awk -v a="$mo" -v b="$mq" 'BEGIN{printf "%.2f", a/b}')"
echo "  nbd-proxy runs: ${ours[*]}"
echo "  qemu-nbd runs:  ${qemu[*]}"
