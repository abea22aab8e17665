"""Worker preload: a joblib call nested in a Dask task runs in that task unless it asks for more.

Under ``joblib.parallel_backend("dask")`` every task that joblib sends (a batch of calls) runs
with the dask backend as its default, and that backend ignores ``n_jobs`` (joblib/joblib#1013):
a nested ``Parallel`` that asked for nothing, like the one ``LogisticRegression.fit`` makes
around its single lbfgs path (``n_jobs=None``), becomes one more task. The fit then ships its
transformed training data back through the scheduler, secedes from the worker's thread pool
and waits, and the freed slot starts another fit: more fits than cores, each slower. Profiled
in a worker of the gridsearch workload (py-spy, issue 21), the task threads spent most of their
time in ``Parallel._retrieve`` under ``LogisticRegression.fit``.

Here nested calls default to ``n_jobs=1``, which the dask backend then honours, so they run in
the task that makes them, on the BLAS threads the worker was given; a nested call that asks for
``n_jobs=-1`` (or any number) still goes to the cluster as before. Installed in every worker
hpcdask starts (``preload``); the client's own ``Parallel`` calls are unchanged.
"""

from __future__ import annotations

#: The preload modules of every worker hpcdask starts (Nanny, LocalCluster, dask-cuda).
WORKER_PRELOAD = ["hpcdask.shutdown", "hpcdask.nested", "hpcdask.warm"]


def install() -> bool:
    """Patch joblib's dask backend in this process; idempotent. False without joblib."""
    try:
        from joblib import _dask, parallel_config
    except ImportError:
        return False
    backend = _dask.DaskDistributedBackend
    if getattr(backend, "_hpcdask_nested", False):
        return True
    ignores_n_jobs = backend.effective_n_jobs

    def effective_n_jobs(self, n_jobs):
        return 1 if n_jobs == 1 else ignores_n_jobs(self, n_jobs)

    def call(self, tasks=None):
        with parallel_config(backend="dask", n_jobs=1):
            return [func(*args, **kwargs) for func, args, kwargs in tasks]

    backend.effective_n_jobs = effective_n_jobs
    _dask.Batch.__call__ = call
    backend._hpcdask_nested = True
    return True


def dask_setup(worker=None) -> None:
    """Preload hook (in the worker process, and harmlessly in a nanny)."""
    install()
