"""``hpcdask run``: a workload on a LocalCluster of this machine (the embedded default), or on
the cluster given, with its provenance recorded."""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client
from distributed.security import Security

from hpcdask import batch, connect, files, memory, nested, provenance, security, signals, warm


def local_cluster(n_workers: int | None = None, threads_per_worker: int | None = None,
                  tls: bool = True, memory_limit: str | None = None):
    """The embedded default: a LocalCluster sized to the machine, TLS on loopback; its workers'
    scratch (a private folder) is removed once it is gone, at the latest when Python exits."""
    from distributed import LocalCluster

    n, threads, mem = memory.local_sizing(n_workers, threads_per_worker, memory_limit)
    kwargs: dict[str, Any] = dict(n_workers=n, threads_per_worker=threads, memory_limit=mem,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  preload=nested.WORKER_PRELOAD, worker_class=memory.nanny_class(),
                                  silence_logs=logging.WARNING)
    if tls:
        kwargs.update(security=Security.temporary(), protocol="tls://")
    else:
        security.warn_no_tls("the local cluster")
    d = tempfile.mkdtemp(prefix="hpcdask-", dir=files.local_directory(None))
    try:
        # Its worker processes fork from one warm server too (a nanny's later restart spawns).
        with dask.config.set({**memory.blas_config(batch.allocation().cpus, n, threads),
                              **warm.settings(warm.enabled(n))}):
            warm.start()
            cluster = LocalCluster(local_directory=d, **kwargs)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    weakref.finalize(cluster, shutil.rmtree, d, True)
    return cluster


def run_workload(name: str, size: str, seed: int, output: Path, scheduler_file: Path | None,
                 address: str | None, tls: bool = True, wait_workers: int = 0,
                 wait_timeout: float = 300.0, n_workers: int | None = None,
                 threads_per_worker: int | None = None, memory_limit: str | None = None) -> Path:
    """Workload ``name`` on the cluster given (``scheduler_file`` or ``address``), else on a
    LocalCluster; provenance.json beside its metrics. Returns the metrics file."""
    from hpcdask import workloads

    if memory_limit:
        memory.parse_bytes(memory_limit)
    workloads.check_output(output)
    if scheduler_file or address:
        from hpcdask import compat
        compat.apply()  # imports dask-ml (~2 s): now, while the workers start, not after they have
    with provenance.Recorder(output, provenance.command_line()) as record, \
            signals.terminate_cleanly() as term:
        if scheduler_file or address:
            with connect.connect(scheduler_file, address, tls=tls, check=False,
                                wait_workers=wait_workers, wait_timeout=wait_timeout) as client:
                record.cluster(client)
                path = term.run(client, workloads.execute, client, name, size, seed, output)
        else:
            with local_cluster(n_workers, threads_per_worker, tls=tls,
                               memory_limit=memory_limit) as cluster, Client(cluster) as client:
                record.cluster(client)
                path = term.run(client, workloads.execute, client, name, size, seed, output,
                                local=True)
    return path
