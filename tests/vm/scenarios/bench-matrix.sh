#!/bin/bash
# Benchmark (run by bench/run, not by the test command): the fio matrix of issues 7 and 13.
#
# Devices, each on its own identical image (zeros) on the same storage: ext4 on a memory-backed
# null_blk device completing from a timer interrupt (BENCH_STORAGE: ext4 completes inline, tmpfs
# is the guest's tmpfs; lib-bench.sh bench_store says why neither is the default):
#   loop        kernel loop, --direct-io=on (the reference)
#   loop2       a second kernel loop device: loop against itself is the noise floor
#   ublk        ublk-mirror, 1 queue, unmirrored
#   ublk-q2     ublk-mirror, 2 queues, unmirrored
#   rublk       rublk's loop target (default options: 1 queue, depth 128, direct I/O) (needs
#               /usr/local/bin/rublk: bench/run puts it there), its threads moved to the last
#               CPU, where ublk-mirror's 1-queue devices serve (placement.rs)
#   mirrored    ublk-mirror, 1 queue, mirroring over 1 connection to nbd-proxy serve in this VM
#               (export "disk")
#   dm-raid1    device-mapper mirror of a direct-io loop device and /dev/nbd0, attached with
#               nbd-client (1 connection) straight to the same nbd-proxy serve (export "dmr")
#   mirrored-q2 ublk-mirror, 2 queues, mirroring over 2 connections (nbd-proxy connect
#               --connections 2, queue i drives connection i) to its own export "mq2"
#   dm-raid1-c2 a second dm mirror, its own loop device and /dev/nbd1 attached with
#               nbd-client -C 2 (2 connections) to its own export "dmr2"
#   mirrored-bitmap  ublk-mirror, 1 queue, mirrored over 1 connection to its own export "bm",
#               with --bitmap on ext4 on another memory-backed null_blk device whose every
#               I/O (flushes included: it has a volatile write cache) completes after
#               BENCH_NULLB_NSEC ns (200 us), so the activity log's writes cost something
#   nbd-direct  fio's nbd engine (libnbd) against that server (export "tgt"): the target's own
#               QD1 latency
# Pairs: mirrored with dm-raid1 (1 connection each), mirrored-q2 with dm-raid1-c2 (2 each).
#
# Submitters (the same rule for every device): a job of total queue depth QD runs as numjobs =
# the device's queues, each job pinned to its own CPU with iodepth QD/queues:
#   2-queue devices (ublk-q2, mirrored-q2): --numjobs=2 --iodepth=QD/2 --cpus_allowed=0-1
#       --cpus_allowed_policy=split, each job on its own half of the device (--size=SIZE/2
#       --offset_increment=SIZE/2, so the sequential job's two streams never overlap);
#   every other device counts as 1 queue, one submitter (kernel loop and nbd are multi-queue
#       inside, dm-raid1 and rublk have one submitter here): --numjobs=1 --cpus_allowed=0;
#   the QD1 job: --numjobs=1 --cpus_allowed=0 on every device.
# --group_reporting sums the jobs. Jobs: see MATRIX_JOBS in lib-bench.sh. Every job runs BENCH_REPS times with the
# devices interleaved (loop ublk ... loop ublk ...) after one warm-up per device, so rep i of
# one device pairs with rep i of another.
#
# The NBD target's exports are images on the guest's tmpfs.
#
# Scale row (after the matrix, its devices gone): 16 ublk-mirror daemons (1 queue, unmirrored,
# 64 MiB images on a store of their own); per rep, 4k randread QD32 on the first alone (1 job, CPU 0), then on all 16 at
# once (one fio, 16 jobs, one per device, split over CPUs 0-1); VmRSS of every daemon right
# after it is ready (idle) and after the last rep.
#
# The raw fio JSON of every run is packed into the console between @@ARCHIVE markers for
# bench/run to unpack. Any device that cannot be set up fails the scenario: no partial matrix.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
REPS=${BENCH_REPS:-5} SECS=${BENCH_SECS:-4} SIZE=${BENCH_SIZE_MIB:-512}
NULLB_NSEC=${BENCH_NULLB_NSEC:-200000} SCALE_N=16 SCALE_MIB=64
OUT=$WORK/results RAW=$WORK/results/raw
mkdir -p "$RAW"
losetup --help | grep -q -- --direct-io || fail "$(command -v losetup) is not util-linux losetup (no --direct-io)"
command -v rublk > /dev/null || fail "rublk is not in the guest: run the matrix through bench/run"
command -v mkfs.ext4 > /dev/null || fail "mkfs.ext4 is not in the guest (tests/vm/guest-tools.txt)"
[ "$(nproc)" -ge 2 ] || fail "the matrix pins jobs to CPUs 0-1: the guest has $(nproc) CPU(s)"

