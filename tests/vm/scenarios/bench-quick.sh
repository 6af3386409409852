#!/bin/bash
# Benchmark (not run by the test command): the mirror's key figures in a few minutes, for an A/B
# between commits when the full matrix (bench/run, ~40 min) is too long. Devices interleaved,
# BENCH_REPS (5) reps of BENCH_SECS (3) s after a 1 s ramp, of the jobs in BENCH_JOBS (all), medians:
#   ublk (1 queue), mirrored (1 queue, 1 connection), mirrored-q2 (2 queues, 2 connections, one
#   fio job per queue on its own CPU), dm-raid1 (loop + kernel nbd, 1 connection), and the
#   target alone through fio's nbd engine (QD1 only);
# jobs: 4k randwrite QD1 and QD32, 4k randread QD32. The devices' images are on ext4 on a
# memory-backed null_blk device completing from a timer interrupt (BENCH_STORAGE: lib-bench.sh),
# the target's exports on tmpfs. Prints one QUICK line per job and device
# (IOPS, mean latency, and where the CPU went: microseconds of CPU per I/O in the device's
# daemon, in the NBD server, and in the whole VM, with the VM's busy share of its CPUs) and the
# ratios issue 13 sets targets for.
# A/B in the same run: with BENCH_AB=TAG and ublk-mirror-TAG / ublk-mirror-ctl-TAG in the guest
# (bench/ab puts an older build there), ublk-TAG and mirrored-TAG (1 queue, its own export) run
# interleaved with the others on that build.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
. /scenarios/lib-bench.sh 2>/dev/null || . "$(dirname "$0")/lib-bench.sh"
REPS=${BENCH_REPS:-5} SECS=${BENCH_SECS:-3} SIZE=256 AB=${BENCH_AB:-}
declare -A DEVS R L PIDS TPIDS CD CT CV BUSY
CLEANUP=()
trap 'for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" > /dev/null 2>&1 || true; done' EXIT
# img NAME: a target-side image on tmpfs (the devices' own: store_image).
img() { make_image "$WORK/$1.img" "${SIZE}M"; echo "$WORK/$1.img"; }
# Up to 8 local images (ublk, mirrored, mirrored-q2, dm-raid1, 2 A/B, 2 TLS).
bench_store quickstore $((SIZE * 8 + 128))

start_target "$(img remote)" --export "mq2=$(img mq2)" --export "dmr=$(img dmr)" --export "tgt=$(img tgt)" \
    --export "ab=$(img ab)"
CLEANUP+=("kill $TARGET_PID")
store_image ublk "$SIZE"; start_daemon "$IMG" --queues 1 --dev-id 0
DEVS[ublk]=$DEV PIDS[ublk]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
# Device id 2, even like ublk's 0: a 1-queue thread sits on the CPU counted from the last by
# device id, so both sit away from fio's CPU 0 (as in bench-matrix); odd ids would share it.
store_image mir "$SIZE"; start_daemon "$IMG" --queues 1 --dev-id 2
DEVS[mirrored]=$DEV PIDS[mirrored]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
mirror_to q --timeout 30
store_image mir2 "$SIZE"; start_daemon "$IMG" --queues 2
DEVS[mirrored-q2]=$DEV PIDS[mirrored-q2]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
nbd-proxy connect --to tcp:127.0.0.1:10809 --export mq2 --handoff "$CTL" --name q2 --connections 2 > /dev/null \
    || fail "connect --connections 2 failed"
