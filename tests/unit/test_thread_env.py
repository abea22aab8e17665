"""The workers' BLAS/OpenMP thread sizing from the allocation (issue 21); the real workers are
checked in tests/integration/test_worker_threads.py."""

from __future__ import annotations

from hpcdask import memory

ALL = memory.BLAS_THREAD_VARIABLES


def test_the_cpus_left_by_the_task_threads():
    assert memory.thread_env(8, 2, 2, {}) == dict.fromkeys(ALL, "2")
    assert memory.thread_env(8, 1, 1, {}) == dict.fromkeys(ALL, "8")
    assert memory.thread_env(2, 2, 2, {}) == dict.fromkeys(ALL, "1")  # never below one
    assert memory.thread_env(3, 2, 1, {}) == dict.fromkeys(ALL, "1")  # never above the CPUs


def test_a_users_setting_wins():
    assert memory.thread_env(8, 1, 1, {"OMP_NUM_THREADS": "3"}) == dict.fromkeys(ALL, "3")
    assert memory.thread_env(8, 1, 1, {"MKL_NUM_THREADS": "4"}) == {
        "OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}


def test_a_forked_worker_sizes_the_pools_it_loaded_with_one_thread():
    """hpcdask.warm: the warm server loads the BLAS pools with one thread; each forked worker then
    sizes them as its environment (the nanny's pre-spawn-environ) says, as a spawned one would."""
    import os

    import numpy  # noqa: F401  (loads OpenBLAS)
    from threadpoolctl import threadpool_info, threadpool_limits

    from hpcdask import warm

    with threadpool_limits(limits=1):
        assert warm.size_pools({"OMP_NUM_THREADS": "2"}) == {"openblas": 2, "mkl": 2}
        assert {p["num_threads"] for p in threadpool_info()
                if p["internal_api"] == "openblas"} == {2}
        cpus = len(os.sched_getaffinity(0))  # nothing set: the libraries' own default
        assert warm.size_pools({"OPENBLAS_NUM_THREADS": "3"}) == {"openblas": 3, "mkl": cpus}
