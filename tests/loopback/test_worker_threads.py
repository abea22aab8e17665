"""How a fit on a worker started by the CLI sees the node: its BLAS/OpenMP threads
(threadpoolctl, inside a task) and its slots (joblib's ``effective_n_jobs`` under the dask
backend, as scikit-learn's ``n_jobs=-1`` gets them), sized from the allocation so that
workers x threads x BLAS threads fill the node's CPUs and never exceed them; and a joblib call
nested in a task runs in that task (issue 21)."""

from __future__ import annotations

import os
import time

import joblib
import pytest

from hpcdask import connect
from test_roles import start, stop, wait_workers

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("nworkers,nthreads", [(1, 1), (1, 2), (2, 1)])
def test_blas_threads_and_slots_fill_the_allocation(tmp_path, nworkers, nthreads):
    def how_a_fit_sees_the_cluster() -> dict:
        """Run as a task: what a scikit-learn fit on this worker gets."""
        import joblib
        from threadpoolctl import threadpool_info

        with joblib.parallel_backend("dask"):
            slots = joblib.effective_n_jobs(-1)
        return {"blas": sorted({p["num_threads"] for p in threadpool_info()
                                if p["internal_api"] in ("openblas", "mkl", "blis")}),
                "openmp": sorted({p["num_threads"] for p in threadpool_info()
                                  if p["internal_api"] == "openmp"}),
                "slots": slots}

    def fit_with_nested_call(i) -> tuple:
        """Like LogisticRegression.fit: a nested Parallel that asks for no parallelism."""
        import threading

        import joblib

        inner = joblib.Parallel()(joblib.delayed(threading.get_ident)() for _ in range(2))
        return threading.get_ident(), inner

    cpus = 2  # the node's allocation, as Slurm gives it; the machine may have more or fewer
    path = tmp_path / "cluster" / "scheduler.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SLURM_CPUS_ON_NODE"] = str(cpus)
    # scikit-learn's OpenMP and NumPy's OpenBLAS loaded in the warm server, before the fork
    env["HPCDASK_WORKER_IMPORTS"] = "[numpy, sklearn]"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo"],
                  tmp_path / "scheduler.log")
    worker = None
    try:
        deadline = time.time() + 60
        while not path.exists():
            assert sched.poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.time() < deadline, "no scheduler file"
            time.sleep(0.1)
        worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo",
                        "--nworkers", str(nworkers), "--nthreads", str(nthreads),
                        "--memory-limit", "1GiB"], tmp_path / "worker.log", env=env)
        wait_workers(path, nworkers)
        with connect.connect(path, check=False) as client:
            # defined in the test: sent by value (the workers cannot import the test modules)
            seen = client.submit(how_a_fit_sees_the_cluster, pure=False).result(timeout=120)
            with joblib.parallel_backend("dask"):
                calls = joblib.Parallel(n_jobs=-1)(joblib.delayed(fit_with_nested_call)(i)
                                                   for i in range(2))
    finally:
        stop(sched)
        if worker is not None:
            stop(worker)
    blas = cpus // (nworkers * nthreads)
    assert seen["blas"] == [blas], seen  # Dask's nanny alone: always [1]
    assert seen["openmp"] == [blas], seen
    assert seen["slots"] == nworkers * nthreads, seen  # joblib's n_jobs=-1: one per task thread
    assert nworkers * nthreads * blas <= cpus
    # the nested calls ran in the task that made them, not as tasks of their own
    # (joblib's dask backend alone: new tasks, on other threads, while the caller secedes)
    for outer, inner in calls:
        assert inner == [outer, outer], calls