ctl mirror-start q2.0 q2.1 --export mq2 --timeout 30 > /dev/null || fail "mirror-start over 2 failed"
store_image dmr-local "$SIZE"; loop_dev "$IMG"
nbd_attach /dev/nbd0 dmr 1
dm_mirror quick-raid1 "$LOOP" /dev/nbd0; DEVS[dm-raid1]=$DM
ALL=(ublk mirrored mirrored-q2 dm-raid1)
if [ -n "$AB" ]; then
    command -v "ublk-mirror-$AB" > /dev/null && command -v "ublk-mirror-ctl-$AB" > /dev/null \
        || fail "BENCH_AB=$AB: ublk-mirror-$AB and ublk-mirror-ctl-$AB are not in the guest"
    export UBLK_MIRROR=ublk-mirror-$AB UBLK_MIRROR_CTL=ublk-mirror-ctl-$AB
    # Even device ids (4, 6) like ublk's and mirrored's, so both sit on the same CPU as the
    # devices they are compared with: ublk-TAG on an odd id shared fio's CPU and came out at
    # half of ublk (the same code) for its place alone.
    store_image "ublk-$AB" "$SIZE"; start_daemon "$IMG" --queues 1 --dev-id 4
    DEVS[ublk-$AB]=$DEV PIDS[ublk-$AB]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
    store_image "mir-$AB" "$SIZE"; start_daemon "$IMG" --queues 1 --dev-id 6
    DEVS[mirrored-$AB]=$DEV PIDS[mirrored-$AB]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
    nbd-proxy connect --to tcp:127.0.0.1:10809 --export ab --handoff "$CTL" --name qa > /dev/null \
        || fail "connect to the A/B export failed"
    ctl mirror-start qa --export ab --timeout 30 > /dev/null || fail "mirror-start on ublk-mirror-$AB failed"
    unset UBLK_MIRROR UBLK_MIRROR_CTL
    ALL+=("ublk-$AB" "mirrored-$AB")
fi

# The mirror over TLS (issue 13 asks for the TLS cost on its own), two ways, each with its own
# TLS server: mirrored-tls with the session in the kernel on both ends (kTLS: connect hands the
# daemon the TCP socket and exits), mirrored-tls-relay with --tls-relay on both ends (a relay
# thread in connect and one per connection in serve, as where the kernel has no TLS).
# Their device ids (12, 14) are even like mirrored's (2), so the three queue threads sit on the
# same CPU (placement counts CPUs from the last by device id). BENCH_TLS=0 leaves both out.
if [ "${BENCH_TLS:-1}" = 1 ]; then
    tls=$WORK/tls; make_tls_files "$tls" localhost
    tls_device() { # NAME DEV_ID PORT [--tls-relay]
        local name=$1 id=$2 port=$3 relay=${4:-}
        # shellcheck disable=SC2086
        nbd-proxy serve --listen "tcp:127.0.0.1:$port" --export "tls=$(img "$name-remote")" $relay \
            --tls-cert "$tls/server-cert.pem" --tls-key "$tls/server-key.pem" > "$WORK/$name.out" 2> "$WORK/$name.log" &
        TPIDS[$name]=$!; CLEANUP+=("kill $!")
        for _ in $(seq 100); do grep -q listening "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
        store_image "$name" "$SIZE"; start_daemon "$IMG" --queues 1 --dev-id "$id"
        DEVS[$name]=$DEV PIDS[$name]=$DAEMON_PID; CLEANUP+=("kill $DAEMON_PID")
        # shellcheck disable=SC2086
        nbd-proxy connect --to "tcp:127.0.0.1:$port" --export tls --tls-ca "$tls/ca-cert.pem" $relay \
            --tls-hostname localhost --handoff "$CTL" --name "$name" > "$WORK/$name-connect.out" 2> "$WORK/$name-connect.log" &
        CLEANUP+=("kill $!")
        for _ in $(seq 100); do grep -q "handed off" "$WORK/$name-connect.out" 2>/dev/null && break; sleep 0.1; done
        ctl mirror-start "$name" --export tls --timeout 30 > /dev/null \
            || { cat "$WORK/$name-connect.log" "$WORK/$name.log"; fail "mirror-start over TLS ($name) failed"; }
        sed "s/^/  $name: /" "$WORK/$name-connect.out"
        ALL+=("$name")
    }
    tls_device mirrored-tls 12 10810
    grep -q "TLS in the kernel" "$WORK/mirrored-tls-connect.out" || fail "mirrored-tls: the session is not in the kernel"
    tls_device mirrored-tls-relay 14 10811 --tls-relay
fi

