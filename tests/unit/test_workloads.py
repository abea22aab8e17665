"""The workload registry: listing, one-line descriptions, name suggestions, fast listing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpcdask import workloads
from hpcdask.errors import BadInput

EXPECTED = {"pipeline", "smoke", "incremental", "hyperband", "gridsearch", "predict", "kmeans",
            "etl", "xgboost", "collections"}


def hpcdask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcdask", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_registry_has_every_workload():
    assert EXPECTED <= set(workloads.WORKLOADS)
    for name, description in workloads.describe().items():
        assert description.strip() and "\n" not in description, name
        assert len(description) < 200, name


def test_list_shows_every_workload_on_one_line():
    r = hpcdask("run", "--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(workloads.WORKLOADS)
    names = [line.split()[0] for line in lines]
    assert set(names) == set(workloads.WORKLOADS)
    for line in lines:
        name, description = line.split(None, 1)
        assert description == workloads.describe()[name]


def test_unknown_workload_suggests_the_closest():
    r = hpcdask("run", "--workload", "hyperbnd")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "did you mean --workload hyperband" in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("typo,name", [("xgbost", "xgboost"), ("kmean", "kmeans"),
                                       ("grdsearch", "gridsearch"), ("colections", "collections"),
                                       ("incremntal", "incremental")])
def test_resolve_suggests(typo, name):
    with pytest.raises(BadInput, match=f"did you mean --workload {name}"):
        workloads.resolve(typo)


def test_listing_imports_no_heavy_package():
    """Imports live inside run(): listing the workloads must stay fast."""
    code = ("import sys; from hpcdask import workloads; workloads.describe(); "
            "heavy = {'sklearn', 'dask_ml', 'xgboost', 'matplotlib', 'pandas', 'dask.array'}; "
            "print(sorted(heavy & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("limit", [400 * 2**20, 4 * 2**30, 64 * 2**30])
@pytest.mark.parametrize("size", ["small", "medium", "large"])
@pytest.mark.parametrize("nworkers", [1, 2, 16])
def test_incremental_data_is_larger_than_a_worker(limit, size, nworkers):
    from types import SimpleNamespace

    from hpcdask.workloads import incremental

    ctx = SimpleNamespace(size=size, nworkers=nworkers,
                          pick=lambda s, m, l: {"small": s, "medium": m, "large": l}[size])
    p = incremental.plan(ctx, limit)
    data_bytes = p["rows"] * p["nblocks"] * incremental.D * 8
    assert data_bytes > limit
    # one partial_fit batch of blocks (with their scaled copies) fits well within one worker
    block_bytes = p["rows"] * (incremental.D + 1) * 8
    assert 3 * p["batch"] * block_bytes < limit
