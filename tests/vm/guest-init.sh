#!/bin/bash
# PID 1 of the test VM: mount, load modules, run the scenarios named on the kernel command line
# (um.scenarios=a,b um.timeout=SECS), report each with a marker line the host parses, power off.
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=90% tmp /tmp
mount -t tmpfs run /run
mkdir -p /var/lock /dev/pts && mount -t devpts devpts /dev/pts
ln -s /proc/self/fd /dev/fd
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
for m in $(cat /modules.load); do
    insmod "/lib/modules/$m.ko" || echo "@@WARN insmod $m failed"
done

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
scenarios=$(arg um.scenarios | tr ',' ' ')
per_timeout=$(arg um.timeout); per_timeout=${per_timeout:-300}
# um.env.NAME=VALUE on the command line: exported to the scenarios (tests/vm/run's VM_ENV).
for kv in $(tr ' ' '\n' < /proc/cmdline | sed -n 's/^um\.env\.//p'); do export "${kv%%=*}=${kv#*=}"; done
echo "@@KERNEL $(uname -r) cpus=$(nproc) mem_kb=$(awk '/MemTotal/{print $2}' /proc/meminfo)"

devices() { ls /dev/ublkb* /dev/ublkc* 2>/dev/null | tr '\n' ' '; }
daemons() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/local/bin/ublk-mirror ] && echo -n "${p#/proc/} "
    done
}
for s in $scenarios; do
    echo "@@BEGIN $s"
    start=$(date +%s)
    if [ ! -f "/scenarios/$s.sh" ]; then
        echo "no such scenario: $s"; rc=127
    else
        mkdir -p "/tmp/$s"
        (cd "/tmp/$s" && SCENARIO=$s WORK=/tmp/$s exec timeout -k 10 "$per_timeout" bash /scenarios/$s.sh) 2>&1
        rc=$?
        [ $rc -eq 124 ] && echo "scenario timed out after ${per_timeout}s"
    fi
    # Nothing may outlive a scenario: daemons and devices left behind are failures.
    left_pids=$(daemons)
    if [ -n "$left_pids" ]; then
        echo "scenario left ublk-mirror daemons running: $left_pids"
        [ $rc -eq 0 ] && rc=1
        kill -TERM $left_pids 2>/dev/null
        for _ in $(seq 20); do [ -z "$(daemons)" ] && break; sleep 0.5; done
        [ -n "$(daemons)" ] && kill -KILL $(daemons) 2>/dev/null
    fi
    left=$(devices)
    if [ -n "$left" ]; then
        echo "scenario left ublk devices behind: $left"
        [ $rc -eq 0 ] && rc=1
        for c in /dev/ublkc*; do
            [ -e "$c" ] && timeout 30 ublk-mirror delete --force --dev-id "${c#/dev/ublkc}" >/dev/null 2>&1
        done
    fi
    rm -rf "/tmp/$s"
    if [ $rc -eq 0 ]; then r=PASS; else r=FAIL; fi
    echo "@@RESULT $s $r $(( $(date +%s) - start ))s rc=$rc"
done
echo "@@ALLDONE"
sync
poweroff -f
