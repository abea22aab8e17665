"""Session fixtures shared by every test folder: the Slurm test cluster and the test image (as a
sandbox folder, ``image``, and as a SIF file, ``sif``).

All are required in CI: when either cannot be made the tests that use it FAIL, never skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster.fixtures import job_env, slurm_cluster, udir  # noqa: E402, F401


def _built(script: str, what: str, ok) -> Path:
    """``python tests/cluster/SCRIPT build`` (cached): the path it prints last, checked by OK.
    Fails, never skips, when nothing is built: these tests run in CI."""
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "cluster" / script), "build"],
            capture_output=True, text=True, timeout=3600, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"building {what} failed: {exc}", pytrace=False)
    lines = proc.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if proc.returncode != 0 or path is None or not ok(path):
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        pytest.fail(f"tests/cluster/{script} build exited {proc.returncode} without {what} "
                    f"(required: these tests run in CI)\n{tail}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def image() -> Path:
    """The test image (a sandbox folder): ``python tests/cluster/image.py build`` (cached), its path."""
    return _built("image.py", "an image", Path.is_dir)


@pytest.fixture(scope="session")
def sif() -> Path:
    """The image as a SIF file: ``python tests/cluster/sif.py build`` (the sandbox of ``image``,
    assembled like ``apptainer build`` does; cached under $HPCDASK_TEST_CACHE by the same input
    key), its path."""
    return _built("sif.py", "a SIF", Path.is_file)


# --- CI: a required test that skips is a failure ------------------------------------------------
# The end-to-end test of each required kind that must pass in a whole-suite CI run.
REQUIRED = {
    "image": ("tests/integration/test_image.py::test_apptainer_test_passes",),  # the image's %test
    "compose": ("tests/integration/test_compose.py::test_compose_cluster",  # its client's work
                "tests/integration/test_compose_docker.py::"
                "test_readme_commands_ten_times_each_run_its_own_folder_owned_by_the_user"),
    "slurm": (
        "tests/integration/test_slurm_jobs.py::test_user_script_gets_a_connected_client",
        "tests/integration/test_slurm_jobs.py::test_all_in_one_runs_the_default_workload_medium_on_three_nodes",
        "tests/integration/test_slurm_jobs.py::test_scheduler_job_and_short_worker_jobs",
        "tests/integration/test_slurm_cluster_helper.py::test_slurm_cluster_scales_on_the_test_cluster",
    ),
}


def pytest_configure(config):
    from ciguard import CIGuard

    config.pluginmanager.register(CIGuard(REPO / "tests", REQUIRED), "hpcdask-ci-guard")