declare -A DEVS   # name -> block device (or nbd URI for nbd-direct)
MIRROR_CTLS=()    # control sockets of the mirrored devices, checked after every rep
CLEANUP=()
cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done
}
trap cleanup EXIT

# img NAME: a target-side image on tmpfs (local images: store_image, lib-bench.sh).
img() { make_image "$WORK/$1.img" "${SIZE}M"; echo "$WORK/$1.img"; }
# mirror_export NAME EXPORT CONNECTIONS: CONNECTIONS sockets to EXPORT of the target, handed to
# the current daemon ($CTL) as NAME (1) or NAME.0 ... (more), and a mirror over all of them.
mirror_export() {
    local name=$1 export=$2 n=$3 names=$1
    nbd-proxy connect --to tcp:127.0.0.1:10809 --export "$export" --handoff "$CTL" --name "$name" \
        --connections "$n" > "$WORK/connect.$name.out" 2>&1 \
        || { cat "$WORK/connect.$name.out"; fail "nbd-proxy connect --export $export --connections $n failed"; }
    if [ "$n" -gt 1 ]; then names=$(seq -f "$name.%g" 0 $((n - 1)) | tr '\n' ' '); fi
    # shellcheck disable=SC2086
    ctl mirror-start $names --export "$export" --timeout 30 > "$WORK/mirror-start.$name.out" 2>&1 \
        || { cat "$WORK/mirror-start.$name.out"; fail "mirror-start $names --export $export failed"; }
    [ "$(ctl_get stats mirror.state)" = active ] || fail "$name: mirror is not active"
    [ "$(ctl_get stats mirror.connections)" = "$n" ] \
        || fail "$name: stats shows $(ctl_get stats mirror.connections) connections, not $n"
    MIRROR_CTLS+=("$CTL")
}

log "setting up devices (${SIZE} MiB images)"
# 10 local images and the filesystem's own blocks.
bench_store benchstore $((SIZE * 10 + 256))
store_image loop "$SIZE"; loop_dev "$IMG"; DEVS[loop]=$LOOP
store_image loop2 "$SIZE"; loop_dev "$IMG"; DEVS[loop2]=$LOOP

store_image ublk "$SIZE"; start_daemon "$IMG" --queues 1 --label bench-ublk
DEVS[ublk]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
store_image ublk-q2 "$SIZE"; start_daemon "$IMG" --queues 2 --label bench-ublk-q2
DEVS[ublk-q2]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")

# rublk, its threads on the last CPU beside ublk's (lib-bench.sh says why).
start_rublk "$SIZE"; DEVS[rublk]=$RUBLK_DEV

# One nbd-proxy serve (it advertises CAN_MULTI_CONN) with an export per mirror on identical
# images: "disk" (mirrored), "dmr" (dm-raid1), "mq2" (mirrored-q2), "dmr2" (dm-raid1-c2), "bm"
# (mirrored-bitmap), and "tgt" for the direct latency.
start_target "$(img mir-remote)" --export "dmr=$(img dmr-remote)" --export "tgt=$(img tgt)" \
    --export "mq2=$(img mq2-remote)" --export "dmr2=$(img dmr2-remote)" --export "bm=$(img bm-remote)"
CLEANUP+=("kill $TARGET_PID; wait $TARGET_PID")

store_image mir-local "$SIZE"; start_daemon "$IMG" --queues 1 --label bench-mirrored
DEVS[mirrored]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
mirror_export bench disk 1

nbd_attach /dev/nbd0 dmr 1
store_image dmr-local "$SIZE"; loop_dev "$IMG"; dm_mirror bench-raid1 "$LOOP" /dev/nbd0; DEVS[dm-raid1]=$DM

store_image mq2-local "$SIZE"; start_daemon "$IMG" --queues 2 --label bench-mirrored-q2
DEVS[mirrored-q2]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
mirror_export mq2 mq2 2

