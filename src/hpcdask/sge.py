"""Grid Engine's side of ``hpcdask.cluster.sge_cluster``: the worker jobs' request in Grid
Engine's own terms, checked by Grid Engine before any job is submitted.

Grid Engine takes memory in K/M/G (1024-based) or k/m/g, never dask's ``GiB``/``MiB``, and it
accepts a job that no queue can ever run (one that lacks a resource the site forces, such as
``h_vmem`` made ``FORCED`` with ``qconf -mc``), which then pends forever. ``qsub -w v`` verifies a
request against the empty cluster and submits nothing: its refusal becomes one line naming the fix.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess

import dask.utils

from hpcdask.errors import BadInput

logger = logging.getLogger("hpcdask")


def memory_request(memory: str) -> str:
    """``memory`` (dask's form: ``4GiB``, ``3000MB``, ...) as Grid Engine's whole MiB (``4096M``)."""
    return f"{max(1, dask.utils.parse_bytes(memory) // 2**20)}M"


def worker_request(prefix: str | None, queue: str | None, resource_spec: str | None,
                   memory: str | None, walltime: str | None) -> str | None:
    """The worker jobs' resource request (``h_vmem`` from ``memory`` unless ``resource_spec``
    says otherwise), checked by Grid Engine with dask-jobqueue's configured defaults filled in
    (:func:`check_request`); BadInput first when Grid Engine's cell cannot be found."""
    import dask.config

    if not prefix and not os.environ.get("SGE_ROOT"):
        raise BadInput("SGE_ROOT is not set, so qsub cannot find Grid Engine's cell; source your "
                       "site's settings first (. $SGE_ROOT/$SGE_CELL/common/settings.sh), or "
                       "submit through a login node: sge_cluster(submit_prefix='ssh login1', ...)")
    if resource_spec is None and memory:
        resource_spec = f"h_vmem={memory_request(memory)}"  # Grid Engine refuses "GiB"
    # Grid Engine accepts jobs no queue can run (they pend forever): refuse them here, in one line.
    check_request(prefix, queue or dask.config.get("jobqueue.sge.queue", None),
                  resource_spec or dask.config.get("jobqueue.sge.resource-spec", None),
                  walltime or dask.config.get("jobqueue.sge.walltime", None))
    return resource_spec


def check_request(prefix: str | None, queue: str | None, resource_spec: str | None,
                  walltime: str | None) -> None:
    """``[prefix] qsub -w v -b y [-q QUEUE] [-l SPEC] [-l h_rt=WALLTIME] true``: BadInput when Grid
    Engine refuses the worker jobs' request (a queue that does not exist, a forced resource not
    asked for, a request no queue can meet)."""
    qsub = ["qsub", "-w", "v", "-b", "y"]
    qsub += ["-q", queue] if queue else []
    qsub += ["-l", resource_spec] if resource_spec else []
    qsub += ["-l", f"h_rt={walltime}"] if walltime else []
    argv = [*shlex.split(prefix or ""), *qsub, "true"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BadInput(f"{argv[0]} not found: bind your site's Grid Engine commands into the "
                       f"image, or submit through a login node: "
                       f"sge_cluster(submit_prefix='ssh login1', ...)") from None
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and "verification: found suitable queue(s)" in out:
        return
    if m := re.search(r'unknown queue "([^"]+)"', out):
        raise BadInput(f"queue {m.group(1)!r} does not exist on this Grid Engine cluster; list its "
                       f"queues with `qstat -g c` and name one: sge_cluster(queue='all.q', ...)")
    if m := re.search(r"does not request 'forced' resource \"([^\"]+)\"", out):
        name = m.group(1)
        fix = ("memory='4GiB'" if name == "h_vmem" and not resource_spec
               else f"resource_spec='{resource_spec + ',' if resource_spec else ''}{name}=...'")
        raise BadInput(f"this site requires every job to ask for {name} (Grid Engine: the worker "
                       f"jobs \"do not request 'forced' resource {name}\"); ask for it: "
                       f"sge_cluster({fix}, ...)")
    if m := re.search(r'attribute "([^"]+)" is not a memory value', out):
        raise BadInput(f"{m.group(1)} in resource_spec={resource_spec!r} is not a Grid Engine "
                       f"memory value; use K, M or G: sge_cluster(resource_spec='h_vmem=4G', ...)")
    if "no suitable queues" in out:
        raise BadInput(f"no queue of this Grid Engine cluster can run the worker jobs as asked "
                       f"({shlex.join(qsub)}: no suitable queues); ask for less (memory, "
                       f"walltime) or another queue: sge_cluster(queue=..., memory=..., walltime=...)")
    # Not the request (the qmaster unreachable, ...): dask-jobqueue's qsub will say what it is.
    logger.warning("hpcdask: qsub -w v could not check the worker jobs' request: %s",
                   " ".join(out.split())[:300])
