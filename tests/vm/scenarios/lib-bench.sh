# Helpers of the benchmark scenarios (bench-*.sh), sourced after lib.sh: where the devices' local
# images live, and the kernel's own mirror (dm-raid1 over loop and kernel nbd) to compare with.
# The matrix's jobs, name -> "rw block-size total-queue-depth" (bench-matrix runs them all;
# bench-profile the one PROFILE_JOB names).
declare -A MATRIX_JOBS=(
    [randread-4k-qd32]="randread 4k 32"
    [randwrite-4k-qd32]="randwrite 4k 32"
    [randwrite-4k-qd1]="randwrite 4k 1"
    [randrw-64k-qd16]="randrw 64k 16"
    [write-1m-qd8]="write 1M 8"
)

# Each helper that sets something up appends its undo to the scenario's CLEANUP array (the
# scenario's EXIT trap runs it in reverse), so none is called in a command substitution.

# bench_store NAME MIB: sets STORE to the directory of the devices' local images.
# BENCH_STORAGE=ext4-irq (the default since 2026-12-08): ext4 on a memory-backed null_blk
# device NAME of MIB MiB that completes every I/O from a timer interrupt 20 µs after it was
# issued, as a host keeps images on a disk filesystem and a disk completes from its interrupt.
# BENCH_STORAGE=ext4 (the default from 2026-12-02 to 12-08): the same device completing every
# I/O inside submit_bio (a RAM disk). Why it is no longer the default: it favours the kernel's
# loop on writes in a way no disk does. An unplugged O_DIRECT write to ext4 then finishes inside
# the write call, as the loop worker's do, while io_uring plugs every batch of more than 2
# SQEs, so the daemon's writes complete when the plug is flushed, after the write call, and so
# through ext4's dio workqueue: a kworker wake-up and 2 context switches per write that loop
# does not pay there. From an interrupt, every write of loop and of the daemon takes that hop.
# (Issue 13, stop 30: a daemon built to issue each write alone in its io_uring_enter ran 1.30x
# and 1.43x the 4k randwrite QD32 IOPS on the inline store in two VM runs, with 0.12 context
# switches per write instead of 1.9, and 0.64x on ext4-irq (there with both builds on fio's
# CPU): not a change to make for disks.)
# BENCH_STORAGE=tmpfs: the guest's tmpfs ($WORK), as before 2026-12-02. Why not tmpfs: shmem
# files have no FMODE_NOWAIT, so io_uring hands every read and write on them to an io-wq
# worker (a wake-up and two context switches per I/O that no host pays), while the kernel's
# loop does its I/O from its own worker either way.
# The targets' images stay on tmpfs on every store: every device of a pair mirrors to the same
# kind of export, and the target alone is measured there.
bench_store() {
    case ${BENCH_STORAGE:-ext4-irq} in
        tmpfs) STORE=$WORK ;;
        ext4) nullb_ext4 "$1" "$2" "$WORK/$1" 0; STORE=$WORK/$1 ;;
        ext4-irq) nullb_ext4 "$1" "$2" "$WORK/$1" 20000 0; STORE=$WORK/$1 ;;
        *) fail "BENCH_STORAGE=${BENCH_STORAGE}: expected ext4-irq, ext4 or tmpfs" ;;
    esac
    log "  local images in $STORE (BENCH_STORAGE=${BENCH_STORAGE:-ext4-irq})"
}

# store_image NAME MIB: creates $STORE/NAME.img of MIB MiB and sets IMG to its path. On ext4
# every block is written (zeros, O_DIRECT), as an image copied onto a host's storage: an
# O_DIRECT overwrite of written blocks can run inline on the ring, a write into an unwritten
# (fallocated) extent cannot. On tmpfs it is fallocated (every page allocated).
store_image() {
    IMG=$STORE/$1.img
    if [ "$STORE" = "$WORK" ]; then make_image "$IMG" "$2M"; return; fi
    rm -f "$IMG"
    dd if=/dev/zero of="$IMG" bs=1M count="$2" oflag=direct status=none || fail "cannot fill $IMG"
}

# nullb_ext4 NAME MIB MOUNTPOINT NSEC [CACHE_MIB]: a memory-backed null_blk device (configfs) of
# MIB MiB, ext4 on it, mounted at MOUNTPOINT. NSEC 0: every I/O completes inline, no write
# cache. NSEC > 0: every I/O completing after NSEC ns on a timer, and a volatile write cache of
# CACHE_MIB MiB (16 unless given; 0: none), so flushes reach the device.
nullb_ext4() {
    local name=$1 mib=$2 mnt=$3 nsec=$4 cache=${5:-16} cfg=/sys/kernel/config kv i dev="" opts
    [ -d "$cfg/nullb" ] || mount -t configfs configfs "$cfg" || fail "cannot mount configfs"
    [ -d "$cfg/nullb" ] || fail "no $cfg/nullb: null_blk is not loaded (tests/vm/guest-modules.txt)"
    mkdir "$cfg/nullb/$name" || fail "cannot create the null_blk device $name"
    CLEANUP+=("rmdir $cfg/nullb/$name")
    opts="memory_backed=1 size=$mib blocksize=4096 irqmode=0"
    [ "$nsec" -gt 0 ] && opts="memory_backed=1 size=$mib blocksize=4096 cache_size=$cache irqmode=2 completion_nsec=$nsec"
    for kv in $opts; do
        echo "${kv#*=}" > "$cfg/nullb/$name/${kv%%=*}" || fail "null_blk $name refused ${kv}"
    done
    echo 1 > "$cfg/nullb/$name/power" || fail "null_blk $name did not power on"
    CLEANUP+=("echo 0 > $cfg/nullb/$name/power")
    for _ in $(seq 50); do
        [ -b "/dev/$name" ] && { dev=/dev/$name; break; }   # named after its configfs directory
        i=$(cat "$cfg/nullb/$name/index" 2>/dev/null || true)   # or after its index (older kernels)
        [ -n "$i" ] && [ -b "/dev/nullb$i" ] && { dev=/dev/nullb$i; break; }
        sleep 0.1
    done
    [ -n "$dev" ] || fail "null_blk $name powered on but no block device appeared"
    # One inode per MiB: the filesystem holds a few large images, and a smaller inode table is
    # less to write under TCG.
    mkfs.ext4 -F -q -t ext4 -i 1048576 -E lazy_itable_init=0,lazy_journal_init=0 "$dev" > "$WORK/mkfs.out" 2>&1 \
        || { cat "$WORK/mkfs.out"; fail "mkfs.ext4 on $dev failed"; }
    mkdir -p "$mnt"
    mount -t ext4 "$dev" "$mnt" || { dmesg | tail -n 5; fail "mounting ext4 on $dev failed"; }
    CLEANUP+=("umount $mnt")
    log "  ext4 on $dev (null_blk, memory-backed, ${mib} MiB, ${nsec} ns per I/O) at $mnt"
}