nbd_attach /dev/nbd1 dmr2 2
store_image dmr2-local "$SIZE"; loop_dev "$IMG"; dm_mirror bench-raid1-c2 "$LOOP" /dev/nbd1; DEVS[dm-raid1-c2]=$DM

nullb_ext4 benchbm 256 "$WORK/bm-fs" "$NULLB_NSEC"
store_image bm-local "$SIZE"; start_daemon "$IMG" --queues 1 --bitmap "$WORK/bm-fs/bench.bitmap" --label bench-mirrored-bitmap
DEVS[mirrored-bitmap]=$DEV; CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
mirror_export bm bm 1
[ "$(ctl_get stats mirror.bitmap_persistent)" = true ] || fail "mirrored-bitmap: the bitmap is not persistent"
[ -s "$WORK/bm-fs/bench.bitmap" ] || fail "mirrored-bitmap: no bitmap file on the ext4 filesystem"
DEVS[nbd-direct]=nbd://127.0.0.1:10809/tgt

ORDER=(loop ublk ublk-q2 rublk mirrored dm-raid1 mirrored-q2 dm-raid1-c2 mirrored-bitmap loop2)
for d in "${ORDER[@]}"; do
    size=$(blockdev --getsize64 "${DEVS[$d]}" 2>/dev/null || echo 0)
    [ "$size" = $((SIZE << 20)) ] || fail "$d (${DEVS[$d]}) is $size bytes, expected $((SIZE << 20))"
    log "  $d: ${DEVS[$d]}"
done

# The jobs: MATRIX_JOBS (lib-bench.sh).
JOB_ORDER=(randread-4k-qd32 randwrite-4k-qd32 randwrite-4k-qd1 randrw-64k-qd16 write-1m-qd8)
# Queues of each device for the submitter rule (header); every device not named has 1.
declare -A QUEUES=([ublk-q2]=2 [mirrored-q2]=2)

# job_args DEVICE JOB: the fio arguments of JOB on DEVICE under the submitter rule.
job_args() {
    local rw bs qd q
    read -r rw bs qd <<< "${MATRIX_JOBS[$2]}"
    q=${QUEUES[$1]:-1}
    [ "$qd" = 1 ] && q=1
    if [ "$q" = 1 ]; then
        echo "--rw=$rw --bs=$bs --iodepth=$qd --numjobs=1 --cpus_allowed=0 --size=${SIZE}M"
        return
    fi
    [ $((qd % q)) = 0 ] || fail "job $2: queue depth $qd does not split over $q queues"
    echo "--rw=$rw --bs=$bs --iodepth=$((qd / q)) --numjobs=$q --cpus_allowed=0-$((q - 1))" \
        "--cpus_allowed_policy=split --size=$((SIZE / q))M --offset_increment=$((SIZE / q))M"
}

# fio_json OUTPUT WHAT fio-args...: one fio run into OUTPUT (JSON); fails on any error.
fio_json() {
    local out=$1 what=$2; shift 2
    fio --direct=1 --time_based --runtime="$SECS" --ramp_time=1 --group_reporting \
        --output-format=json "$@" > "$out" 2> "$out.err" \
        || { cat "$out.err" "$out"; fail "fio $what failed"; }
    grep -q '"error" : 0' "$out" || { cat "$out"; fail "fio $what reported an error"; }
    if grep -q '"error" : [1-9]' "$out"; then cat "$out"; fail "fio $what: a job reported an error"; fi
}

