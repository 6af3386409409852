# Helpers sourced by every scenario. A scenario is a bash script that exits 0 on success;
# it runs in its own empty directory $WORK (tmpfs in the VM) and must stop what it starts.
set -euo pipefail
# A command failing under set -e names itself, so no scenario fails silently.
trap 'echo "FAIL: ${BASH_SOURCE[0]##*/}:$LINENO: \`$BASH_COMMAND\` exited $?" >&2' ERR

log() { echo "[$(date +%T)] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# make_image PATH SIZE: a sparse image (fallocate is much faster than dd under TCG).
make_image() { rm -f "$1"; fallocate -l "$2" "$1"; }

# start_daemon IMAGE [serve args...]: starts ublk-mirror in the background and waits until the
# device is live. Sets DEV (/dev/ublkbN), DEV_ID, DAEMON_PID, DAEMON_LOG.
start_daemon() { local img=$1; shift; launch_daemon serve --image "$img" "$@"; }

# recover_daemon DEV_ID: `ublk-mirror recover` of a device whose daemon died or detached;
# sets the same variables as start_daemon.
recover_daemon() { launch_daemon recover --dev-id "$1"; }

launch_daemon() {
    DAEMON_LOG=$WORK/daemon.$RANDOM.log
    local fifo=$WORK/ready.$RANDOM
    mkfifo "$fifo"
    # UBLK_MIRROR may be a command with arguments (e.g. "taskset -c 1 ublk-mirror"): split.
    # shellcheck disable=SC2086
    ${UBLK_MIRROR:-ublk-mirror} "$@" --ready-fd 3 3>"$fifo" >"$DAEMON_LOG.out" 2>"$DAEMON_LOG" &
    DAEMON_PID=$!
    local line=""
    read -r -t 60 line < "$fifo" || true
    rm -f "$fifo"
    if [[ $line != READY=1* ]]; then
        cat "$DAEMON_LOG" >&2
        fail "daemon ($1) did not become ready (got '$line')"
    fi
    DEV=${line#*DEVICE=}
    DEV_ID=${DEV#/dev/ublkb}
    CTL=/run/ublk-mirror/$DEV_ID.sock
    [ -b "$DEV" ] || fail "$DEV is not a block device"
    log "daemon $DAEMON_PID ($1) serves $DEV"
}

# stop_daemon [SIGNAL]: signals the daemon, waits, and requires exit 0 and no device left.
stop_daemon() {
    local sig=${1:-TERM} rc=0
    kill -"$sig" "$DAEMON_PID"
    wait "$DAEMON_PID" || rc=$?
    [ $rc -eq 0 ] || { cat "$DAEMON_LOG" >&2; fail "daemon exited $rc after SIG$sig"; }
    [ ! -e "$DEV" ] || fail "$DEV still exists after the daemon exited"
    [ ! -e "/dev/ublkc$DEV_ID" ] || fail "/dev/ublkc$DEV_ID still exists after the daemon exited"
    log "daemon stopped cleanly"
}

# exit_stat NAME: a counter from the daemon's "stats at exit" log line.
exit_stat() {
    grep -o "stats at exit: .*" "$DAEMON_LOG" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

# sysfs_queue ATTR: /sys/block/ublkbN/queue/ATTR of the current device.
sysfs_queue() { cat "/sys/block/$(basename "$DEV")/queue/$1"; }

# ctl ARGS...: ublk-mirror-ctl against the current daemon's control socket.
# (UBLK_MIRROR and UBLK_MIRROR_CTL name other binaries: a bench's A/B against an older build.)
ctl() { "${UBLK_MIRROR_CTL:-ublk-mirror-ctl}" --socket "$CTL" "$@"; }

# ctl_get COMMAND KEY: one field of a command's text output ("key: value" lines).
ctl_get() { ctl "$1" | sed -n "s/^$2: //p"; }

# now_ms: milliseconds since the epoch.
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# wait_stat KEY VALUE MS: polls the daemon's `stats` until KEY reads VALUE and prints how many
# milliseconds that took; returns 1 if it has not within MS.
wait_stat() {
    local t0; t0=$(now_ms)
    until [ "$(ctl_get stats "$1")" = "$2" ]; do
        [ $(($(now_ms) - t0)) -lt "$3" ] || return 1
        sleep 0.05
    done
    echo $(($(now_ms) - t0))
}

# idle_kill_fails WHAT PID: with the mirror active and the guest doing no I/O, SIGKILLs PID (a
# target's server) and requires nbd_mirror_failed=1 within 5 s, without a write to notice it.
idle_kill_fails() {
    local what=$1 ms
    sleep 1
    [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "$what: the mirror failed before its target did: $(ctl_get stats mirror.last_error)"
    stop_pid "$2" KILL
    ms=$(wait_stat nbd_mirror_failed 1 5000) || fail "$what: nbd_mirror_failed still 0 after 5 s without guest I/O"
    log "$what: nbd_mirror_failed=1 after $ms ms without guest I/O ($(ctl_get stats mirror.last_error))"
}

# median of the numbers given as arguments.
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# start_target IMAGE [nbd-proxy serve args...]: nbd-proxy serve on tcp:127.0.0.1:10809 exporting
# IMAGE as "disk"; sets TARGET_PID.
start_target() {
    local img=$1; shift
    nbd-proxy serve --listen tcp:127.0.0.1:10809 --export "disk=$img" "$@" > "$WORK/target.out" 2> "$WORK/target.log" &
    TARGET_PID=$!
    for _ in $(seq 100); do grep -q listening "$WORK/target.out" 2>/dev/null && return; sleep 0.1; done
    cat "$WORK/target.log"; fail "nbd-proxy serve did not start"
}

# socket_fds PID: how many of PID's fds are sockets (a socket closed by its peer and shut down
# here leaves the kernel's TCP tables, so /proc/net/tcp cannot show one still held open).
socket_fds() { ls -l "/proc/$1/fd" 2>/dev/null | grep -c 'socket:' || true; }

# wait_port PORT [LOG]: until something listens on 127.0.0.1:PORT; on failure shows the end of
# the server's LOG.
wait_port() {
    for _ in $(seq 100); do (exec 9<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done
    [ -n "${2:-}" ] && tail -n 5 "$2" >&2
    fail "nothing listens on port $1"
}

# mirror_to NAME [mirror-start args...]: hands a connection to 127.0.0.1:10809 to the daemon
# as NAME and starts mirroring to export "disk".
mirror_to() {
    local name=$1; shift
    nbd-proxy connect --to tcp:127.0.0.1:10809 --export disk --handoff "$CTL" --name "$name" > /dev/null \
        || fail "nbd-proxy connect failed"
    ctl mirror-start "$name" --export disk "$@" > /dev/null || fail "mirror-start failed"
    [ "$(ctl_get stats mirror.state)" = active ] || fail "mirror is not active"
}

# compare_legs LOCAL REMOTE: once the mirror is idle (and must not have failed), pauses the
# device, compares the two images into $WORK/cmp.out and unpauses. Sets MIRROR_OPS to the
# mirror's op count; returns blkcmp's status (0 identical).
compare_legs() {
    ctl wait-idle > /dev/null
    [ "$(ctl_get stats nbd_mirror_failed)" = 0 ] || fail "mirror failed: $(ctl_get stats mirror.last_error)"
    MIRROR_OPS=$(ctl_get stats mirror.ops)
    ctl pause > /dev/null
    local rc=0; blkcmp "$1" "$2" > "$WORK/cmp.out" || rc=$?
    ctl unpause > /dev/null
    return $rc
}

# fio_job NAME [more fio args...]: fio verify on $DEV, mixed sizes, QD32, flushes (the load
# the crash and upgrade scenarios keep running while the daemon is replaced).
fio_job() {
    local name=$1; shift
    fio --name="$name" --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=32 \
        --rw=randwrite --bsrange=4k-64k --size=256M --fsync=32 --verify=crc32c \
        --verify_backlog=128 --verify_fatal=1 "$@"
}

# stop_pid PID [SIGNAL]: ends a process that may already have exited (SIGTERM by default;
# KILL to crash a daemon on purpose).
stop_pid() { kill -"${2:-TERM}" "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# fill_scattered IMAGE MIB: a sparse IMAGE of MIB MiB with 30% of its MiB-sized slots filled with
# random data at random places, the rest holes.
fill_scattered() {
    rm -f "$1"; truncate -s "$2M" "$1"
    local slot
    for slot in $(shuf -i 0-$(($2 - 1)) -n $(($2 * 30 / 100))); do
        dd if=/dev/urandom of="$1" bs=1M seek="$slot" count=1 conv=notrunc status=none
    done
}

# start_tapdisk_like_target IMAGE SIZE_BYTES: a target like tapdisk's nbdserver<pid>.<minor> on
# 127.0.0.1:10809: nbdkit's oldstyle handshake (-o) and an export of IMAGE offering nothing but
# reads and writes (an eval plugin saying so; $3 is each request's count, $4 its offset,
# pwrite's data arrives on stdin). nbdkit advertises WRITE_ZEROES whatever the plugin says
# unless the nozero filter hides it (and 1.32's oldstyle mode answers it, FLUSH and FUA with
# EINVAL). Every request is logged to $WORK/target.log; sets NBDKIT_PID.
start_tapdisk_like_target() {
    local img=$1 size=$2
    nbdkit -f -o -i 127.0.0.1 -p 10809 --filter=log --filter=nozero eval \
        get_size="echo $size" \
        pread="dd if=$img iflag=skip_bytes,count_bytes skip=\$4 count=\$3 bs=64K status=none" \
        pwrite="dd of=$img oflag=seek_bytes seek=\$4 iflag=count_bytes,fullblock count=\$3 bs=64K conv=notrunc status=none" \
        can_write='exit 0' can_flush='exit 3' can_trim='exit 3' can_zero='exit 3' \
        can_fua='echo none' can_multi_conn='exit 3' \
        logfile="$WORK/target.log" 2> "$WORK/nbdkit.stderr" &
    NBDKIT_PID=$!
    wait_port 10809 "$WORK/nbdkit.stderr"
}

# sent_unoffered: how many commands in $WORK/target.log a reads-and-writes export did not
# offer (FLUSH, TRIM, WRITE_ZEROES, CACHE, or the FUA flag); prints the first few to stderr.
sent_unoffered() {
    local re=" (Flush|Trim|Zero|Cache) id=| fua=1"
    grep -E "$re" "$WORK/target.log" | head -n 5 >&2 || true
    grep -cE "$re" "$WORK/target.log" || true
}

# make_tls_files DIR NAME...: a fresh test CA and a server certificate for the NAMEs (DNS names
# or IPv4 addresses, the first also its CN) in DIR: ca-cert.pem, server-cert.pem, server-key.pem
# (the names qemu's tls-creds-x509 dir= expects). openssl gets a config file of its own, so
# nothing of the machine's openssl.cnf is needed (the guest has none).
make_tls_files() {
    local dir=$1 n san=""; shift
    mkdir -p "$dir"
    printf '[req]\ndistinguished_name = dn\n[dn]\n' > "$dir/openssl.cnf"
    for n in "$@"; do
        if [[ $n =~ ^[0-9.]+$ ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
    done
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n' \
        "${san%,}" > "$dir/server.ext"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    (
        cd "$dir" && export OPENSSL_CONF=$PWD/openssl.cnf
        openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=test-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign &&
        openssl req "${ec[@]}" -keyout server-key.pem -out server.csr -subj "/CN=$1" &&
        openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out server-cert.pem -days 2 -extfile server.ext &&
        chmod 600 ca-key.pem server-key.pem
    ) > "$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; fail "openssl could not make the test certificates"; }
}
