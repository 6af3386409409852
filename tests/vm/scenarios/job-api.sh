#!/bin/bash
# The job API: a background copy steered while it runs, and events instead of polling.
# - `ublk-mirror-ctl watch` (started before the mirror) sees mirror-active, copy-progress,
#   copy-ready and, when the target is killed, mirror-failed, in that order, numbered;
# - mirror-set-speed: the measured copy rate follows the limit within 20% (2 MiB/s, then
#   6 MiB/s), measured over 5 s windows from stats;
# - mirror-copy-pause holds the copy (bytes_done still) while guest writes go on, and
#   mirror-copy-resume lets it finish;
# - --target-is-zero: a fresh (zero) target gets no WRITE_ZEROES for the holes (nbdkit's log),
#   and still reads back equal to the source.
. /scenarios/lib.sh 2>/dev/null || . "$(dirname "$0")/lib.sh"
local_img=$WORK/local.img remote=$WORK/remote.img
fill_scattered "$local_img" 96
make_image "$remote" 96M
nbdkit -f -i 127.0.0.1 -p 10809 --filter=log file "$remote" logfile="$WORK/target.log" \
    2> "$WORK/nbdkit.stderr" &
nbdkit_pid=$!
wait_port 10809 "$WORK/nbdkit.stderr"
start_daemon "$local_img" --queues 2

ublk-mirror-ctl --socket "$CTL" watch > "$WORK/watch.out" 2>&1 &
watch_pid=$!
for _ in $(seq 50); do grep -q snapshot "$WORK/watch.out" && break; sleep 0.1; done
grep -q "^0 snapshot state=running mirror=off" "$WORK/watch.out" || fail "no snapshot: $(cat "$WORK/watch.out")"
# The guest keeps writing (in the first 16 MiB) through all of it.
fio --name=guest --filename="$DEV" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --iodepth=4 --size=16M --time_based --runtime=600 --rate_iops=200 > "$WORK/fio.out" 2>&1 &
fio_pid=$!

# done_at: bytes_done of the copy now.
done_at() { ctl_get stats mirror.copy.bytes_done; }
# rate_over SECONDS: the copy's bytes per second over that window.
rate_over() {
    local b0 t0 b1 t1
    b0=$(done_at); t0=$(now_ms); sleep "$1"; b1=$(done_at); t1=$(now_ms)
    echo $(( (b1 - b0) * 1000 / (t1 - t0) ))
}
within_20pct() { local got=$1 want=$2; [ $((got * 100)) -ge $((want * 80)) ] && [ $((got * 100)) -le $((want * 120)) ]; }

nbd-proxy connect --to tcp:127.0.0.1:10809 --handoff "$CTL" --name t > /dev/null || fail "connect"
ctl mirror-start t --copy --speed 2MiB --target-is-zero > /dev/null || fail "mirror-start --copy"
sleep 1
r1=$(rate_over 5)
within_20pct "$r1" $((2 << 20)) || fail "at --speed 2MiB the copy ran at $r1 B/s"
ctl mirror-set-speed 6MiB > /dev/null || fail "mirror-set-speed"
sleep 1
r2=$(rate_over 5)
within_20pct "$r2" $((6 << 20)) || fail "after mirror-set-speed 6MiB the copy ran at $r2 B/s"
log "copy rate: $r1 B/s at 2 MiB/s, $r2 B/s at 6 MiB/s"

ctl mirror-copy-pause > /dev/null || fail "mirror-copy-pause"
[ "$(ctl_get stats mirror.copy.paused)" = true ] || fail "copy not shown paused"
sleep 0.5
b0=$(done_at) w0=$(ctl_get stats ops.write.count)
sleep 2
b1=$(done_at) w1=$(ctl_get stats ops.write.count)
[ "$b1" = "$b0" ] || fail "a paused copy moved from $b0 to $b1"
[ "$w1" -gt "$w0" ] || fail "guest writes stopped while the copy was paused"
[ "$(ctl_get stats mirror.copy.state)" = copying ] || fail "state $(ctl_get stats mirror.copy.state)"
log "paused: copy held at $b0 bytes while the guest wrote $((w1 - w0)) times"
ctl mirror-copy-resume > /dev/null || fail "mirror-copy-resume"
ctl mirror-set-speed 0 > /dev/null
ctl mirror-wait-ready --timeout 300 > /dev/null || fail "the copy did not get ready"

kill -INT $fio_pid 2>/dev/null || true; wait $fio_pid || true
rc=0; compare_legs "$local_img" "$remote" || rc=$?
[ $rc = 0 ] || { cat "$WORK/cmp.out"; fail "remote differs from local"; }
zeroes=$(grep -c " Zero id=" "$WORK/target.log" || true)
[ "$zeroes" = 0 ] || fail "--target-is-zero: $zeroes WRITE_ZEROES sent to a zero target"
log "target-is-zero: no WRITE_ZEROES, remote == local"

stop_pid $nbdkit_pid KILL
dd if=/dev/urandom of="$DEV" bs=64k count=2 seek=4 oflag=direct status=none
for _ in $(seq 100); do grep -q mirror-failed "$WORK/watch.out" && break; sleep 0.2; done
kill $watch_pid 2>/dev/null || true; wait $watch_pid 2>/dev/null || true
order=$(grep -oE "^[0-9]+ (snapshot|mirror-active|copy-progress|copy-ready|mirror-failed)" "$WORK/watch.out" \
    | awk '{print $2}' | awk '!seen[$0]++' | tr '\n' ' ')
log "watch saw, first of each: $order"
[ "$order" = "snapshot mirror-active copy-progress copy-ready mirror-failed " ] \
    || { cat "$WORK/watch.out"; fail "watch order: $order"; }
seqs=$(awk '{print $1}' "$WORK/watch.out" | tr '\n' ' ')
[ "$seqs" = "$(seq 0 $(($(wc -l < "$WORK/watch.out") - 1)) | tr '\n' ' ')" ] || fail "sequence numbers: $seqs"
grep mirror-failed "$WORK/watch.out" | grep -q reason= || fail "mirror-failed without a reason"
ctl mirror-stop > /dev/null
stop_daemon
