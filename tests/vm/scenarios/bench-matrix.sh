#!/bin/bash
# Benchmark (run by bench/run, not by the test command): the fio matrix of issue 7.
#
# Devices, each on its own identical image on the guest's tmpfs (the same backing storage):
#   loop      kernel loop, --direct-io=on (the reference)
#   loop2     a second kernel loop device: loop against itself is the noise floor
#   ublk      ublk-mirror, 1 queue, unmirrored
#   ublk-q2   ublk-mirror, 2 queues, unmirrored
#   rublk     rublk's loop target (default options: 1 queue, depth 128, direct I/O) (needs /usr/local/bin/rublk: bench/run puts it there)
#   mirrored  ublk-mirror mirroring to nbd-proxy serve in this VM
#   dm-raid1  device-mapper mirror of a direct-io loop device and a kernel nbd device attached
#             with nbd-client straight to the same nbd-proxy serve
#   nbd-direct  fio's nbd engine (libnbd) against that server: the target's own QD1 latency
# Jobs: see JOBS below. Every job runs BENCH_REPS times with the devices interleaved
# (loop ublk ... loop ublk ...) after one warm-up per device. The raw fio JSON of every run is
# packed into the console between @@ARCHIVE markers for bench/run to unpack.
# Any device that cannot be set up fails the scenario: no partial matrix.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
REPS=${BENCH_REPS:-5} SECS=${BENCH_SECS:-4} SIZE=${BENCH_SIZE_MIB:-512}
OUT=$WORK/results RAW=$WORK/results/raw
mkdir -p "$RAW"
LOSETUP=$(command -v losetup)
"$LOSETUP" --help | grep -q -- --direct-io || fail "$LOSETUP is not util-linux losetup (no --direct-io)"
command -v rublk > /dev/null || fail "rublk is not in the guest: run the matrix through bench/run"

declare -A DEVS   # name -> block device (or nbd URI for nbd-direct)
CLEANUP=()
cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done
}
trap cleanup EXIT

