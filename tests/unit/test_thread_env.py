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
