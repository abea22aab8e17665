"""Session fixtures shared by every test folder: the test image (as a sandbox folder, ``image``,
and as a SIF file, ``sif``) and the Slurm test cluster, from the test-cluster package
(tests/testcluster, importable because pytest puts tests/ on sys.path: pyproject.toml).

All are required in CI: when either cannot be made the tests that use it FAIL, never skip.

Test folders by what they need: unit (nothing: no root, no image), loopback (real processes on
127.0.0.1), image (the test image through the bubblewrap runner; root), slurm (the test cluster),
sge (the test cluster with Grid Engine, BATCH=sge),
compose (podman), testcluster/tests (the runner and the CI guard themselves), bench/tests.
"""

from __future__ import annotations

from pathlib import Path

from testcluster import fixtures
from testcluster.fixtures import (changed_sif_build, image, job_env, rebuilt_sif_cache, sif,  # noqa: F401
                                  slurm_cluster, udir)
from testcluster.sge_fixtures import sge_cluster, sge_env, sge_udir  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


# --- CI: a required test that skips is a failure ------------------------------------------------
# The end-to-end test of each required kind that must pass in a whole-suite CI run.
REQUIRED = {
    "image": ("tests/image/test_image.py::test_apptainer_test_passes",),  # the image's %test
    "compose": ("tests/compose/test_compose.py::test_compose_cluster",  # its client's work
                "tests/compose/test_compose_docker.py::"
                "test_readme_commands_a_second_and_a_tenth_time_each_in_its_own_folder_owned_by_the_user"),
    "slurm": (
        "tests/slurm/test_slurm_jobs.py::test_user_script_gets_a_connected_client",
        "tests/slurm/test_slurm_jobs.py::test_all_in_one_runs_the_default_workload_medium_on_three_nodes",
        "tests/slurm/test_slurm_jobs.py::test_scheduler_job_and_short_worker_jobs",
        "tests/slurm/test_slurm_cluster_helper.py::test_slurm_cluster_scales_on_the_test_cluster",
    ),
    "sge": ("tests/sge/test_sge_jobs.py::test_scheduler_job_with_a_script_and_an_array_of_three_worker_tasks",),
}


def pytest_configure(config):
    # (Declared here, not in pyproject.toml, which is an input of the test image.)
    config.addinivalue_line("markers", "sge: needs the Grid Engine test cluster (BATCH=sge tests/testcluster/cluster.sh)")
    config.addinivalue_line("markers", "run_last: runs after every other test (it waits for work "
                            "started in the background at the session's start)")
    from testcluster.ciguard import CIGuard

    roots = [config.rootpath / p for p in config.getini("testpaths")]
    config.pluginmanager.register(CIGuard(roots, REQUIRED), "hpcdask-ci-guard")


def pytest_collection_modifyitems(items):
    last = [item for item in items if item.get_closest_marker("run_last")]
    items[:] = [item for item in items if not item.get_closest_marker("run_last")] + last


def pytest_collection_finish(session):
    fixtures.prebuild(session.items)  # the SIF builds while the first tests run


def pytest_sessionfinish(session):
    fixtures.end_prebuild()
