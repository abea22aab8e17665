#!/usr/bin/env bash
# Build (once) the Docker image of containers/Dockerfile with `make docker` on the Docker Engine
# that DOCKER_HOST names (the tests' private dockerd, tests/testcluster/dockerd.py), and print its tag.
#
# As tests/compose/podman.sh: no image can be pulled here, so the debootstrap tree of
# containers/imagebuild/base.sh is `docker import`ed as hpcdask-base:KEY and given to the unchanged
# Dockerfile as --build-arg BASE_IMAGE; the build's one RUN reaches Debian and PyPI through the
# host's network (--network host: the engine's bridge has no NAT); the host's CA bundle is bound
# at /dev/hpcdask-host-ca.crt by the engine's runtime (tests/testcluster/dockerd.py) and named by --build-arg
# PIP_CERT, so no layer holds it. The image is tagged hpcdask:KEY and hpcdask:latest (the default
# of docker-compose.yml); KEY hashes the base, the recipe, the lock, hpcdask's sources and this
# script, so a second run builds nothing.
#
# Usage: tests/compose/docker.sh [build]    prints hpcdask:KEY on stdout; timings on stderr and
#                                           in $HPCDASK_TEST_CACHE/docker-KEY.json
set -euo pipefail

say() { echo "docker.sh: $*" >&2; }
elapsed() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${HPCDASK_TEST_CACHE:-/var/cache/hpcdask-test}
lock=$repo/containers/requirements.lock
[ "${1:-build}" = build ] || { say "usage: $0 [build]"; exit 2; }
docker info >/dev/null 2>&1 || { say "no Docker engine answers at ${DOCKER_HOST:-the default socket}"; exit 1; }

base=$(bash "$repo/containers/imagebuild/base.sh" "$cache")
base_tag=hpcdask-base:${base##*/base-}
# The image's time, as make docker gives it (reproducible builds: SOURCE_DATE_EPOCH).
epoch=${SOURCE_DATE_EPOCH:-$(PYTHONPATH="$repo/containers" python3 -m imagebuild.image epoch)}
key=$(
    cd "$repo"
    { echo "$base_tag $epoch"
      find .dockerignore containers/Dockerfile containers/install.sh containers/requirements.lock containers/debian.lock pyproject.toml \
          src tests/compose/docker.sh Makefile -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
          2>/dev/null | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -c1-16
)
tag=hpcdask:$key
if docker image inspect "$tag" >/dev/null 2>&1; then
    say "reusing $tag"
    docker tag "$tag" hpcdask:latest
    echo "$tag"
    exit 0
fi

import_s=0
if ! docker image inspect "$base_tag" >/dev/null 2>&1; then
    t0=$(date +%s.%N)
    tar --numeric-owner -C "$base" -cf - . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$base_tag" >/dev/null
    import_s=$(elapsed "$t0")
    say "imported $base as $base_tag in ${import_s} s"
fi

args="--network host --build-arg BASE_IMAGE=$base_tag -t $tag"
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -r "$ca" ] && args="$args --build-arg PIP_CERT=/dev/hpcdask-host-ca.crt"
say "make docker DOCKER_BUILD_ARGS='$args'"
t0=$(date +%s.%N)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
make -C "$repo" --no-print-directory docker DOCKER_BUILD_ARGS="$args" 2>&1 | tee "$log" >&2
build_s=$(elapsed "$t0")
# What the classic builder sent the daemon (.dockerignore keeps it to the COPY inputs).
context=$(tr '\r' '\n' <"$log" | sed -n 's/^Sending build context to Docker daemon *//p' | tail -1)
size=$(docker image inspect --format '{{.Size}}' "$tag")
say "built $tag in ${build_s} s, $((size / 1024 / 1024)) MiB"
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' hpcdask); do
    t=${old##*:}
    if [[ $t =~ ^[0-9a-f]{16}$ && $t != "$key" ]]; then
        docker rmi "$old" >/dev/null 2>&1 && say "removed $old" || true
    fi
done
printf '{"tag": "%s", "base": "%s", "base_import_s": %s, "build_s": %s, "size_bytes": %s, "context": "%s"}\n' \
    "$tag" "$base_tag" "$import_s" "$build_s" "$size" "$context" >"$cache/docker-$key.json"
echo "$tag"
