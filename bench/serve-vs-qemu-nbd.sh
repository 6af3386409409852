#!/usr/bin/env bash
# The target on its own (issue 13: a faster `nbd-proxy serve` is measured apart from the
# matrix, since it lowers the denominator of every mirrored ratio alike): fio's nbd engine
# (libnbd, one connection) straight to `nbd-proxy serve` and to qemu-nbd over loopback TCP,
# each exporting a fresh file of SIZE_MIB on the same filesystem (TMPDIR) with its default
# caching, on this host (no VM, no ublk needed). Jobs: 4k randwrite QD1 and QD32, 4k randread
# QD32, 1M write QD8. REPS reps of SECS s per server and job, servers interleaved in an order
# that rotates each rep; prints per job the median IOPS and mean latency of each server and
# the ratio of each to qemu-nbd (IOPS, higher is better).
#
#   bench/serve-vs-qemu-nbd.sh [REPS=5] [SECS=5] [SIZE_MIB=256]
#
# SERVE_BASE=PATH adds another nbd-proxy binary as "base" (an older build: the A/B of a change
# to the server), and then prints this build / base too. SERVE_JOBS picks jobs (comma-separated:
# w1,w32,r32,1m).
set -euo pipefail
reps=${1:-5} secs=${2:-5} size_mib=${3:-256}
repo=$(cd "$(dirname "$0")/.." && pwd)
proxy=$repo/target/release/nbd-proxy
[ -x "$proxy" ] || { echo "build first: cargo build --release -p nbd-proxy" >&2; exit 2; }
for t in fio qemu-nbd; do command -v $t > /dev/null || { echo "$t missing: scripts/setup-host" >&2; exit 2; }; done
fio --enghelp 2> /dev/null | grep -qw nbd || { echo "this fio has no nbd engine" >&2; exit 2; }
servers=(serve qemu-nbd)
if [ -n "${SERVE_BASE:-}" ]; then
    [ -x "$SERVE_BASE" ] || { echo "SERVE_BASE=$SERVE_BASE is not an executable" >&2; exit 2; }
    servers=(serve base qemu-nbd)
fi
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Each server on its own port, started once (its export file pre-allocated, written once).
declare -A PORT=([serve]=10911 [base]=10912 [qemu-nbd]=10913)
for s in "${servers[@]}"; do
    img=$work/$s.img port=${PORT[$s]}
    dd if=/dev/zero of="$img" bs=1M count="$size_mib" status=none
    case $s in
        serve | base)
            bin=$proxy; [ "$s" = base ] && bin=$SERVE_BASE
            "$bin" serve --listen "tcp:127.0.0.1:$port" --export "disk=$img" > "$work/$s.log" 2>&1 &
            ;;
        qemu-nbd) qemu-nbd -f raw -t -e 8 -x disk -b 127.0.0.1 -p "$port" "$img" > "$work/$s.log" 2>&1 & ;;
    esac
    pids+=($!)
done
for s in "${servers[@]}"; do
    for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:${PORT[$s]}/disk" > /dev/null 2>&1 && continue 2; sleep 0.1; done
    cat "$work/$s.log" >&2; echo "$s did not come up on port ${PORT[$s]}" >&2; exit 1
done

declare -A JOBS=([w1]="randwrite 4k 1" [w32]="randwrite 4k 32" [r32]="randread 4k 32" [1m]="write 1M 8")
IFS=, read -r -a ORDER <<< "${SERVE_JOBS:-w1,w32,r32,1m}"
for j in "${ORDER[@]}"; do [ -n "${JOBS[$j]:-}" ] || { echo "SERVE_JOBS: unknown job $j (w1 w32 r32 1m)" >&2; exit 2; }; done
declare -A IOPS LAT
run() { # SERVER JOB: appends IOPS and mean latency (µs) of one run
    local s=$1 j=$2 rw bs qd out
    read -r rw bs qd <<< "${JOBS[$j]}"
    out=$(fio --name=t --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$s]}/disk" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --size="${size_mib}M" --time_based --runtime="$secs" --ramp_time=1 \
        --output-format=terse --terse-version=3) || { echo "fio failed on $s ($j)" >&2; exit 1; }
    # terse v3: field 8 read IOPS, 40 read mean latency (µs), 49 write IOPS, 81 write mean latency.
    read -r iops lat < <(awk -F';' '$1 == 3 {printf "%d %.0f\n", $8 + $49, ($49 > 0) ? $81 : $40}' <<< "$out")
    IOPS[$s.$j]+="$iops " LAT[$s.$j]+="$lat "
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
for j in "${ORDER[@]}"; do for s in "${servers[@]}"; do run "$s" "$j"; done; done   # warm-up, not counted
IOPS=() LAT=()
n=${#servers[@]}
for r in $(seq "$reps"); do
    for j in "${ORDER[@]}"; do
        # Rotate who goes first, so no server always gets the same slot.
        for k in $(seq 0 $((n - 1))); do run "${servers[$(((k + r) % n))]}" "$j"; done
    done
    echo "rep $r of $reps done" >&2
done
echo "fio nbd engine over loopback TCP, $reps reps of $secs s, medians (IOPS, mean latency in µs):"
for j in "${ORDER[@]}"; do
    line="  $j (${JOBS[$j]}):"
    for s in "${servers[@]}"; do
        line+=" $s $(median <<< "${IOPS[$s.$j]}") ($(median <<< "${LAT[$s.$j]}") µs);"
    done
    q=$(median <<< "${IOPS[qemu-nbd.$j]}") v=$(median <<< "${IOPS[serve.$j]}")
    line+=" serve/qemu-nbd $(awk -v a="$v" -v b="$q" 'BEGIN {printf "%.2f", a / b}')"
    if [ -n "${SERVE_BASE:-}" ]; then
        b=$(median <<< "${IOPS[base.$j]}")
        line+=", base/qemu-nbd $(awk -v a="$b" -v q="$q" 'BEGIN {printf "%.2f", a / q}')"
        line+=", serve/base $(awk -v a="$v" -v b="$b" 'BEGIN {printf "%.2f", a / b}')"
    fi
    echo "$line"
    for s in "${servers[@]}"; do echo "    $s runs (IOPS): ${IOPS[$s.$j]}"; done
done
