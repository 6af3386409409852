#!/usr/bin/env bash
# Fetches Debian bookworm-backports' 6.12 kernel (vmlinuz + modules) into the cache, once.
#
# The Debian mirror is taken from this machine's own apt sources; the backports suite is added
# in a private apt configuration under the cache, so the host's apt setup is never touched.
# Prints the directory holding vmlinuz and lib/modules/<version>/.
#
# KERNEL_PKG=linux-image-6.12.X+deb12-amd64 pins a version; the newest 6.12 is used otherwise.
set -euo pipefail
cache=${VM_CACHE:?VM_CACHE must be set}
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"

mirror_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo "kernel.sh: no Debian mirror found in /etc/apt/sources.list.d/*.sources or sources.list" >&2
    return 1
}

apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
          -o "Dir::Cache::archives=$apt_dir/archives" -o "APT::Get::List-Cleanup=0")

pkg=${KERNEL_PKG:-}
if [ -z "$pkg" ] && [ -f "$cache/kernel.pkg" ]; then
    pkg=$(cat "$cache/kernel.pkg")
fi
if [ -z "$pkg" ]; then
    echo "deb $(mirror_uri) bookworm-backports main" > "$apt_dir/sources.list"
    apt-get "${apt_opts[@]}" -q update >&2
    pkg=$(apt-cache "${apt_opts[@]}" search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' \
          | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "kernel.sh: no linux-image-6.12.*+deb12-amd64 in bookworm-backports" >&2; exit 1; }
    echo "$pkg" > "$cache/kernel.pkg"
fi

dest=$cache/$pkg
if [ ! -f "$dest/.complete" ]; then
    [ -f "$apt_dir/sources.list" ] || echo "deb $(mirror_uri) bookworm-backports main" > "$apt_dir/sources.list"
    [ -n "$(ls "$apt_dir/lists" 2>/dev/null | grep -v partial)" ] || apt-get "${apt_opts[@]}" -q update >&2
    rm -rf "$dest" && mkdir -p "$dest"
    (cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" -q download "$pkg" >&2)
    deb=$(ls "$apt_dir"/archives/"${pkg}"_*.deb | head -n 1)
    dpkg-deb -x "$deb" "$dest/root"
    cp "$dest"/root/boot/vmlinuz-* "$dest/vmlinuz"
    touch "$dest/.complete"
fi
echo "$dest"
