"""Session fixtures shared by every test folder: the Slurm test cluster and the test image.

Both are required in CI: when either cannot be made the tests that use it FAIL, never skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster.fixtures import job_env, slurm_cluster, udir  # noqa: E402, F401


@pytest.fixture(scope="session")
def image() -> Path:
    """The test image (a sandbox folder): ``python tests/cluster/image.py build`` (cached), its path."""
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "cluster" / "image.py"), "build"],
            capture_output=True, text=True, timeout=3600, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"building the test image failed: {exc}", pytrace=False)
    lines = proc.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if proc.returncode != 0 or path is None or not path.is_dir():
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        pytest.fail(f"tests/cluster/image.py build exited {proc.returncode} without an image "
                    f"(required: these tests run in CI)\n{tail}", pytrace=False)
    return path


# --- CI: a required test that skips is a failure ------------------------------------------------
REQUIRED_MARKERS = ("image", "compose", "slurm")


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true, fail the run when any test skipped, or when no test of a required kind
    (image, compose, Slurm cluster) passed: the full suite must really run there."""
    import os

    if not os.environ.get("CI") or session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    problems = [f"skipped in CI: {r.nodeid} ({r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr})"
                for r in reporter.stats.get("skipped", [])]
    whole = [Path(a).resolve() for a in session.config.args] == [REPO / "tests"]
    if whole and not session.config.option.markexpr and not session.config.option.keyword:
        passed = reporter.stats.get("passed", [])
        for marker in REQUIRED_MARKERS:
            if not any(marker in r.keywords for r in passed):
                problems.append(f"no '{marker}' test passed: the {marker} tests must run in CI")
    if problems:
        reporter.write_line("")
        for p in problems:
            reporter.write_line(f"CI GUARD: {p}", red=True, bold=True)
        session.exitstatus = 1
