# Sourced by scripts/setup-host and tests/vm/kernel.sh: a private apt configuration that sees
# this machine's own Debian sources plus bookworm-backports (where the 6.12 guest kernel, and on
# today's image the installed qemu-utils, come from). It keeps its lists and downloads under
# $APT_PRIVATE_DIR, so the host's apt setup (sources, lists, preferences) is never changed.
#
# After sourcing: apt_private_init (writes the sources, runs `apt-get update` once),
# then "${apt_opts[@]}" for apt-get / apt-cache. APT_STATUS=FILE reads that dpkg status file
# instead of the machine's (the package-plan test uses recorded states).

: "${APT_PRIVATE_DIR:?APT_PRIVATE_DIR must be set}"
# apt reads relative Dir:: paths below /etc/apt: make it absolute.
mkdir -p "$APT_PRIVATE_DIR" && APT_PRIVATE_DIR=$(cd "$APT_PRIVATE_DIR" && pwd)

# The Debian mirror this machine's apt uses (the backports line must come from the same one).
apt_mirror_uri() {
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
    echo "apt-private: no Debian mirror found in /etc/apt/sources.list.d/*.sources or sources.list" >&2
    return 1
}

apt_opts=(-o "Dir::Etc::sourcelist=$APT_PRIVATE_DIR/sources.list"
          -o "Dir::Etc::sourceparts=$APT_PRIVATE_DIR/sources.list.d"
          -o "Dir::State::Lists=$APT_PRIVATE_DIR/lists" -o "Dir::Cache=$APT_PRIVATE_DIR/cache"
          -o "Dir::Cache::archives=$APT_PRIVATE_DIR/archives" -o "APT::Get::List-Cleanup=0")
if [ -n "${APT_STATUS:-}" ]; then apt_opts+=(-o "Dir::State::status=$APT_STATUS"); fi

# Writes the private sources (the host's enabled sources, then bookworm-backports) and runs
# `apt-get update` when the lists are missing, older than a day, or the sources changed.
apt_private_init() {
    local d=$APT_PRIVATE_DIR f sum
    mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/cache" "$d/sources.list.d"
    rm -f "$d/sources.list.d"/*
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && cp "$f" "$d/sources.list.d/host-$(basename "$f")"
    done
    echo "deb $(apt_mirror_uri) bookworm-backports main" > "$d/sources.list"
    sum=$(cat "$d/sources.list" "$d/sources.list.d"/* | sha256sum)
    if [ "$sum" != "$(cat "$d/sources.sum" 2>/dev/null)" ] || \
       [ -z "$(find "$d/lists" -maxdepth 1 -name '*backports*Packages*' -mtime -1 2>/dev/null)" ]; then
        apt-get "${apt_opts[@]}" -q update >&2
        echo "$sum" > "$d/sources.sum"
    fi
}
