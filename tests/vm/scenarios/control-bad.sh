#!/bin/bash
# Control plane: bad requests (garbage, a huge line, an unknown command, an fd on the wrong
# command or of the wrong kind, a wrong peer uid) get error replies while fio keeps running.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
img=$WORK/disk.img
make_image "$img" 512M
start_daemon "$img"
fio --name=load --filename="$DEV" --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
    --bs=4k --size=512M --time_based --runtime=600 --verify=crc32c --verify_backlog=128 \
    --verify_fatal=1 > "$WORK/fio.out" 2>&1 &
fio_pid=$!
sleep 2
expect_error() { # CODE ARGS...: a ublk-mirror-ctl call that must fail with CODE
    local want=$1; shift
    local out; out=$("$@" 2>&1) && fail "$* succeeded: $out"
    echo "$out" | grep -q "$want" || fail "$* did not fail with $want: $out"
    log "refused as expected ($want): $*"
}
raw() { ctl raw "$1"; }
raw 'this is not json' | grep -q '"code":"bad-request"' || fail "garbage not answered with bad-request"
raw '{"v":1,"id":5,"cmd":"frobnicate"}' | grep -q '"code":"unknown-command"' || fail "unknown command"
raw '{"v":9,"id":6,"cmd":"stats"}' | grep -q '"code":"bad-version"' || fail "bad version"
huge=$(head -c 100000 /dev/zero | tr '\0' a)
raw "$huge" | grep -q 'line longer than' || fail "huge line not refused"
expect_error bad-fd ctl pass-fd notasocket --fd 5 5</etc/passwd
expect_error no-such-fd ctl close-fd nothing
expect_error no-such-fd ctl unpause --mirror nothing
# A real stream socket is accepted, listed, replaced and closed.
# The image exists before the server starts (it opens it at once), and the server is up before
# the connection: start_target waits for its "listening" line instead of guessing a time.
make_image "$WORK/sock.img" 1M
start_target "$WORK/sock.img"; np=$TARGET_PID
exec 5<>/dev/tcp/127.0.0.1/10809
ctl pass-fd target --fd 5 > /dev/null || fail "pass-fd of a TCP socket failed"
out=$(ctl --json pass-fd target --fd 5); [[ $out == *'"replaced": true'* ]] || fail "second pass-fd did not replace: $out"
out=$(ctl list-fds); [[ $out == *inet* ]] || fail "list-fds does not show the socket: $out"
ctl close-fd target > /dev/null || fail "close-fd failed"
exec 5>&-
stop_pid $np
# Another uid cannot even reach the socket.
expect_error "ublk-mirror-ctl: error" setpriv --reuid=1000 --regid=1000 --clear-groups ublk-mirror-ctl --socket "$CTL" stats
# Through all of it the device kept serving.
w1=$(ctl_get stats ops.write.count); sleep 1; w2=$(ctl_get stats ops.write.count)
[ "$w2" -gt "$w1" ] || fail "the device stopped serving writes"
kill -INT $fio_pid 2>/dev/null || true; wait $fio_pid || true
grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out"; fail "fio saw errors"; }
stop_daemon
