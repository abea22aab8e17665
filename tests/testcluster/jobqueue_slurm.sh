#!/bin/sh
# The HOST's Slurm client commands, run inside the test image (which has none): test infrastructure.
#
#   usage: jobqueue_slurm.sh sbatch|scancel|squeue|sinfo|scontrol [ARGS...]
#
# As dask-jobqueue's submit prefix (hpcdask.cluster.slurm_cluster(submit_prefix=...)) it turns
# "sbatch JOBSCRIPT" into "jobqueue_slurm.sh sbatch JOBSCRIPT", like a site's binds of its Slurm
# into the image would. tests/slurm/test_slurm_cluster_helper.py lays this out in the image
# ($JOBQUEUE_HOST, default /mnt/host):
#   usr/         the host's /usr, read-only: the commands, libslurmfull, the plugins, libmunge
#   munge/       the folder of the test cluster's munge socket
#   slurm.conf   the cluster's slurm.conf with PluginDir and AuthInfo's socket pointing at the two
# The host's binaries start through the image's dynamic loader (the same Debian bookworm glibc),
# with the host's Slurm library folder and libmunge passed as loader ARGUMENTS: LD_LIBRARY_PATH or
# LD_PRELOAD would be exported by sbatch into every job, and the host's libc is never loaded.
set -eu
host=${JOBQUEUE_HOST:-/mnt/host}
[ $# -ge 1 ] || { echo "usage: ${0##*/} sbatch|scancel|squeue|sinfo|scontrol [ARGS...]" >&2; exit 2; }
case $1 in
    sbatch | scancel | squeue | sinfo | scontrol) ;;
    *) echo "${0##*/}: '$1' is not a Slurm client command this relays" >&2; exit 2 ;;
esac
cmd=$1; shift
lib=$host/usr/lib/x86_64-linux-gnu
for f in "$host/usr/bin/$cmd" "$lib/slurm-wlm/libslurmfull.so" "$lib/libmunge.so.2" "$host/slurm.conf"; do
    [ -e "$f" ] || { echo "${0##*/}: $f is missing: bind the host's /usr, munge folder and slurm.conf under $host" >&2; exit 2; }
done
SLURM_CONF=$host/slurm.conf
export SLURM_CONF
exec /lib64/ld-linux-x86-64.so.2 --library-path "$lib/slurm-wlm" --preload "$lib/libmunge.so.2" \
    "$host/usr/bin/$cmd" "$@"
