"""Sizing workers, in one place: from the job's allocation (:mod:`hpcdask.batch`), memory
strings, the memory presets, how long a worker may live, and how its nanny ends it at its
memory budget (:func:`kill_over_budget`)."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Mapping

import dask.config
import dask.utils

from hpcdask import batch, config
from hpcdask.batch import Allocation
from hpcdask.errors import BadInput

# Seed 003 ("memory policy for nodes without local storage"): with no local disk, spilling
# only moves data to a network filesystem or fails; pause early and let the nanny restart
# a worker before the kernel's OOM killer takes the node down.
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    "no-local-storage": {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": 0.80,
        "distributed.worker.memory.terminate": 0.95,
    },
}


def preset(name: str) -> dict[str, object]:
    try:
        return PRESETS[name]
    except KeyError:
        raise BadInput(
            f"unknown memory preset '{name}'; use one of: {', '.join(PRESETS)} "
            f"(e.g. --memory-preset no-local-storage)"
        ) from None


def parse_bytes(text: str | int, option: str = "--memory-limit") -> int:
    """Bytes from ``'4GiB'``, ``'4000MB'`` or an int; a one-line error otherwise."""
    if isinstance(text, int):
        value = text
    else:
        try:
            value = dask.utils.parse_bytes(str(text).strip())
        except (ValueError, TypeError):
            raise BadInput(
                f"{option} '{text}' is not a size; write it like 4GiB, 4000MB or 0.5TB"
            ) from None
    if value <= 0:
        raise BadInput(f"{option} '{text}' must be more than zero; e.g. {option} 4GiB")
    return int(value)


def headroom(alloc: Allocation, nworkers: int, nanny: int, batch_reserve: int,
             server: int = 0) -> int:
    """Bytes of the allocation that are not the workers': each worker's nanny process, the
    node's warm server (:mod:`hpcdask.warm`: what it imported, which its workers share), and on
    the batch node the scheduler and the client (at most half the allocation). The batch system
    counts all of them against the job, so the workers' limits must leave this much free."""
    reserve = min(batch_reserve, alloc.memory // 2) if alloc.batch_node else 0
    return reserve + nworkers * nanny + server


def worker_sizing(nworkers: int, nthreads: int | None, memory_limit: str | int,
                  alloc: Allocation | None = None, nanny: int = 0,
                  batch_reserve: int = 0, server: int = 0) -> tuple[int, int]:
    """(threads, memory bytes) per worker process, from the allocation unless given.

    ``auto`` splits what the allocation leaves after :func:`headroom` between the workers.
    """
    if nworkers < 1:
        raise BadInput(f"--nworkers {nworkers} must be at least 1; e.g. --nworkers 1")
    if nthreads is not None and nthreads < 1:
        raise BadInput(f"--nthreads {nthreads} must be at least 1; e.g. --nthreads 1")
    alloc = alloc or batch.allocation()
    threads = nthreads or max(1, alloc.cpus // nworkers)
    if memory_limit in ("auto", None):
        mem = (alloc.memory - headroom(alloc, nworkers, nanny, batch_reserve, server)) // nworkers
        if mem < 256 * 2**20:
            raise BadInput(
                f"{alloc.memory // 2**20} MiB ({alloc.source}) leaves {max(mem, 0) // 2**20} MiB per "
                f"worker after the nannies, the warm server and the batch node's scheduler and client; ask for "
                f"more memory (sbatch --mem) or fewer workers (HPCDASK_NWORKERS)")
    else:
        mem = parse_bytes(memory_limit)
    return threads, mem


def local_sizing(n_workers: int | None, threads_per_worker: int | None,
                 memory_limit: str | None, alloc: Allocation | None = None) -> tuple[int, int, int]:
    """(workers, threads, memory bytes) of a LocalCluster on this machine: up to 8 workers, the
    CPUs split between them, and 90 % of the memory (the rest is this process's)."""
    alloc = alloc or batch.allocation()
    n = n_workers or max(1, min(alloc.cpus, 8))
    threads = threads_per_worker or max(1, alloc.cpus // n)
    mem = parse_bytes(memory_limit) if memory_limit else int(alloc.memory * 0.9) // n
    return n, threads, mem


#: The thread-pool sizes of the numerical libraries, read once when each library loads.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_threads(cpus: int, nworkers: int, nthreads: int) -> int:
    """Threads per BLAS/OpenMP pool in each worker process: the CPUs that the worker's task
    threads leave over, so that ``nworkers x nthreads x blas`` fills the allocation and never
    exceeds it (one task thread per CPU: 1; one worker of 1 thread on 8 CPUs: 8)."""
    return max(1, cpus // max(1, nworkers * nthreads))


def thread_env(cpus: int, nworkers: int, nthreads: int,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that sizes each worker's BLAS/OpenMP pools from the allocation.

    Dask's nanny sets them to 1 whatever the worker's threads (``distributed.nanny.
    pre-spawn-environ``): a worker of one thread on a node of many CPUs then leaves all but one
    idle during every NumPy/scikit-learn call, and without a nanny nothing limits them, so each
    task thread runs as many BLAS threads as the node has cores. What the user set in the
    environment wins (OMP_NUM_THREADS alone then sizes the other pools too, as OpenBLAS reads
    it)."""
    environ = os.environ if environ is None else environ
    given = [environ[k] for k in BLAS_THREAD_VARIABLES if environ.get(k)]
    n = given[0] if given else str(blas_threads(cpus, nworkers, nthreads))
    return {k: environ.get(k) or n for k in BLAS_THREAD_VARIABLES}


def blas_config(cpus: int, nworkers: int, nthreads: int) -> dict[str, object]:
    """The Dask setting that gives each worker :func:`thread_env`: the nanny sets
    ``distributed.nanny.pre-spawn-environ`` before the worker's Python starts, as it must be
    (the libraries read it once, when they load; the nanny's ``env`` comes too late for that)."""
    key = "distributed.nanny.pre-spawn-environ"
    return {key: {**dask.config.get(key, {}), **thread_env(cpus, nworkers, nthreads)}}


def reserves(server: bool = False) -> dict[str, int]:
    """The configured headroom (hpcdask.nanny-memory, hpcdask.batch-node-reserve, and with
    ``server``, when the workers fork from a warm server, hpcdask.warm-server-memory) in bytes."""
    server = parse_bytes(config.get("warm-server-memory"), "warm-server-memory") if server else 0
    return {"nanny": parse_bytes(config.get("nanny-memory"), "nanny-memory"),
            "batch_reserve": parse_bytes(config.get("batch-node-reserve"), "batch-node-reserve"),
            "server": server}


def lifetime(job_end: float | None, margin: float, stagger: float,
             now: float | None = None) -> float | None:
    """Seconds a worker may live: up to ``margin`` + a random share of ``stagger`` before the end.

    ``None`` when the job has no end time. Dask adds its own ``lifetime_stagger`` too; this
    staggering spreads workers of different nodes started at the same moment.
    """
    if not job_end:
        return None
    now = time.time() if now is None else now
    left = job_end - now - margin - random.uniform(0, stagger)
    if left <= 0:
        raise BadInput(
            f"the job ends in {job_end - now:.0f}s, less than the retirement margin of "
            f"{margin:.0f}s; ask for more time ({batch.more_time()}) or lower "
            f"HPCDASK_LIFETIME_MARGIN"
        )
    return left


def worker_lifetime(text: str | None, job_end: float | None = None) -> float | None:
    """Seconds a worker lives from ``--lifetime``: none, a duration (55m), or auto (before the
    job's end: ``job_end``, else $HPCDASK_JOB_END)."""
    if text in (None, "", "none"):
        return None
    margin = dask.utils.parse_timedelta(config.get("lifetime-margin"))
    stagger = dask.utils.parse_timedelta(config.get("lifetime-stagger"))
    if text == "auto":
        return lifetime(batch.job_end(job_end), margin, stagger)
    try:
        return dask.utils.parse_timedelta(text)
    except (ValueError, KeyError):
        raise BadInput(f"--lifetime '{text}' is not a duration; write it like 55m, "
                       f"3600s, or auto (from the job's end time)") from None


def walltime_lifetime(walltime: str) -> tuple[float, float]:
    """(lifetime, stagger) seconds of a dask-jobqueue worker, so it retires (handing over its
    data) before the job's ``walltime`` ends."""
    total = batch.walltime_seconds(walltime)
    margin = dask.utils.parse_timedelta(config.get("lifetime-margin"))
    stagger = dask.utils.parse_timedelta(config.get("lifetime-stagger"))
    life = total - margin - stagger
    if life <= 0:
        raise BadInput(f"walltime {walltime} leaves no time before the retirement margin of "
                       f"{margin:.0f}s + {stagger:.0f}s stagger; ask for a longer walltime or "
                       f"lower HPCDASK_LIFETIME_MARGIN")
    return life, stagger


def killed_hint(exc: BaseException) -> str | None:
    """One line to follow distributed's ``KilledWorker`` in a script's traceback: which task,
    the workers' memory limit, and the fix; None for any other exception.

    A task that ends every worker running it is nearly always one that needs more memory than a
    worker's limit (the nanny restarts the worker, or the batch system's memory limit kills it),
    and distributed's own message only says to read the workers' logs."""
    from distributed.scheduler import KilledWorker

    if not isinstance(exc, KilledWorker):
        return None
    limit = getattr(exc.last_worker, "memory_limit", None)
    each = f"a memory limit of {dask.utils.format_bytes(limit)} each" if limit else "no memory limit"
    return (f"hpcdask: task {exc.task!r} was running on each of the {exc.allowed_failures + 1} "
            f"workers that died ({each}); if it needs more memory than that, give the job more "
            f"memory (sbatch --mem), run fewer workers per node (HPCDASK_NWORKERS), or split "
            f"its work into smaller chunks")


def kill_over_budget(nanny) -> None:  # noqa: ANN001 - distributed's Nanny
    """``nanny`` kills its worker with SIGKILL the moment the worker passes its memory budget
    (``distributed.worker.memory.terminate``) and restarts it, as distributed does, but without
    distributed's SIGTERM first: hpcdask's worker process only goes quiet at SIGTERM (the batch
    system sends it to every process of the job, and the nanny drains the worker), so the SIGKILL
    came one monitor interval later, while the task went on allocating: often past the job's
    memory, where the batch system kills every worker of the node (Slurm's OverMemoryKill: the
    whole step) instead of the one the nanny would restart. Call it before the nanny starts (a
    running nanny's monitor is swapped too)."""
    import psutil
    from distributed.core import Status
    from tornado.ioloop import PeriodicCallback

    old = nanny.periodic_callbacks.get("memory_monitor")
    if old is None:  # no memory limit, or terminate: false
        return
    manager = nanny.memory_manager
    budget = manager.memory_limit * manager.memory_terminate_fraction

    def monitor() -> None:
        process = getattr(nanny.process, "process", None)
        pid = getattr(process, "pid", None)
        if nanny.status != Status.running or pid is None or pid == manager._last_terminated_pid:
            return
        try:
            rss = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        if rss <= budget:
            return
        manager._last_terminated_pid = pid
        _nanny_memory_log.warning(
            "Worker %s (pid=%d) exceeded %.0f%% memory budget (%s of %s): killing it; the "
            "nanny restarts it", nanny.worker_address, pid,
            manager.memory_terminate_fraction * 100, dask.utils.format_bytes(rss),
            dask.utils.format_bytes(manager.memory_limit))
        nanny.log_event("worker-restart-memory",
                        {"worker": nanny.worker_address, "pid": pid, "rss": rss})
        process.kill()

    new = PeriodicCallback(monitor, old.callback_time)
    nanny.periodic_callbacks["memory_monitor"] = new
    if old.is_running():
        old.stop()
        new.start()


_nanny_memory_log = logging.getLogger("distributed.nanny.memory")


@functools.cache
def nanny_class() -> type:
    """distributed's Nanny whose memory monitor is :func:`kill_over_budget`'s (LocalCluster's
    ``worker_class``)."""
    from distributed import Nanny

    class KillingNanny(Nanny):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            kill_over_budget(self)

    return KillingNanny
