#!/usr/bin/env bash
# Build (once) the Docker image of containers/Dockerfile with podman, and print its tag.
#
# No image can be pulled here, so the debootstrap tree of containers/imagebuild/base.sh stands in for
# `FROM debian:bookworm-slim@sha256:...`: it becomes localhost/hpcdask-rootfs:KEY (FROM scratch, the
# tree ADDed, created at the tree's own time, so every podman storage gets the same base image ID,
# as every pull of a digest does) and is given to the unchanged Dockerfile as --build-arg BASE_IMAGE. What the build needs from this host
# comes in through build-time volumes, never through the recipe:
#   - the host's CA bundle at /run/host-ca.crt, named by --build-arg PIP_CERT (install.sh and pip
#     read it); not at /etc/ssl/certs/ca-certificates.crt, which the ca-certificates package writes;
#   - the local package indexes the lock names (--extra-index-url file://..., --find-links), read-only.
# The image is tagged localhost/hpcdask:KEY, KEY hashing the base, the recipe (Dockerfile,
# install.sh), the lock, hpcdask's sources and this script, so a second run builds nothing.
# It is also tagged localhost/hpcdask:latest, the default of docker-compose.yml.
#
# Usage: tests/compose/podman.sh [build]       prints localhost/hpcdask:KEY on stdout
#        tests/compose/podman.sh key           prints the tag it would build, building nothing
# Environment: CONTAINERS_CONF (default: tests/compose/containers.conf), HPCDASK_TEST_CACHE.
# Timings and size go to stderr and to $cache/podman-KEY.json.
set -euo pipefail

say() { echo "podman.sh: $*" >&2; }
elapsed() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${HPCDASK_TEST_CACHE:-/var/cache/hpcdask-test}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
lock=$repo/containers/requirements.lock
cmd=${1:-build}

case $cmd in build | key) ;; *) say "unknown command '$cmd'; usage: $0 [build|key]"; exit 2 ;; esac
command -v podman >/dev/null || { say "podman is missing: apt-get install podman (make host-deps)"; exit 1; }
if grep -qE '^runtime *= *"runc"' "$CONTAINERS_CONF" 2>/dev/null && ! command -v runc >/dev/null; then
    say "$CONTAINERS_CONF asks for runc, which is missing: apt-get install runc"
    exit 1
fi

base=$(bash "$repo/containers/imagebuild/base.sh" "$cache")
base_tag=localhost/hpcdask-rootfs:${base##*/base-}

# Reproducible (as make sif): the inputs' last commit is the image's time; --timestamp sets every
# file's and the image's created time to it, so two builds of one commit give one image ID.
epoch=${SOURCE_DATE_EPOCH:-$(PYTHONPATH="$repo/containers" python3 -m imagebuild.image epoch)}

# Everything the image is made of, by path and content, and its time.
key=$(
    cd "$repo"
    { echo "$base_tag $epoch"
      find .dockerignore containers/Dockerfile containers/install.sh containers/requirements.lock containers/debian.lock pyproject.toml \
          src tests/compose/podman.sh -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
          2>/dev/null | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -c1-16
)
tag=localhost/hpcdask:$key
if [ "$cmd" = key ]; then
    echo "$tag"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/podman.lock"
flock 9

if podman image exists "$tag"; then
    say "reusing $tag"
    podman tag "$tag" localhost/hpcdask:latest
    echo "$tag"
    exit 0
fi

import_s=0
if ! podman image exists "$base_tag"; then
    say "importing $base as $base_tag"
    t0=$(date +%s.%N)
    # `podman import` would stamp the base with the time of the import, which the image built on it
    # inherits (its history): a build FROM scratch at the tree's time (base.sh's marker) does not.
    ctx=$(mktemp -d "$cache/.podman-rootfs.XXXXXX")
    trap 'rm -rf "$ctx"' EXIT
    tar --numeric-owner -C "$base" -cf "$ctx/rootfs.tar" .
    # The image config of debian:bookworm-slim: its PATH and CMD.
    printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'CMD ["bash"]' \
        >"$ctx/Containerfile"
    podman build --pull=never --layers=false --format oci --timestamp "$(stat -c %Y "$base.done")" \
        -t "$base_tag" "$ctx" >&2
    rm -rf "$ctx"
    trap - EXIT
    import_s=$(elapsed "$t0")
    say "imported the base in ${import_s} s"
fi

build_args=(--build-arg "BASE_IMAGE=$base_tag"
            --build-arg "LOCK_SHA256=$(sha256sum "$lock" | cut -d' ' -f1)"
            --build-arg "SOURCE_DATE_EPOCH=$epoch" --timestamp "$epoch")
volumes=()
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -r "$ca" ]; then
    volumes+=(--volume "$ca:/run/host-ca.crt:ro")
    build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
# Local indexes of the lock; a .../simple index links to ../files, so its parent goes in whole.
while read -r dir; do
    case $dir in */simple | */simple/) dir=$(dirname "$dir") ;; esac
    [ -d "$dir" ] && volumes+=(--volume "$dir:$dir:ro")
done < <(grep -oE '^[[:space:]]*--(extra-index-url|index-url|find-links)[ =](file://)?/[^[:space:]]+' "$lock" \
             | sed -E 's/^[[:space:]]*--[a-z-]+[ =](file:\/\/)?//' | sort -u)

say "podman build -f containers/Dockerfile -t $tag (${#volumes[@]} build-time volume args)"
t0=$(date +%s.%N)
# No layer cache: the one RUN follows COPY src, so a cached layer would never be reused.
# OCI format: Docker's image format records the build container's random ID and host name in
# the image config, so two builds of one commit could never share an image ID.
# The host's network (what the RUN step reaches: the Debian mirror, the package indexes): no CNI
# bridge, veth or IP forwarding set up on the host for the build, which runs a second time in the
# background while other tests read the host's network state (the Docker Engine's test).
(cd "$repo" && podman build --pull=never --layers=false --format oci --network host -f containers/Dockerfile \
    "${build_args[@]}" "${volumes[@]}" -t "$tag" -t localhost/hpcdask:latest .) >&2
build_s=$(elapsed "$t0")
size=$(podman image inspect --format '{{.Size}}' "$tag")
say "built $tag in ${build_s} s, $((size / 1024 / 1024)) MiB"
# Earlier builds of this script (localhost/hpcdask:KEY) are superseded; one in use stays.
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/hpcdask); do
    t=${old##*:}
    if [[ $t =~ ^[0-9a-f]{16}$ && $t != "$key" ]]; then
        if podman rmi "$old" >/dev/null 2>&1; then say "removed $old"; rm -f "$cache/podman-$t.json"; fi
    fi
done
printf '{"tag": "%s", "base": "%s", "base_import_s": %s, "build_s": %s, "size_bytes": %s}\n' \
    "$tag" "$base_tag" "$import_s" "$build_s" "$size" >"$cache/podman-$key.json"
echo "$tag"
