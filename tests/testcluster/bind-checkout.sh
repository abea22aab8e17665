#!/bin/sh
# bind-checkout.sh REPO TARGET: show the checkout REPO, read-only, at TARGET, to every user, in
# the caller's own mount namespace (test infrastructure: the Slurm test cluster's machines and
# tests/testcluster/nobody.py).
#
# The checkout's own folder may be private to root (`d=$(mktemp -d) && git clone . "$d"` makes
# it 0700), and a bind keeps that mode. Its contents are not private, so TARGET becomes a small
# tmpfs (0755) and each entry of REPO is bound into it on its own.
set -eu
repo=$1 target=$2
mount -t tmpfs -o mode=0755,size=1m hpcdask-checkout "$target"
for entry in "$repo"/* "$repo"/.[!.]*; do
    [ -e "$entry" ] || continue
    at=$target/${entry##*/}
    if [ -d "$entry" ]; then mkdir "$at"; else : >"$at"; fi
    mount --bind "$entry" "$at"
    mount -o remount,bind,ro "$at"
done
mount -o remount,ro "$target"
