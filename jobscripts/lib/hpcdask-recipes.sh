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