img() { make_image "$WORK/$1.img" "${SIZE}M"; echo "$WORK/$1.img"; }
loop_dev() { # IMAGE -> /dev/loopN with direct I/O, or fails
    local d
    d=$("$LOSETUP" --direct-io=on --show -f "$1") || fail "losetup --direct-io=on $1 failed"
    [ "$(cat "/sys/block/${d#/dev/}/loop/dio")" = 1 ] || fail "$d does not use direct I/O"
    CLEANUP+=("$LOSETUP -d $d")
    echo "$d"
}

log "setting up devices (${SIZE} MiB images on tmpfs)"
DEVS[loop]=$(loop_dev "$(img loop)")
DEVS[loop2]=$(loop_dev "$(img loop2)")

start_daemon "$(img ublk)" --queues 1 --label bench-ublk
DEVS[ublk]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
start_daemon "$(img ublk-q2)" --queues 2 --label bench-ublk-q2
DEVS[ublk-q2]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")

# --foreground: rublk's own daemonizing fails in this initramfs ("not recieved device id").
rublk add loop -n 40 -f "$(img rublk)" --quiet --foreground > "$WORK/rublk.out" 2>&1 &
RUBLK_PID=$!
CLEANUP+=("rublk del -n 40; wait $RUBLK_PID")
for _ in $(seq 100); do [ -b /dev/ublkb40 ] && break; kill -0 $RUBLK_PID 2>/dev/null || break; sleep 0.1; done
[ -b /dev/ublkb40 ] || { cat "$WORK/rublk.out"; fail "rublk did not create /dev/ublkb40"; }
DEVS[rublk]=/dev/ublkb40

# One nbd-proxy serve with three exports on identical images: the mirrored device's target
# ("disk"), dm-raid1's nbd leg, and the direct-latency export.
start_target "$(img mir-remote)" --export "dmr=$(img dmr-remote)" --export "tgt=$(img tgt)"
CLEANUP+=("kill $TARGET_PID; wait $TARGET_PID")

start_daemon "$(img mir-local)" --queues 1 --label bench-mirrored
DEVS[mirrored]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
mirror_to bench --timeout 30 2> /dev/null
MIRRORED_CTL=$CTL

dmr_loop=$(loop_dev "$(img dmr-local)")
nbd-client 127.0.0.1 10809 /dev/nbd0 -N dmr -b 4096 > "$WORK/nbd-client.out" 2>&1 \
    || { cat "$WORK/nbd-client.out"; fail "nbd-client could not attach /dev/nbd0"; }
CLEANUP+=("nbd-client -d /dev/nbd0")
sectors=$((SIZE * 2048))
# core log in memory, 512 KiB regions, nosync: both legs start identical (zeroed images).
dmsetup create bench-raid1 --noudevsync \
    --table "0 $sectors mirror core 2 1024 nosync 2 $dmr_loop 0 /dev/nbd0 0 1 handle_errors" \
    || fail "dmsetup create (dm-raid1 over $dmr_loop and /dev/nbd0) failed"
CLEANUP+=("dmsetup remove --noudevsync bench-raid1")
dm=/dev/$(ls /sys/block | grep '^dm-' | head -n 1)
[ -b "$dm" ] || fail "no dm block device after dmsetup create"
[ "$(cat "/sys/block/${dm#/dev/}/dm/name")" = bench-raid1 ] || fail "$dm is not bench-raid1"
DEVS[dm-raid1]=$dm
DEVS[nbd-direct]=nbd://127.0.0.1:10809/tgt

ORDER=(loop ublk ublk-q2 rublk mirrored dm-raid1 loop2)
for d in "${ORDER[@]}"; do
    size=$(blockdev --getsize64 "${DEVS[$d]}" 2>/dev/null || echo 0)
    [ "$size" = $((SIZE << 20)) ] || fail "$d (${DEVS[$d]}) is $size bytes, expected $((SIZE << 20))"
    log "  $d: ${DEVS[$d]}"
done

# name -> fio arguments
declare -A JOBS=(
    [randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
    [randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
    [randwrite-4k-qd1]="--rw=randwrite --bs=4k --iodepth=1"
    [randrw-64k-qd16]="--rw=randrw --bs=64k --iodepth=16"
    [write-1m-qd8]="--rw=write --bs=1M --iodepth=8"
)
JOB_ORDER=(randread-4k-qd32 randwrite-4k-qd32 randwrite-4k-qd1 randrw-64k-qd16 write-1m-qd8)

run_fio() { # DEVICE-NAME JOB-NAME OUTPUT [extra fio args]
    local d=$1 j=$2 out=$3; shift 3
    local target=(--filename="${DEVS[$d]}" --ioengine=io_uring)
    [ "$d" = nbd-direct ] && target=(--ioengine=nbd --uri="${DEVS[$d]}")
    # shellcheck disable=SC2086
    fio --name="$d" "${target[@]}" --direct=1 ${JOBS[$j]} --size="${SIZE}M" --time_based \
        --runtime="$SECS" --ramp_time=1 --group_reporting --output-format=json "$@" > "$out" 2> "$out.err" \
        || { cat "$out.err" "$out"; fail "fio $j on $d failed"; }
    grep -q '"error" : 0' "$out" || { cat "$out"; fail "fio $j on $d reported an error"; }
}

log "warm-up: 4k randwrite QD32 on every device"
for d in "${ORDER[@]}"; do run_fio "$d" randwrite-4k-qd32 "$WORK/warmup.json" --runtime=2; done

start=$(date +%s)
for rep in $(seq "$REPS"); do
    for j in "${JOB_ORDER[@]}"; do
        for d in "${ORDER[@]}"; do
            run_fio "$d" "$j" "$RAW/$d.$j.$rep.json"
        done
        if [ "$j" = randwrite-4k-qd1 ]; then
            run_fio nbd-direct "$j" "$RAW/nbd-direct.$j.$rep.json"
        fi
    done
    [ "$(ublk-mirror-ctl --socket "$MIRRORED_CTL" stats | sed -n 's/^nbd_mirror_failed: //p')" = 0 ] \
        || fail "the mirrored device's mirror failed during the run"
    log "rep $rep of $REPS done ($(( $(date +%s) - start )) s)"
done

# Background copy vs nbdcopy of the same image to the same server, interleaved; the matrix's
# devices and target are gone by now.
cleanup; CLEANUP=()
log "background copy vs nbdcopy, $REPS reps"
fill_scattered "$WORK/copy-src.img" "$SIZE"
mkdir -p "$OUT/copy"
for rep in $(seq "$REPS"); do
    make_image "$WORK/copy-dst.img" "${SIZE}M"
    start_target "$WORK/copy-dst.img"
    start_daemon "$WORK/copy-src.img"
    mirror_to "c$rep" --copy 2> /dev/null
    ctl wait-ready > /dev/null || fail "copy did not become ready"
    ctl --json stats > "$OUT/copy/ublk-mirror.$rep.json"
    ctl mirror-stop > /dev/null
    stop_daemon
    stop_pid "$TARGET_PID"
    make_image "$WORK/copy-dst.img" "${SIZE}M"
    start_target "$WORK/copy-dst.img"
    t0=$(now_ms)
    nbdcopy --flush "$WORK/copy-src.img" nbd://127.0.0.1:10809/disk || fail "nbdcopy failed"
    t1=$(now_ms)
    echo "{\"bytes\": $((SIZE << 20)), \"ms\": $((t1 - t0))}" > "$OUT/copy/nbdcopy.$rep.json"
    stop_pid "$TARGET_PID"
    log "copy rep $rep done"
done

cat > "$OUT/machine.json" <<EOF
{"kernel": "$(uname -r)", "cpus": $(nproc), "mem_kb": $(awk '/MemTotal/{print $2}' /proc/meminfo),
 "cpu_model": "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)",
 "reps": $REPS, "secs": $SECS, "size_mib": $SIZE, "fio": "$(fio --version)",
 "rublk": "$(rublk --version 2>/dev/null | head -n 1)", "ublk_mirror": "$(ublk-mirror --version)"}
EOF
sum=$(tar czf - -C "$OUT" . | tee "$WORK/results.tgz" | sha256sum | cut -d' ' -f1)
echo "@@ARCHIVE-BEGIN $sum"
base64 "$WORK/results.tgz"
echo "@@ARCHIVE-END"
