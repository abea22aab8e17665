"""The worker role: ``hpcdask worker`` (and the worker ranks of ``hpcdask mpi``).

Thin over distributed's ``Nanny`` (dask-cuda's ``CUDAWorker`` on GPU nodes): hpcdask sizes the
workers from the job's allocation (:mod:`hpcdask.memory`, once), sets the memory policy and the
node-local scratch, checks itself against the scheduler's identity before it registers, and
on a signal (SIGTERM, the batch system's warning) drains (:mod:`hpcdask.drain`) and stops in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import dask.utils

from hpcdask import (batch, config, drain, files, gpu, memory, nested, netif, schedfile,
                     servers, shutdown, signals, versions, warm)
from hpcdask.connect import connection, refuse_if_different, scheduler_identity

logger = logging.getLogger("hpcdask")
CLOSE_TIMEOUT = 3  # seconds a stopping worker process gets before its nanny kills it


@dataclass
class WorkerSpec:
    """``hpcdask worker``'s options; None: from the configuration (hpcdask.yaml, HPCDASK_*)."""

    scheduler_file: Path
    interface: str | None = None
    nthreads: int | None = None
    nworkers: int | None = None
    memory_limit: str | None = None
    local_directory: str | None = None
    memory_preset: str | None = None
    lifetime: str | None = None
    job_end: float | None = None
    name: str | None = None
    dashboard: str | None = None
    tls: bool = True
    gpus: bool | None = None
    with_scheduler: bool = False  # started with its scheduler: the interface checked after its file
    node_share: int | None = None  # processes sharing this node's allocation (MPI ranks); default nworkers


def run_worker(spec: WorkerSpec) -> None:
    """Serve ``spec.nworkers`` worker processes (one per GPU with --gpus) until they end or a
    signal comes."""
    iface = config.get("interface", spec.interface)
    host = None if spec.with_scheduler else netif.address_of(iface)
    nworkers = config.get("nworkers", spec.nworkers)
    gpus = gpu.devices() if config.get("gpu", spec.gpus) else []
    if gpus:
        nworkers = len(gpus)  # one worker process per GPU
    alloc = batch.allocation()
    share = spec.node_share or nworkers  # worker processes on this node's allocation
    forks = warm.enabled(nworkers, bool(gpus))  # they fork from one warm server
    threads, mem = memory.worker_sizing(share, config.get("nthreads", spec.nthreads),
                                        config.get("memory-limit", spec.memory_limit), alloc,
                                        **memory.reserves(server=forks))
    blas = memory.blas_config(alloc.cpus, share, threads)
    preset = memory.preset(config.get("memory-preset", spec.memory_preset))
    local_dir = files.local_directory(spec.local_directory)
    life = memory.worker_lifetime(spec.lifetime, spec.job_end)
    path = Path(spec.scheduler_file).expanduser()
    timeout = dask.utils.parse_timedelta(config.get("scheduler-file-timeout"))
    fork = warm.settings(forks)
    with dask.config.set({**preset, **blas, **fork}), files.scratch(local_dir) as d, running_mark():
        warm.start(d)  # its imports run while this process waits for the scheduler's file
        versions.identity()  # so does this role's identity (cached for the check against it)
        info = schedfile.wait(path, timeout)
        if host is None:
            # Started with its scheduler: a wrong interface that both share fails once, in the
            # scheduler (which then never writes the file, and the job stops this worker).
            host = netif.address_of(iface)
        sec = connection(info, path, spec.tls, "worker")
        http = servers.worker_http(config.get("dashboard", spec.dashboard))
        try:
            asyncio.run(_serve_workers(info["address"], path, sec, host, nworkers, threads, mem,
                                       d, life, spec.name, http, gpus))
        finally:
            warm.stop()  # nothing of this worker command outlives it


@contextlib.contextmanager
def running_mark(folder: Path | None = None):
    """While this worker process runs, a file named after its node in ``folder`` (default
    ``$HPCDASK_WORKER_MARKS``, which the cluster jobscripts set to a folder of the cluster's):
    a crashed node's mark stays, so the job names that node once its workers did not stop."""
    folder = batch.worker_marks() if folder is None else folder
    mark = None
    if folder is not None:
        with contextlib.suppress(OSError):  # only a diagnostic: a worker runs without it
            folder.mkdir(mode=0o700, exist_ok=True)
            mark = folder / f"{socket.gethostname()}.{os.getpid()}"
            mark.touch()
    try:
        yield mark
    finally:
        if mark is not None:
            with contextlib.suppress(OSError):
                mark.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()  # the last one out


async def _serve_workers(address, path, sec, host, nworkers, threads, mem, local_dir, life,
                         name, http, gpus=()) -> None:
    timeout = dask.utils.parse_timedelta(config.get("connect-timeout"))
    me = f"worker {name or socket.gethostname()}"
    ref = await scheduler_identity(address, sec, "worker", path, timeout)
    refuse_if_different(ref, versions.identity(), me)
    base = name or f"{socket.gethostname()}-{os.getpid()}"
    shutdown.start_resource_tracker()
    extra = {"lifetime": life, "lifetime_restart": False} if life else {}
    if gpus and gpu.has_dask_cuda():
        from dask_cuda import CUDAWorker  # one nanny per GPU, CUDA_VISIBLE_DEVICES rotated

        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        cuda = CUDAWorker(address, host=host, nthreads=threads, name=base, memory_limit=mem,
                          security=sec, local_directory=local_dir, death_timeout=timeout,
                          preload=nested.WORKER_PRELOAD, **http, **extra)
        await cuda
        nannies = list(cuda.nannies)
        for nanny in nannies:
            memory.kill_over_budget(nanny)
    else:
        nanny_cls = memory.nanny_class()  # distributed's Nanny, killing at the memory budget at once
        nannies = [nanny_cls(address, nthreads=threads, memory_limit=mem, host=host, security=sec,
                         local_directory=local_dir, name=base if nworkers == 1 else f"{base}-{i}",
                         death_timeout=timeout, preload=nested.WORKER_PRELOAD,
                         **_gpu_kwargs(i, gpus), **http, **extra)
                   for i in range(nworkers)]
        await asyncio.gather(*nannies)
    logger.info("hpcdask: %d worker(s) on %s joined %s: %d thread(s), %s each, image %s", nworkers,
                host, address, threads, dask.utils.format_bytes(mem), versions.image_label())
    finished = asyncio.gather(*[n.finished() for n in nannies])
    why = await signals.until_signalled(asyncio.Event(), finished)
    if why != "finished":
        logger.info("hpcdask: worker(s) on %s stopping (%s)", host, why)
        # Hand the results over first (bounded by hpcdask.drain-timeout), then close in seconds:
        # the batch system's KillWait (or GraceTime) follows, and the scratch must go first.
        await drain.drain(nannies, why)
        await asyncio.gather(*[n.close(timeout=CLOSE_TIMEOUT) for n in nannies],
                             return_exceptions=True)


def _gpu_kwargs(i: int, gpus) -> dict[str, Any]:
    """Worker ``i`` of a GPU node: its own CUDA_VISIBLE_DEVICES order and a GPU resource."""
    if not gpus:
        return {}
    return {"env": {"CUDA_VISIBLE_DEVICES": gpu.visible_for(i, list(gpus))},
            "resources": {"GPU": 1}}
