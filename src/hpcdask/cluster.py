"""dask-jobqueue clusters whose workers run in the image: ``slurm_cluster``, ``pbs_cluster``, ``sge_cluster``.

The ``SLURMCluster`` of the tutorial "Distributed Python code" (SFU Cedar) and the ``PBSCluster`` of
"Dask Distributed" (NCI, https://intro-to-dask.readthedocs.io), with hpcdask's defaults: each worker
job runs dask-jobqueue's own worker command under ``apptainer exec IMAGE python``, binds the
workers' interface (``ib0``) while the scheduler binds its own (``scheduler_interface``: login
nodes often lack ``ib0``; then, unless ``interface=`` is given, the workers bind the scheduler's
network too, since the scheduler must reach them), speaks TLS with fresh per-cluster credentials (the CA and certificate
in a private folder on the shared filesystem, which every worker job reads), retires workers
gracefully before the walltime, and applies the memory preset.

The scheduler runs in the calling process, so that process must run in the image too, or
the Python and package versions differ between the scheduler and its workers::

    apptainer exec --bind /etc/slurm,... $HPCDASK_IMAGE python my_login_node_script.py

and inside it::

    from distributed import Client
    from hpcdask.cluster import slurm_cluster

    with slurm_cluster(cores=8, memory="32GiB", walltime="01:00:00", account="def-me",
                       scheduler_interface="eth0") as cluster, Client(cluster) as client:
        cluster.scale(jobs=4)
        ...

The image holds no Slurm or PBS commands: bind the site's into it, or, where that is
impractical, submit through the login node with ``submit_prefix="ssh login1"`` (the prefix
goes before ``sbatch``/``scancel``, ``qsub``/``qdel``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hpcdask import checks, clean, config, files, memory, nested, netif, security, shutdown, sif
from hpcdask.errors import BadInput
from hpcdask.guard import IdentityGuard
from hpcdask.servers import NoHTTPScheduler

__all__ = ["slurm_cluster", "pbs_cluster", "sge_cluster", "job_kwargs"]

logger = logging.getLogger("hpcdask")


def _image(image: str | os.PathLike[str] | None) -> str:
    image = image or config.get("image") or os.environ.get("HPCDASK_IMAGE")
    if not image:
        raise BadInput("no image for the workers: pass image='/path/to/hpcdask.sif' or export "
                       "HPCDASK_IMAGE=/path/to/hpcdask.sif")
    return str(image)


def _lifetime_args(walltime: str | None) -> list[str]:
    """``--lifetime`` so workers retire (handing over their data) before the walltime."""
    if not walltime:
        return []
    life, stagger = memory.walltime_lifetime(walltime)
    return ["--lifetime", f"{life:.0f}s", "--lifetime-stagger", f"{stagger:.0f}s"]


def _preset_exports(name: str) -> list[str]:
    """The memory preset as DASK_* exports for the worker job (dask-jobqueue's worker command)."""
    lines = []
    for key, value in memory.preset(name).items():
        env = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        lines.append(f"export {env}={shlex.quote(str(value))}")
    return lines


def job_kwargs(
    image: str | os.PathLike[str] | None = None,
    *,
    folder: str | os.PathLike[str] | None = None,
    interface: str | None = None,
    scheduler_interface: str | None = None,
    local_directory: str | None = None,
    walltime: str | None = None,
    job_script_prologue: list[str] | None = None,
    worker_extra_args: list[str] | None = None,
    dashboard: str | None = None,
    require_image: bool = True,
    scheduler_options: dict[str, Any] | None = None,
    gpus: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The dask-jobqueue keyword arguments hpcdask adds (see the module docstring).

    Creates the cluster's TLS credentials in ``folder`` (default: a new folder under
    ``hpcdask.shared-dir``, which must be on the shared filesystem).
    """
    image = _image(image)
    if require_image:
        checks.runs_from(image)
    shutdown.calm_closed_connections()  # the scheduler runs in this process: see shutdown.py
    iface = config.get("interface", interface)
    sched_iface = scheduler_interface or config.get("scheduler-interface") or iface
    host = netif.address_of(sched_iface, "scheduler_interface=")
    if interface is None and iface != sched_iface and iface not in netif.interfaces():
        # A login node without the fabric: the scheduler here must reach its workers (it
        # connects to them, e.g. to vet their identity), so they bind its network too.
        logger.warning("hpcdask: %s has no %s: the workers bind %s too, so that this scheduler "
                       "can reach them (worker-to-worker traffic then uses %s); for %s between "
                       "workers run the scheduler on a compute node "
                       "(jobscripts/slurm/dask-scheduler.sbatch)", socket.gethostname(), iface,
                       sched_iface, sched_iface, iface)
        iface = sched_iface
    cluster_id = uuid.uuid4().hex[:8]
    folder = Path(folder or Path(config.get("shared-dir")).expanduser() / f"jobqueue-{cluster_id}")
    creds = security.create(folder.absolute(), cluster_id)
    clean.stamp(creds.folder)  # who made it, for `hpcdask clean`
    apptainer = os.environ.get("HPCDASK_APPTAINER", "apptainer")
    local = local_directory or config.get("local-directory") or "${TMPDIR:-/tmp}"
    # The worker's scratch and the credentials' folder must be visible inside the image.
    # A .sif is bound onto the image's placeholder too, so workers report its ID (hpcdask.sif).
    own = (f"--bind {shlex.quote(f'{image}:{sif.IMAGE_SIF}:ro')} " if os.path.isfile(image) else "")
    nv = "--nv " if gpus else ""
    python = (f"{apptainer} exec {nv}--bind {shlex.quote(str(creds.files))} --bind \"{local}\" "
              f"{own}{shlex.quote(image)} python")
    # The workers' scratch: a private folder in the node-local one, removed when the job script
    # ends (distributed leaves its workspace's lock files; other jobs may share the parent).
    prologue = [f'HPCDASK_SCRATCH=$(mktemp -d "{local}/hpcdask-XXXXXX")',
                """trap 'rm -rf -- "$HPCDASK_SCRATCH"' EXIT""",
                *_preset_exports(config.get("memory-preset")), *(job_script_prologue or [])]
    dmode = config.get("dashboard", dashboard)
    options: dict[str, Any] = {"interface": sched_iface}
    extra: dict[str, Any] = {}
    if dmode == "off":  # no HTTP listener at all, on the scheduler or the workers
        options["dashboard"] = False
        extra["scheduler_cls"] = NoHTTPScheduler
        worker_http = ["--no-dashboard", "--worker-class", "hpcdask.servers.NoHTTPWorker"]
    else:
        dhost = "127.0.0.1" if dmode == "loopback" else host
        port = netif.port_or_any(dhost, config.get("dashboard-port"))
        options["dashboard_address"] = f"{dhost}:{port}"
        # dask worker binds its HTTP endpoints to every interface unless told otherwise
        worker_http = ["--dashboard-address", "127.0.0.1:0"]
    if require_image:
        options["plugins"] = [IdentityGuard()]
    options.update(scheduler_options or {})
    out = dict(
        python=python,
        interface=iface,
        local_directory="$HPCDASK_SCRATCH",
        security=creds.security(),
        protocol="tls://",
        scheduler_options=options,
        job_script_prologue=prologue,
        # The worker process's preloads, as every worker hpcdask starts has them (its own SIGTERM
        # handling and quiet closed connections, nested joblib calls), and the nanny's.
        worker_extra_args=[*(a for m in nested.WORKER_PRELOAD for a in ("--preload", m)),
                           "--preload-nanny", "hpcdask.shutdown",
                           *_lifetime_args(walltime),
                           *worker_http, *_gpu_args(gpus, kwargs),
                           *(worker_extra_args or [])],
        shared_temp_directory=str(creds.files),
        **extra,
        **kwargs,
    )
    if walltime:
        out["walltime"] = walltime
    return out


def _removing_credentials(cluster_cls: type, kwargs: dict[str, Any]) -> Any:
    """``cluster_cls(**kwargs)`` whose credentials folder, and its scheduler's scratch (a private
    folder in $TMPDIR, else /tmp: distributed leaves lock files behind), are removed when the
    cluster closes."""
    creds = security.current(Path(kwargs["shared_temp_directory"]).parent)
    scratch = tempfile.mkdtemp(prefix="hpcdask-", dir=files.local_directory(None))
    kwargs["scheduler_options"].setdefault("local_directory", scratch)

    def cleanup() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        if creds:
            security.remove(creds)
            clean.unstamp(creds.folder)

    class Cluster(cluster_cls):  # type: ignore[misc, valid-type]
        async def _close(self, *args: Any, **kw: Any) -> None:
            try:
                await super()._close(*args, **kw)
            finally:
                cleanup()

    Cluster.__name__ = Cluster.__qualname__ = cluster_cls.__name__
    try:
        return Cluster(**kwargs)
    except BaseException:
        cleanup()
        raise


def _gpu_args(gpus: int | None, kwargs: dict[str, Any]) -> list[str]:
    """One GPU per worker job: the batch system's CUDA_VISIBLE_DEVICES names it, and the
    worker advertises it as a resource (``client.submit(..., resources={"GPU": 1})``)."""
    if not gpus:
        return []
    if gpus != 1 or kwargs.get("processes", 1) != 1:
        raise BadInput(f"gpus={gpus}, processes={kwargs.get('processes', 1)}: a worker job here "
                       f"runs one worker on one GPU; use gpus=1 and cluster.scale(jobs=N), or the "
                       f"jobscripts with HPCDASK_GPU=1 for one worker per GPU of whole nodes")
    kwargs["processes"] = 1
    return ["--resources", "GPU=1"]


def _with_prefix(job_cls: type, prefix: str | None) -> type:
    """``job_cls`` submitting and cancelling through ``prefix`` (e.g. ``ssh login1``)."""
    if not prefix:
        return job_cls
    return type(job_cls.__name__, (job_cls,), {
        "submit_command": f"{prefix} {job_cls.submit_command}",
        "cancel_command": f"{prefix} {job_cls.cancel_command}",
    })


def slurm_cluster(image: str | os.PathLike[str] | None = None, *,
                  submit_prefix: str | None = None, **kwargs: Any):
    """A ``dask_jobqueue.SLURMCluster`` whose workers run in ``image`` (the Cedar example of the
    tutorial "Distributed Python code").

    Keyword arguments are :func:`job_kwargs`'s and ``SLURMCluster``'s (``cores``, ``memory``,
    ``walltime``, ``account``, ``queue``, ``job_extra_directives``, ...). ``gpus=1``: each worker
    job asks for one GPU (``--gres=gpu:1``) and runs its worker under ``apptainer exec --nv``.
    """
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob

    if kwargs.get("gpus"):
        kwargs["job_extra_directives"] = [*kwargs.get("job_extra_directives", []),
                                          f"--gres=gpu:{kwargs['gpus']}"]
    return _removing_credentials(SLURMCluster, dict(job_cls=_with_prefix(SLURMJob, submit_prefix),
                                                    **job_kwargs(image, **kwargs)))


def pbs_cluster(image: str | os.PathLike[str] | None = None, *,
                submit_prefix: str | None = None, project: str | None = None,
                ncpus: int | None = None, mem: str | None = None, jobfs: str | None = None,
                job_extra_directives: list[str] | None = None, **kwargs: Any):
    """A ``dask_jobqueue.PBSCluster`` whose workers run in ``image`` (the Gadi example of NCI's
    tutorial "Dask Distributed").

    ``project``, ``ncpus``, ``mem`` and ``jobfs`` become Gadi's ``-P``, ``-l ncpus=``, ``-l mem=``
    and ``-l jobfs=`` directives (Gadi takes no ``select``, so it is skipped); the workers'
    scratch defaults to ``$PBS_JOBFS`` when ``jobfs`` is asked for.
    """
    from dask_jobqueue import PBSCluster
    from dask_jobqueue.pbs import PBSJob

    extra = list(job_extra_directives or [])
    if project:
        extra.append(f"-P {project}")
    if ncpus:
        extra.append(f"-l ncpus={ncpus}")
    if mem:
        extra.append(f"-l mem={mem}")
    if jobfs:
        extra.append(f"-l jobfs={jobfs}")
        kwargs.setdefault("local_directory", "$PBS_JOBFS")
    if ncpus or mem:
        kwargs.setdefault("job_directives_skip", ["select"])
    kwargs.setdefault("shebang", "#!/usr/bin/env bash")
    return _removing_credentials(PBSCluster, dict(job_cls=_with_prefix(PBSJob, submit_prefix),
                                                  job_extra_directives=extra,
                                                  **job_kwargs(image, **kwargs)))


def sge_cluster(image: str | os.PathLike[str] | None = None, *,
                submit_prefix: str | None = None, queue: str | None = None,
                resource_spec: str | None = None, **kwargs: Any):
    """A ``dask_jobqueue.SGECluster`` whose workers run in ``image`` (the Dask HPC docs' Grid
    Engine, through dask-jobqueue instead of ``qsub -b y``).

    Each worker job asks for its memory as ``h_vmem`` (the address-space limit Grid Engine
    enforces, in whole MiB) unless ``resource_spec`` says otherwise; ``queue`` and ``walltime``
    become ``-q`` and ``-l h_rt``. Grid Engine's clients must be reachable: ``SGE_ROOT`` set (or
    ``submit_prefix``, e.g. ``ssh login1``). Grid Engine checks that request first (``qsub -w v``:
    :func:`hpcdask.sge.check_request`), so a queue that does not exist or a resource the site
    forces is one line (BadInput) instead of jobs that never start.
    """
    from dask_jobqueue import SGECluster
    from dask_jobqueue.sge import SGEJob

    from hpcdask import sge

    resource_spec = sge.worker_request(submit_prefix, queue, resource_spec,
                                       kwargs.get("memory"), kwargs.get("walltime"))
    # dask-jobqueue ends a worker job with qdel: without -notify that is SIGKILL at once, and the
    # worker's scratch stays in $TMPDIR. With -notify Grid Engine first sends USR2 (USR1 before a
    # suspension) and waits the queue's notify time: the job's shell ignores both, the worker's
    # nanny stops on USR2 as on SIGTERM (hpcdask.shutdown), and the job ends before any SIGKILL.
    kwargs["job_extra_directives"] = ["-notify", *(kwargs.get("job_extra_directives") or [])]
    kwargs["job_script_prologue"] = ["trap '' USR1 USR2  # -notify's warnings: see sge_cluster",
                                     "export HPCDASK_WARNING_SIGNAL=USR2",
                                     *(kwargs.get("job_script_prologue") or [])]
    return _removing_credentials(SGECluster, dict(job_cls=_with_prefix(SGEJob, submit_prefix),
                                                  queue=queue, resource_spec=resource_spec,
                                                  **job_kwargs(image, **kwargs)))
