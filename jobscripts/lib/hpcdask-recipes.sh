# shellcheck shell=bash
# hpcdask-recipes.sh: the seeds' extra recipes on top of hpcdask-job.sh (which sources this file).
#   HPCDASK_GPU=1   every worker runs `apptainer exec --nv ... hpcdask worker --gpus`: one worker
#                   process per GPU of its node, each with its own CUDA_VISIBLE_DEVICES order
#                   (dask-cuda's worker when the image has it). Ask Slurm for the GPUs as usual
#                   (sbatch --gres=gpu:4 or --gpus-per-node=4); Slurm sets CUDA_VISIBLE_DEVICES.
#   --jupyter       (the all-in-one job's or the scheduler job's first argument) JupyterLab from
#                   the image on the batch node's loopback, next to the cluster: `hpcdask jupyter`.

# Is HPCDASK_GPU on (1, true, yes)?
hj_gpu_on() {
    case ${HPCDASK_GPU:-} in 1 | [Tt]rue | [Yy]es | on) return 0 ;; *) return 1 ;; esac
}

# GPU workers: --nv for apptainer, --gpus for hpcdask worker (rewrites HJ_WORKER_ARGV).
hj_gpu_argv() {
    hj_gpu_on || return 0
    HJ_WORKER_ARGV=("${HJ_WORKER_ARGV[0]}" exec --nv "${HJ_WORKER_ARGV[@]:2}" --gpus)
}

# JupyterLab next to the cluster in FILE, in the background as this job's client: it runs until
# the job's time ends or the user shuts it down (File > Shut Down), then the job ends in order.
hj_start_jupyter() {
    "${HJ_EXEC[@]}" hpcdask jupyter --scheduler-file "$1" &
    # shellcheck disable=SC2034  # hpcdask-job.sh's client pid: waited for and cleaned up there
    HJ_CLIENT=$!
}

# dask-mpi's layout (slurm/dask-mpi.sbatch): one srun step of MPI ranks, every rank
# `apptainer exec IMAGE hpcdask mpi --scheduler-file FILE SCRIPT ARGS`: rank 0 the scheduler,
# rank 1 the client (SCRIPT), the rest workers. srun --mpi=pmi2 (HPCDASK_SRUN_MPI) is the PMI
# server the image's MPICH talks to: no mpirun, no MPI library of the host in the image.
# UCX (MPICH's transport) defaults to TCP: MPI only carries the layout and the end message, and
# ranks in separate containers of one node may not share memory segments.
hj_mpi() {
    local file=$1
    shift
    [ $# -gt 0 ] || hj_die 2 "give your Python script after the jobscript, e.g. sbatch -n 4 dask-mpi.sbatch ./my_analysis.py (rank 1 runs it with a connected Client)"
    [ -f "$1" ] || hj_die 2 "script $1 does not exist (from $(pwd)); give your Python script's path after the jobscript, e.g. sbatch -n 4 dask-mpi.sbatch ./my_analysis.py --arg 1"
    # shellcheck disable=SC2034  # hpcdask-job.sh's scheduler file: removed by its exit trap
    HJ_FILE=$file
    # Here, not only in each rank: a rank that exits first would have srun kill the others.
    [ "${SLURM_NTASKS:-3}" -ge 3 ] || hj_die 2 "dask-mpi's layout needs at least 3 MPI ranks (scheduler, client, one worker), this job has $SLURM_NTASKS; submit with more, e.g. sbatch -N 2 -n 4 dask-mpi.sbatch $1"
    export UCX_TLS=${UCX_TLS:-tcp,self}
    hj_say "srun ${HPCDASK_SRUN_MPI:---mpi=pmi2}: ${SLURM_NTASKS:-?} ranks (0 scheduler, 1 client, the rest workers)"
    # The workers' scratch: the user's setting, else each node's own $TMPDIR (not HJ_SCRATCH).
    # shellcheck disable=SC2086  # HPCDASK_SRUN_MPI may hold several srun options
    HPCDASK_LOCAL_DIRECTORY=$HJ_USER_LOCAL srun ${HPCDASK_SRUN_MPI:---mpi=pmi2} --kill-on-bad-exit=1 \
        "${HJ_EXEC[@]}" hpcdask mpi --scheduler-file "$file" "$@" &
    # shellcheck disable=SC2034  # hpcdask-job.sh's client pid: waited for and cleaned up there
    HJ_CLIENT=$!
    local rc=0
    wait "$HJ_CLIENT" || rc=$?
    HJ_CLIENT=''
    hj_say "the MPI step ended (exit $rc) after $(hj_elapsed)s"
    return "$rc"
}
