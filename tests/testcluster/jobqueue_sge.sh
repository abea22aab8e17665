#!/bin/sh
# The HOST's Grid Engine client commands, run inside the test image (which has none): test
# infrastructure, the Grid Engine twin of jobqueue_slurm.sh.
#
#   usage: jobqueue_sge.sh qsub|qdel|qstat|qhost [ARGS...]
#
# As dask-jobqueue's submit prefix (hpcdask.cluster.sge_cluster(submit_prefix=...)) it turns
# "qsub JOBSCRIPT" into "jobqueue_sge.sh qsub JOBSCRIPT", like a site's binds of its Grid Engine
# into the image would. tests/sge/test_sge_cluster_helper.py binds the host's /usr read-only at
# $JOBQUEUE_HOST (default /mnt/host) and the cell (SGE_ROOT, SGE_CELL in the environment) at its
# own path. The host's binaries start through the image's dynamic loader (the same Debian bookworm
# glibc) with a folder of links to the host's libraries they need (not the host's libc) as a
# loader ARGUMENT: LD_LIBRARY_PATH would reach every job through `qsub -V`.
set -eu
host=${JOBQUEUE_HOST:-/mnt/host}
[ $# -ge 1 ] || { echo "usage: ${0##*/} qsub|qdel|qstat|qhost [ARGS...]" >&2; exit 2; }
case $1 in
    qsub | qdel | qstat | qhost) ;;
    *) echo "${0##*/}: '$1' is not a Grid Engine client command this relays" >&2; exit 2 ;;
esac
cmd=$1; shift
libs=$host/gelibs
for f in "$host/usr/lib/gridengine/$cmd" "$libs" "${SGE_ROOT:?set SGE_ROOT}/${SGE_CELL:?set SGE_CELL}/common/act_qmaster"; do
    [ -e "$f" ] || { echo "${0##*/}: $f is missing: bind the host's /usr and the Grid Engine cell, and link the libraries under $libs" >&2; exit 2; }
done
export SGE_ARCH=lx-amd64
exec /lib64/ld-linux-x86-64.so.2 --library-path "$libs" "$host/usr/lib/gridengine/$cmd" "$@"