run_fio() { # DEVICE-NAME JOB-NAME OUTPUT [extra fio args]
    local d=$1 j=$2 out=$3 args; shift 3
    local target=(--filename="${DEVS[$d]}" --ioengine=io_uring)
    [ "$d" = nbd-direct ] && target=(--ioengine=nbd --uri="${DEVS[$d]}")
    args=$(job_args "$d" "$j") || exit 1
    # shellcheck disable=SC2086
    fio_json "$out" "$j on $d" --name="$d" "${target[@]}" $args "$@"
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
    for c in "${MIRROR_CTLS[@]}"; do
        [ "$(ublk-mirror-ctl --socket "$c" stats | sed -n 's/^nbd_mirror_failed: //p')" = 0 ] \
            || fail "the mirror of $c failed during the run"
    done
    log "rep $rep of $REPS done ($(( $(date +%s) - start )) s)"
done
cleanup; CLEANUP=()
rm -f "$WORK"/*.img

# vm_rss PID: sets RSS_KB to the VmRSS of PID, or fails.
vm_rss() {
    RSS_KB=$(awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || true)
    [ -n "$RSS_KB" ] || fail "no VmRSS for daemon $1: did it exit?"
}

# scale_reps PREFIX FIRST FIO-DEVICE-ARGS...: REPS reps of 4k randread QD32 on the device FIRST
# alone (1 job on CPU 0), then on every device at once (one job each, split over CPUs 0-1), to
# scale/PREFIXone.REP.json and scale/PREFIXall.REP.json.
SCALE_JOB=(--ioengine=io_uring --rw=randread --bs=4k --iodepth=32)
scale_reps() {
    local prefix=$1 first=$2 rep; shift 2
    for rep in $(seq "$REPS"); do
        fio_json "$OUT/scale/${prefix}one.$rep.json" "scale: 1 ${prefix}device" "${SCALE_JOB[@]}" \
            --cpus_allowed=0 --name=scale1 --filename="$first"
        fio_json "$OUT/scale/${prefix}all.$rep.json" "scale: $SCALE_N ${prefix}devices" "${SCALE_JOB[@]}" \
            --cpus_allowed=0-1 --cpus_allowed_policy=split "$@"
        log "scale ${prefix}rep $rep of $REPS done"
    done
}

# The scale row (header): idle RSS, 1 device alone vs all at once, RSS after.
scale_row() {
    local i devs=() pids=() idle=() after=() all=() p
    log "scale: $SCALE_N daemons, ${SCALE_MIB} MiB images, 1 queue each, unmirrored"
    mkdir -p "$OUT/scale"
    bench_store scalestore $((SCALE_N * SCALE_MIB + 128))
    for i in $(seq "$SCALE_N"); do
        store_image "scale$i" "$SCALE_MIB"
        start_daemon "$IMG" --queues 1 --label "bench-scale-$i" > /dev/null
        CLEANUP+=("kill $DAEMON_PID; wait $DAEMON_PID")
        vm_rss "$DAEMON_PID"
        devs+=("$DEV"); pids+=("$DAEMON_PID"); idle+=("$RSS_KB")
        all+=(--name="scale$i" --filename="$DEV")
    done
    fio_json "$WORK/warmup.json" "scale warm-up" "${SCALE_JOB[@]}" --cpus_allowed=0-1 \
        --cpus_allowed_policy=split --runtime=2 "${all[@]}"
    scale_reps "" "${devs[0]}" "${all[@]}"
    for p in "${pids[@]}"; do vm_rss "$p"; after+=("$RSS_KB"); done
    cat > "$OUT/scale/rss.json" <<EOF
{"devices": $SCALE_N, "image_mib": $SCALE_MIB, "queues": 1, "depth": 128, "max_io": 524288,
 "idle_kb": [$(IFS=,; echo "${idle[*]}")], "after_kb": [$(IFS=,; echo "${after[*]}")]}
EOF
    log "scale: idle VmRSS kB ${idle[*]}; after ${after[*]}"
    for p in "${pids[@]}"; do kill "$p"; wait "$p" || true; done
    # The same runs on kernel loop devices over the same images: the kernel's own cost of N
    # devices at once, the reference the daemons' aggregate is read against.
    local loops=() lall=()
    log "scale: the same on $SCALE_N kernel loop devices"
    for i in $(seq "$SCALE_N"); do
        loop_dev "$STORE/scale$i.img"; loops+=("$LOOP"); lall+=(--name="scale$i" --filename="$LOOP")
    done
    scale_reps loop- "${loops[0]}" "${lall[@]}"
    cleanup; CLEANUP=()
    rm -f "$WORK"/scale*.img
}
scale_row

# Background copy vs nbdcopy of the same image to the same server, interleaved; the matrix's
# devices and target are gone by now.
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
 "nullb_completion_nsec": $NULLB_NSEC, "scale_devices": $SCALE_N, "storage": "${BENCH_STORAGE:-ext4-irq}",
 "rublk": "$(rublk --version 2>/dev/null | head -n 1)", "ublk_mirror": "$(ublk-mirror --version)"}
EOF
sum=$(tar czf - -C "$OUT" . | tee "$WORK/results.tgz" | sha256sum | cut -d' ' -f1)
echo "@@ARCHIVE-BEGIN $sum"
base64 "$WORK/results.tgz"
echo "@@ARCHIVE-END"
