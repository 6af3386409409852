#!/usr/bin/env bash
# Fetches Debian bookworm-backports' 6.12 kernel (vmlinuz + modules) into the cache, once.
#
# apt sees bookworm-backports through the private configuration of scripts/apt-private.sh (under
# the cache, shared with scripts/setup-host), so the host's apt setup is never touched.
# Prints the directory holding vmlinuz and lib/modules/<version>/.
#
# KERNEL_PKG=linux-image-6.12.X+deb12-amd64 pins a version; the newest 6.12 is used otherwise.
set -euo pipefail
cache=${VM_CACHE:?VM_CACHE must be set}
export APT_PRIVATE_DIR=$cache/apt
# shellcheck source=scripts/apt-private.sh
. "$(dirname "$0")/../../scripts/apt-private.sh"

pkg=${KERNEL_PKG:-}
if [ -z "$pkg" ] && [ -f "$cache/kernel.pkg" ]; then
    pkg=$(cat "$cache/kernel.pkg")
fi
if [ -z "$pkg" ]; then
    apt_private_init
    pkg=$(apt-cache "${apt_opts[@]}" search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' \
          | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$pkg" ] || { echo "kernel.sh: no linux-image-6.12.*+deb12-amd64 in bookworm-backports" >&2; exit 1; }
    echo "$pkg" > "$cache/kernel.pkg"
fi

dest=$cache/$pkg
if [ ! -f "$dest/.complete" ]; then
    apt_private_init
    rm -rf "$dest" && mkdir -p "$dest"
    (cd "$APT_PRIVATE_DIR/archives" && apt-get "${apt_opts[@]}" -q download "$pkg" >&2)
    deb=$(ls "$APT_PRIVATE_DIR"/archives/"${pkg}"_*.deb | head -n 1)
    dpkg-deb -x "$deb" "$dest/root"
    cp "$dest"/root/boot/vmlinuz-* "$dest/vmlinuz"
    touch "$dest/.complete"
fi
echo "$dest"
