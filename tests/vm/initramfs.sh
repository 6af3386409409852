#!/usr/bin/env bash
# Builds the guest's initramfs: busybox, the tools in guest-tools.txt with their libraries,
# the modules in guest-modules.txt (decompressed, dependencies first), the project's release
# binaries, the scenarios, and init.
#
#   initramfs.sh KERNEL_DIR OUTPUT.cpio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kdir=$1 out=$2
kver=$(ls "$kdir/root/lib/modules")
root=$(mktemp -d)
# The guest's / (mktemp makes it 0700): other users must reach their libraries too.
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,proc,sys,dev,tmp,run,var/lock,etc,root,scenarios}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Copy an ELF (or any file) to the same path in the guest, or to DEST, and for ELFs every
# library ldd names, keeping their paths.
add_file() {
    local f=$1 dest=${2:-$1}
    [ -e "$root$dest" ] && return
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$f" "$root$dest"
    if file_is_elf "$f"; then
        ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
            [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
        done
    fi
}
file_is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

while read -r line; do
    line=${line%%#*}; line=$(echo "$line" | xargs)
    [ -n "$line" ] || continue
    if [[ $line == tree\ * ]]; then
        dir=${line#tree }
        [ -d "$dir" ] || { echo "initramfs.sh: guest tree $dir missing on the host (install its package)" >&2; exit 1; }
        while IFS= read -r -d '' f; do add_file "$f"; done < <(find "$dir" -type f -print0)
        continue
    fi
    path=$line
    [[ $path == /* ]] || path=$(command -v "$line" || true)
    [ -n "$path" ] && [ -e "$path" ] || { echo "initramfs.sh: guest tool '$line' not found on the host (run scripts/setup-host, which installs it)" >&2; exit 1; }
    add_file "$path"
    # Real tools win over busybox applets of the same name.
    name=$(basename "$path")
    for d in bin sbin usr/bin usr/sbin; do
        [ -L "$root/$d/$name" ] && rm -f "$root/$d/$name"
    done
    [ -e "$root/bin/$name" ] || ln -s "$path" "$root/bin/$name"
done < "$here/guest-tools.txt"
ln -sf "$(command -v bash)" "$root/bin/sh"
# Tools a caller adds for one run (bench/run adds rublk), into /usr/local/bin.
for f in ${GUEST_EXTRA_TOOLS:-}; do
    [ -x "$f" ] || { echo "initramfs.sh: GUEST_EXTRA_TOOLS: $f is not an executable" >&2; exit 1; }
    add_file "$f" "/usr/local/bin/$(basename "$f")"
done

# Modules: dependencies first, each once, decompressed for busybox insmod.
mods=$kdir/root/lib/modules/$kver
: > "$root/modules.load"
declare -A seen=()
add_module() {
    local name=${1//-/_} ko deps d
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    if grep -q "/${name//_/[_-]}.ko" "$mods/modules.builtin" 2>/dev/null; then return; fi
    # A module's file may spell its name with - or _, even both (chacha-x86_64.ko.xz).
    ko=$(find "$mods/kernel" -regex ".*/${name//_/[_-]}\.ko\.xz" | head -n 1)
    [ -n "$ko" ] || { echo "initramfs.sh: module $name not in $kver" >&2; exit 1; }
    deps=$(modinfo -F depends "$ko")
    for d in ${deps//,/ }; do add_module "$d"; done
    mkdir -p "$root/lib/modules"
    xz -dc "$ko" > "$root/lib/modules/$name.ko"
    echo "$name" >> "$root/modules.load"
}
while read -r m; do
    m=${m%%#*}; m=$(echo "$m" | xargs)
    [ -n "$m" ] && add_module "$m"
done < "$here/guest-modules.txt"

# The project's binaries (release build) in /usr/local/bin: never under their host path, which
# may be below /tmp, where the guest mounts a tmpfs.
[ -x "$repo/target/release/ublk-mirror" ] || { echo "initramfs.sh: build first: cargo build --release" >&2; exit 1; }
for b in ublk-mirror nbd-proxy ublk-mirror-ctl ublk-tap-ctl blkcmp xapi-sim; do
    [ -x "$repo/target/release/$b" ] && add_file "$repo/target/release/$b" "/usr/local/bin/$b"
done
cp "$here"/scenarios/*.sh "$root/scenarios/"
cp "$repo/README.md" "$root/scenarios/README.md"   # the quickstart scenario runs its block
cp "$here/guest-init.sh" "$root/init"
chmod +x "$root/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) > "$out"
