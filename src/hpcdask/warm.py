"""One interpreter start per node: a node's worker processes fork from a warm server.

A nanny starts its worker process with ``multiprocessing`` (``distributed.worker.
multiprocessing-method``), by default ``spawn``: a fresh interpreter per worker process that
imports distributed, NumPy and the rest again, through the image's mount, and on a node's few
cores one after the other. hpcdask's nannies use the standard library's ``forkserver`` instead:
the node's first worker start launches one server process, which imports what a worker needs
once (:data:`BASE` and ``hpcdask.worker-imports``), then forks every worker process of the
node, the nanny's restarts of a killed worker included. The forked workers share the imported
pages, so the node's worker tree also needs less memory.

Forking is safe only from a process that runs one thread. The nanny runs an event loop and
threads, so it never forks itself; the server does, and it keeps to one thread: the BLAS pools
and pyarrow's jemalloc, which start threads when they load, load with one thread and no
background thread (:mod:`hpcdask.warmstart`), and each forked worker then sizes its BLAS pools
from its environment (the nanny's ``pre-spawn-environ``, :func:`hpcdask.memory.blas_config`)
in :func:`dask_setup`. The server ignores the batch system's signals (SIGTERM, USR1, USR2):
it reports its workers' exits to their nannies, which stop and drain them; it ends when the
nanny that started it does. Its workers get the default actions back when they are forked.

A command that starts one worker process keeps ``spawn`` (:func:`enabled`), and so do GPU
workers: each has its own ``CUDA_VISIBLE_DEVICES``, which must be set before CUDA loads, and
CUDA does not survive a fork once it has been initialised. A spawned worker imports
``worker-imports`` itself (:func:`dask_setup`), before it registers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys

import dask.config

from hpcdask import config
from hpcdask.errors import BadInput

logger = logging.getLogger("hpcdask")

METHOD = "distributed.worker.multiprocessing-method"
#: What every worker process runs: distributed's worker, hpcdask's worker preloads and the
#: console script (``multiprocessing`` imports the parent's main module in each child).
BASE = ["distributed", "distributed.nanny", "distributed.worker", "hpcdask.entry", "hpcdask.cli",
        "hpcdask.shutdown", "hpcdask.nested", "hpcdask.warm"]
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_SERVER_PRELOAD = "hpcdask.warmstart"
_IMPORTS_ENV = "HPCDASK_WORKER_IMPORTS"  # the short form of hpcdask.worker-imports

#: True in the server and in the worker processes forked from it.
preimported = False
_server_pid = 0


def worker_imports() -> list[str]:
    """``hpcdask.worker-imports``: the modules every worker process has imported before it
    registers (once per node, in the warm server)."""
    mods = config.get("worker-imports") or []
    if isinstance(mods, str):
        mods = [m.strip() for m in mods.split(",") if m.strip()]
    if not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
        raise BadInput(f"hpcdask.worker-imports must be a list of module names, not {mods!r}; "
                       f"e.g. HPCDASK_WORKER_IMPORTS='[numpy, xarray]'")
    return mods


def enabled(nworkers: int, gpus: bool = False) -> bool:
    """Whether a command's ``nworkers`` worker processes fork from a warm server: with more than
    one (one interpreter start for the node instead of one per process). With one it would only
    add a process that holds the imports, memory the job pays for, for no faster start; GPU
    workers spawn (see above); ``warm-workers: false`` turns it off."""
    return bool(config.get("warm-workers")) and not gpus and nworkers > 1


def settings(warm: bool) -> dict[str, object]:
    """The Dask settings under which a nanny's worker processes fork from this node's warm
    server (``warm``, from :func:`enabled`), or spawn. Call before the first worker starts."""
    mods = worker_imports()  # checked on every path: spawned workers import the list too
    if not warm:
        return {METHOD: "spawn"}
    multiprocessing.get_context("forkserver").set_forkserver_preload([_SERVER_PRELOAD])
    # distributed would otherwise set its own preload list the first time it asks for the
    # context, importing each of its optional packages in the nanny to find the ones installed.
    import distributed.utils
    distributed.utils._forkserver_preload_set = True
    # The server reads its list here (a fresh interpreter: dask.config.set does not reach it).
    os.environ[_IMPORTS_ENV] = json.dumps(mods)
    return {METHOD: "forkserver"}


def start(scratch=None) -> None:
    """Start this node's warm server now (when the nanny's workers fork from one), so that its
    imports overlap the worker command's wait for the scheduler and its identity check. It gets
    the environment the nanny gives its workers before they start, as a spawned worker would.

    ``scratch``: the worker's private scratch folder, which hpcdask removes however the worker
    ends; multiprocessing's own folder (the server's socket) goes there instead of a ``pymp-*``
    folder in ``$TMPDIR``, which a worker killed at the job's end would leave behind."""
    if dask.config.get(METHOD) != "forkserver":
        return
    from multiprocessing import forkserver, process

    from distributed.nanny import _get_env_variables

    from hpcdask import shutdown

    if scratch is not None:  # multiprocessing's folder, set as its get_temp_dir() would
        process.current_process()._config.setdefault("tempdir", str(scratch))
    env = _get_env_variables("distributed.nanny.pre-spawn-environ")
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = "6640"  # the nanny's own rule: one hash seed on every worker
    os.environ.update(env)
    shutdown.start_resource_tracker()  # the server's start would start it, without USR1/USR2
    # Started with the job's signals ignored (inherited through exec until serve() takes over).
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def stop() -> None:
    """Stop this process's warm server, if it started one, and wait for it: it would otherwise
    exit a moment after this process, on the end of its connection. Its socket file goes too.
    (``ForkServer._stop``: the standard library's own stop, private, used by its tests.)"""
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        with contextlib.suppress(OSError):
            forkserver._forkserver._stop()


