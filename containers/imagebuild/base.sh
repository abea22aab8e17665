#!/usr/bin/env bash
# Build (once) the Debian bookworm root filesystem the test image starts from, and print its path.
#
# It stands in for `From: debian:bookworm-slim` of containers/dask.def, since no image can be pulled
# here: `debootstrap --variant=minbase bookworm` with the host's own Debian mirror, the host's apt
# sources copied in (as bookworm-slim ships /etc/apt/sources.list.d/debian.sources).
# The tree lives outside the repository, keyed by the hash of this script and of the host's apt
# sources, and is reused when present.
#
# Usage: tests/cluster/base.sh [CACHE_DIR]      (default: $HPCDASK_TEST_CACHE or /var/cache/hpcdask-test)
# Needs root and debootstrap. Progress goes to stderr, the path alone to stdout.
set -euo pipefail

say() { echo "base.sh: $*" >&2; }

cache=${1:-${HPCDASK_TEST_CACHE:-/var/cache/hpcdask-test}}
suite=bookworm

command -v debootstrap >/dev/null || { say "debootstrap is missing: apt-get install debootstrap"; exit 1; }
[ "$(id -u)" -eq 0 ] || { say "debootstrap needs root"; exit 1; }

# The host's enabled apt sources: deb822 *.sources and one-line *.list files.
shopt -s nullglob
sources=()
[ -s /etc/apt/sources.list ] && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do sources+=("$f"); done
shopt -u nullglob

# The first Debian archive URI the host uses (not the security one).
mirror=$(
    { [ ${#sources[@]} -gt 0 ] && cat "${sources[@]}"; } \
        | grep -oE '(https?|file)://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true
)
mirror=${mirror:-http://deb.debian.org/debian}

key=$( { cat "$0"; [ ${#sources[@]} -gt 0 ] && cat "${sources[@]}"; echo "$mirror"; } | sha256sum | cut -c1-16)
dest=$cache/base-$key

# The marker sits beside the tree, so the tree itself is exactly what debootstrap made.
if [ -e "$dest.done" ] && [ -d "$dest" ]; then
    say "reusing $dest"
    echo "$dest"
    exit 0
fi

mkdir -p "$cache"
# One build at a time (the test image, podman's and Docker's bases may be asked for at once).
exec 8>"$cache/.base.lock"
flock 8
if [ -e "$dest.done" ] && [ -d "$dest" ]; then
    say "reusing $dest (built meanwhile)"
    echo "$dest"
    exit 0
fi
tmp=$(mktemp -d "$cache/.base-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "debootstrap --variant=minbase $suite from $mirror into $tmp"
start=$(date +%s)
debootstrap --variant=minbase "$suite" "$tmp/rootfs" "$mirror" >&2

say "copying the host's apt sources: ${sources[*]:-none}"
rm -f "$tmp/rootfs/etc/apt/sources.list"
for f in "${sources[@]}"; do
    case $f in
        /etc/apt/sources.list) cp "$f" "$tmp/rootfs/etc/apt/sources.list" ;;
        *) cp "$f" "$tmp/rootfs/etc/apt/sources.list.d/" ;;
    esac
done
# Keep only sources whose signing keys the new system has (third-party repos of the host need theirs).
for f in "$tmp"/rootfs/etc/apt/sources.list.d/*; do
    [ -e "$f" ] || continue
    while read -r k; do
        if [ ! -e "$tmp/rootfs$k" ]; then
            say "dropping $(basename "$f"): its key $k is not in the base"
            rm -f "$f"
            break
        fi
    done < <(grep -ohE '(Signed-By:|signed-by=) *[^] ]+' "$f" | sed -E 's/^(Signed-By:|signed-by=) *//')
done

# Like the bookworm-slim image: no recommends, no docs, an empty apt cache.
cat >"$tmp/rootfs/etc/apt/apt.conf.d/90hpcdask-test" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*
rm -rf "$dest"
mv "$tmp/rootfs" "$dest"
printf '%s\n' "suite=$suite" "mirror=$mirror" "seconds=$(($(date +%s) - start))" >"$dest.done"
say "built $dest in $(($(date +%s) - start)) s"
echo "$dest"