# loop_dev IMAGE: sets LOOP to a new /dev/loopN with direct I/O on IMAGE, or fails.
loop_dev() {
    LOOP=$(losetup --direct-io=on --show -f "$1") || fail "losetup --direct-io=on $1 failed"
    CLEANUP+=("losetup -d $LOOP")
    [ "$(cat "/sys/block/${LOOP#/dev/}/loop/dio")" = 1 ] || fail "$LOOP does not use direct I/O"
}

# nbd_attach DEV EXPORT CONNECTIONS [PORT]: the kernel nbd client on DEV, straight to the
# target on 127.0.0.1:PORT (10809).
nbd_attach() {
    nbd-client 127.0.0.1 "${4:-10809}" "$1" -N "$2" -b 4096 -C "$3" > "$WORK/nbd-client.$2.out" 2>&1 \
        || { cat "$WORK/nbd-client.$2.out"; fail "nbd-client could not attach $1 to $2 ($3 connections)"; }
    CLEANUP+=("nbd-client -d $1")
}

# dm_mirror NAME LOCAL NBD: sets DM to the block device of a new dm mirror NAME over LOCAL and
# NBD, as large as LOCAL. Core log in memory, 512 KiB regions, nosync: both legs start
# identical (zeroed images).
dm_mirror() {
    local name=$1 sectors s
    sectors=$(blockdev --getsz "$2") || fail "cannot read the size of $2"
    dmsetup create "$name" --noudevsync \
        --table "0 $sectors mirror core 2 1024 nosync 2 $2 0 $3 0 1 handle_errors" \
        || fail "dmsetup create $name (over $2 and $3) failed"
    CLEANUP+=("dmsetup remove --noudevsync $name")
    for s in /sys/block/dm-*; do
        if [ "$(cat "$s/dm/name" 2>/dev/null)" = "$name" ]; then DM=/dev/${s##*/}; return; fi
    done
    fail "no dm block device named $name after dmsetup create"
}

# switches_per_io STATFILE IOS: "X context switches and Y CPU migrations per I/O" from the file
# of `perf stat -x, -e context-switches,cpu-migrations -o STATFILE` over a run of IOS I/Os.
switches_per_io() {
    awk -F, -v ios="$2" '
        $3 == "context-switches" {cs = $1} $3 == "cpu-migrations" {mg = $1}
        END {printf "%.2f context switches and %.3f CPU migrations per I/O", cs / ios, mg / ios}
    ' "$1"
}

# start_rublk MIB: rublk's loop target (device 40) on a new image of MIB MiB in $STORE, its
# threads on the last CPU; sets RUBLK_DEV and appends its undo to CLEANUP. Needs rublk in the
# guest (bench/run and bench/profile put it there). --foreground: rublk's own daemonizing
# fails in this initramfs ("not recieved device id").
# Why the CPU: libublk pins rublk's queue thread to a CPU picked at random from the queue's mask
# (all CPUs for 1 queue), so from one matrix to the next it served on fio's CPU 0 or away from
# it, and rublk / loop swung from 0.53 to 1.11 on 4k randread. Its threads go where
# ublk-mirror's 1-queue devices serve (device 0: the last CPU), so ublk / rublk compares the
# two servers.
start_rublk() {
    local pid cpu=$(($(nproc) - 1))
    command -v rublk > /dev/null || fail "rublk is not in the guest (bench/run and bench/profile add it)"
    store_image rublk "$1"
    rublk add loop -n 40 -f "$IMG" --quiet --foreground > "$WORK/rublk.out" 2>&1 &
    pid=$!
    CLEANUP+=("rublk del -n 40; wait $pid")
    for _ in $(seq 100); do [ -b /dev/ublkb40 ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    [ -b /dev/ublkb40 ] || { cat "$WORK/rublk.out"; fail "rublk did not create /dev/ublkb40"; }
    taskset -a -p -c "$cpu" "$pid" > "$WORK/rublk-taskset.out" 2>&1 \
        || { cat "$WORK/rublk-taskset.out"; fail "cannot move rublk's threads to CPU $cpu"; }
    log "  rublk's threads: $(for t in /proc/$pid/task/*; do printf '%s ' "$(taskset -c -p "${t##*/}" | sed 's/.*: //')"; done)(CPUs)"
    RUBLK_DEV=/dev/ublkb40
}