def load(modules: list[str]) -> None:
    """Import ``modules``; one warning line for each that fails, which is left out."""
    for name in modules:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (a user's module may raise anything on import)
            logger.warning("hpcdask: worker-imports: %s did not import (%s: %s); the workers "
                           "start without it", name, type(e).__name__, str(e).splitlines()[0]
                           if str(e) else "")


def threads() -> list[str]:
    """The names of this process's threads (the kernel's view: threads of C libraries too)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def serve(environ: dict[str, str | None]) -> None:
    """In the server (its preload, :mod:`hpcdask.warmstart`): import once, with one thread, in
    the one-thread environment :mod:`hpcdask.warmstart` made; then put back ``environ``."""
    global preimported, _server_pid
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _server_pid = os.getpid()
    os.register_at_fork(after_in_child=_forked)
    try:
        load(BASE + worker_imports())
    finally:
        for k, v in environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    running = threads()
    if len(running) > 1:
        logger.warning("hpcdask: the warm worker server runs %d threads after its imports (%s); "
                       "remove the module that starts them from hpcdask.worker-imports",
                       len(running), ", ".join(running))
    preimported = True


def _forked() -> None:
    if os.getppid() == _server_pid:  # a worker process, not a fork made by a task later on
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def size_pools(environ=None) -> dict[str, int]:
    """Size the BLAS pools, loaded with one thread in the server, as the worker's environment
    asks (as they would have sized themselves when loading in a spawned worker). OpenMP's were
    loaded with the worker's own OMP_NUM_THREADS."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return {}
    environ = os.environ if environ is None else environ
    default = len(os.sched_getaffinity(0))

    def first(*names: str) -> int:
        for n in names:
            try:
                return max(1, int(environ[n]))
            except (KeyError, ValueError):
                continue
        return default

    limits = {"openblas": first("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
              "mkl": first("MKL_NUM_THREADS", "OMP_NUM_THREADS")}
    pools = ThreadpoolController()
    for api, n in limits.items():
        pools.select(internal_api=api).limit(limits=n)
    return limits


def dask_setup(worker=None) -> None:
    """Worker preload hook: size the pools of a worker forked from the warm server, or import
    ``hpcdask.worker-imports`` in one that had none (GPU workers, dask-jobqueue's worker jobs,
    ``warm-workers: false``)."""
    if preimported:
        size_pools()
    else:
        load(worker_imports())
