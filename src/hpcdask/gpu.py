"""GPU workers: one worker process per GPU, each seeing its own GPU first.

The GPUs are the ones the batch system gave the job (``CUDA_VISIBLE_DEVICES``, which Slurm's
``--gres=gpu:N`` / ``--gpus-per-node`` sets), else every GPU ``nvidia-smi`` lists. Worker ``i``
gets ``CUDA_VISIBLE_DEVICES`` rotated to start at its GPU (dask-cuda's convention), so each
process uses "its" device 0 and can still reach the others (NVLink, peer copies). When the image
has dask-cuda, its ``CUDAWorker`` runs the workers instead (RMM, CPU affinity, device-memory
spilling); hpcdask's TLS, interface, sizing and identity check apply either way.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

from hpcdask.errors import BadInput


def devices() -> list[str]:
    """The GPU ids this node's workers may use."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if given and given not in ("NoDevFiles", "-1"):
        return [d.strip() for d in given.split(",") if d.strip()]
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60, check=False)
        found = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and found:
            return found
    raise BadInput("--gpus (HPCDASK_GPU=1) but this node shows no GPU (no CUDA_VISIBLE_DEVICES, "
                   "nvidia-smi lists none); ask for GPUs (sbatch --gres=gpu:N) and run the "
                   "worker with apptainer exec --nv, or drop --gpus")


def visible_for(i: int, ids: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` of worker ``i``: the list rotated to start at its GPU."""
    return ",".join(ids[i:] + ids[:i])


def has_dask_cuda() -> bool:
    return importlib.util.find_spec("dask_cuda") is not None