# CPU time, in clock ticks: of process $1 (utime + stime), or of the whole VM (busy, all CPUs).
proc_ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
vm_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
per_io() { awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN {printf "%.0f", t * 1e6 / hz / n}'; } # TICKS IOS -> us

run() { # DEVICE JOB -> "IOPS LAT_US"
    local d=$1 args target=(--filename="${DEVS[$1]:-}" --ioengine=io_uring)
    [ "$d" = nbd-direct ] && target=(--ioengine=nbd --uri=nbd://127.0.0.1:10809/tgt)
    case $2 in
        w1) args="--rw=randwrite --iodepth=1 --numjobs=1 --cpus_allowed=0" ;;
        w32) args="--rw=randwrite --iodepth=32 --numjobs=1 --cpus_allowed=0" ;;
        r32) args="--rw=randread --iodepth=32 --numjobs=1 --cpus_allowed=0" ;;
    esac
    if [ "$d" = mirrored-q2 ] && [ "$2" != w1 ]; then
        args="${args/--iodepth=32 --numjobs=1 --cpus_allowed=0/--iodepth=16 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split}"
    fi
    local d0 t0 v0 d1 t1 v1 out
    local tpid=${TPIDS[$d]:-$TARGET_PID}
    d0=$(proc_ticks "${PIDS[$d]:-}"); t0=$(proc_ticks "$tpid"); v0=$(vm_ticks)
    # shellcheck disable=SC2086
    out=$(fio --name=q "${target[@]}" --direct=1 --bs=4k --size="${SIZE}M" --time_based --runtime="$SECS" \
        --ramp_time=1 --group_reporting $args --output-format=terse --terse-version=3 2> "$WORK/fio.$d.err" \
        | awk -F';' '$1 == 3 {r = $8 + $49; lat = ($8 > 0) ? $40 : $81; print r, lat}')
    d1=$(proc_ticks "${PIDS[$d]:-}"); t1=$(proc_ticks "$tpid"); v1=$(vm_ticks)
    # IOPS, latency, then CPU ticks of the daemon, the target, the VM (busy, total) over the run.
    echo "$out $((d1 - d0)) $((t1 - t0)) $(( ${v1% *} - ${v0% *} )) $(( ${v1#* } - ${v0#* } ))"
    # A run that failed shows why (once per device).
    if [ -s "$WORK/fio.$d.err" ] && [ ! -e "$WORK/fio.$d.shown" ]; then
        sed "s/^/  fio on $d: /" "$WORK/fio.$d.err" >&2; touch "$WORK/fio.$d.shown"
    fi
}
# BENCH_JOBS: a subset, comma-separated (a space would split the VM's kernel command line), e.g.
# "w1" for a long A/B of QD1 alone; ratios whose jobs did not run print n/a.
j=${BENCH_JOBS:-w1,w32,r32}; read -ra JOBS <<< "${j//,/ }"
for rep in $(seq "$REPS"); do
    for j in "${JOBS[@]}"; do
        devs=("${ALL[@]}")
        [ "$j" = w1 ] && devs+=(nbd-direct)
        # Rotated by one each rep, so no device always runs first or right after the same one:
        # in a fixed order, ublk and ublk-TAG (the same code) differed by 1.24x by place alone.
        k=$(( (rep - 1) % ${#devs[@]} )); devs=("${devs[@]:k}" "${devs[@]:0:k}")
        for d in "${devs[@]}"; do
            read -r iops lat cd ct vb vt < <(run "$d" "$j")
            R[$d.$j]="${R[$d.$j]:-} $iops"; L[$d.$j]="${L[$d.$j]:-} $lat"
            # CPU microseconds per I/O (the run's I/Os: IOPS x (SECS + 1 s ramp), roughly).
            ios=$(awk -v i="$iops" -v s="$SECS" 'BEGIN {print (i > 0) ? i * (s + 1) : 1}')
            CD[$d.$j]="${CD[$d.$j]:-} $(per_io "$cd" "$ios")"; CT[$d.$j]="${CT[$d.$j]:-} $(per_io "$ct" "$ios")"
            CV[$d.$j]="${CV[$d.$j]:-} $(per_io "$vb" "$ios")"
            BUSY[$d.$j]="${BUSY[$d.$j]:-} $(awk -v b="$vb" -v t="$vt" 'BEGIN {printf "%.0f", (t > 0) ? 100 * b / t : 0}')"
        done
    done
    log "rep $rep of $REPS"
done
for j in "${JOBS[@]}"; do
    for d in "${ALL[@]}" nbd-direct; do
        [ -n "${R[$d.$j]:-}" ] || continue
        # shellcheck disable=SC2086
        echo "QUICK $j $d: IOPS $(median ${R[$d.$j]}) [${R[$d.$j]# }], mean lat $(median ${L[$d.$j]}) us;" \
            "CPU us/IO: daemon $(median ${CD[$d.$j]}), target $(median ${CT[$d.$j]}), VM $(median ${CV[$d.$j]})" \
            "(VM busy $(median ${BUSY[$d.$j]})%)"
    done
done
# shellcheck disable=SC2086
{
    m1=$(median ${R[mirrored.w1]:-}); d1=$(median ${R[dm-raid1.w1]:-}); m32=$(median ${R[mirrored.w32]:-})
    d32=$(median ${R[dm-raid1.w32]:-}); lm=$(median ${L[mirrored.w1]:-}); lu=$(median ${L[ublk.w1]:-})
    lt=$(median ${L[nbd-direct.w1]:-}); q2=$(median ${R[mirrored-q2.w32]:-}); mr=$(median ${R[mirrored.r32]:-})
    ur=$(median ${R[ublk.r32]:-})
}
awk -v m1="$m1" -v d1="$d1" -v m32="$m32" -v d32="$d32" -v lm="$lm" -v lu="$lu" -v lt="$lt" \
    -v q2="$q2" -v mr="$mr" -v ur="$ur" '
function ratio(a, b) { return (b > 0) ? sprintf("%.2f", a / b) : "n/a" }
BEGIN {
    mx = (lu > lt) ? lu : lt
    printf "QUICK mirrored/dm-raid1 4k randwrite QD1 %s (target >= 1.2)\n", ratio(m1, d1)
    printf "QUICK mirrored/dm-raid1 4k randwrite QD32 %s (target >= 1.2)\n", ratio(m32, d32)
    if (lt > 0) printf "QUICK mirrored QD1 mean latency / max(ublk, target alone) %s (target <= 1.3)\n", ratio(lm, mx)
    else printf "QUICK mirrored QD1 mean latency / max(ublk, target alone): target alone not measured (see the fio error above)\n"
    printf "QUICK mirrored-q2/mirrored 4k randwrite QD32 %s (target >= 1.0)\n", ratio(q2, m32)
    printf "QUICK mirrored/ublk 4k randread QD32 %s (guard >= 0.95)\n", ratio(mr, ur)
}'
if [ -n "${DEVS[mirrored-tls]:-}" ]; then
    for j in "${JOBS[@]}"; do
        # shellcheck disable=SC2086
        awk -v t="$(median ${R[mirrored-tls.$j]})" -v r="$(median ${R[mirrored-tls-relay.$j]})" \
            -v p="$(median ${R[mirrored.$j]})" -v j="$j" 'BEGIN {
            printf "QUICK TLS cost %s: mirrored-tls (kTLS) / mirrored %.2f, mirrored-tls-relay / mirrored %.2f, kTLS / relay %.2f\n",
                j, (p > 0) ? t / p : 0, (p > 0) ? r / p : 0, (r > 0) ? t / r : 0 }'
    done
fi
if [ -n "$AB" ]; then
    for j in "${JOBS[@]}"; do
        for d in ublk mirrored; do
            # shellcheck disable=SC2086
            awk -v n="$(median ${R[$d.$j]})" -v o="$(median ${R[$d-$AB.$j]})" -v d="$d" -v j="$j" -v ab="$AB" \
                'BEGIN {printf "QUICK A/B %s %s: this build / %s %.2f\n", j, d, ab, (o > 0) ? n / o : 0}'
        done
    done
fi
