"""The recipes of issue 14 that run without Slurm, with real processes on loopback (TLS):
provenance.json and ``versions --against`` (local and live cluster), GPU workers' environment
(a fake nvidia-smi: no GPU here), JupyterLab next to a cluster (token, loopback only, a
notebook run headless, a real headless Chromium screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from hpcdask import launch

from integration.test_roles import HPCDASK, start, stop, wait_workers

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HPCDASK_TEST_ARTIFACTS", REPO / "test-artifacts"))
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def scheduler(d: Path, env=None) -> tuple[subprocess.Popen, Path]:
    path = d / "scheduler.json"
    proc = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo"],
                 d.parent / f"{d.name}-scheduler.log", env)
    deadline = time.time() + 60
    while not path.exists():
        assert proc.poll() is None, (d.parent / f"{d.name}-scheduler.log").read_text()
        assert time.time() < deadline, "no scheduler file"
        time.sleep(0.1)
    return proc, path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes") / "cluster"
    sched, path = scheduler(d)
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo",
                    "--nworkers", "1", "--nthreads", "2", "--memory-limit", "1GiB"],
                   d.parent / "worker.log")
    try:
        wait_workers(path, 1)
        yield {"path": path, "dir": d, "logs": d.parent}
    finally:
        stop(sched)
        stop(worker)


def hpcdask(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*HPCDASK, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


# --- provenance -----------------------------------------------------------------------------

def check_record(rec: dict, exit_status: int) -> None:
    assert rec["kind"] == "hpcdask-provenance" and rec["format"] == 1
    assert rec["exit_status"] == exit_status
    assert rec["started"] <= rec["ended"]
    assert set(rec["image"]) == {"path", "identity", "info"}
    assert rec["image"]["identity"]["image"] == "none (bare venv)"
    roles = rec["roles"]
    assert "scheduler" in roles and "client" in roles
    assert any(r.startswith("worker tls://127.0.0.1:") for r in roles)
    for r in roles.values():
        assert r["python"] and r["packages"]["distributed"] and "dask_config" in r
    assert rec["addresses"]["scheduler"].startswith("tls://127.0.0.1:")
    assert rec["tls"]["certificate_sha256"].startswith("sha256:")
    assert len(rec["tls"]["certificate_sha256"]) == len("sha256:") + 64
    assert "PRIVATE KEY" not in json.dumps(rec)


def test_run_on_a_cluster_writes_provenance_and_checks_against_it(cluster, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}
    proc = hpcdask("run", "--workload", "smoke", "--scheduler-file", str(cluster["path"]),
                   "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert (out / "metrics.json").exists()
    check_record(rec, 0)
    assert rec["job"]["id"] == "4242"
    # The client's environment changed one Dask setting: recorded as such, and only there.
    assert rec["roles"]["client"]["dask_config"]["distributed.scheduler.work-stealing"] is False
    assert "distributed.scheduler.work-stealing" not in rec["roles"]["scheduler"]["dask_config"]
    from hpcdask.security import load
    from hpcdask.provenance import cert_fingerprint
    assert rec["tls"]["certificate_sha256"] == cert_fingerprint(str(load(cluster["dir"]).cert))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left

    # The same live cluster against its own record: identical, exit 0.
    same = hpcdask("versions", "--scheduler-file", str(cluster["path"]),
                   "--against", str(out / "provenance.json"))
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith(f"same as {out / 'provenance.json'}: 3 role(s)")
    # An earlier run that had another numpy and Python: both differences shown, exit 1.
    old = json.loads((out / "provenance.json").read_text())
    old["roles"]["scheduler"]["packages"]["numpy"] = "1.0.0"
    old["roles"]["scheduler"]["python"] = "3.9.1"
    (tmp_path / "old.json").write_text(json.dumps(old))
    diff = hpcdask("versions", "--scheduler-file", str(cluster["path"]),
                   "--against", str(tmp_path / "old.json"))
    assert diff.returncode == 1, diff.stderr
    assert "DIFFERENT from" in diff.stderr and "numpy 1.0.0 != " in diff.stderr
    assert "python 3.9.1 != " in diff.stderr
    table = diff.stderr.splitlines()[1:]
    assert table[0].split()[:2] == ["package", "recorded"]
    assert any(line.split()[:2] == ["numpy", "1.0.0"] for line in table)


def test_local_run_writes_provenance_and_versions_against_the_local_environment(tmp_path):
    out = tmp_path / "out"
    proc = hpcdask("run", "--workload", "smoke", "--n-workers", "1", "--memory-limit", "1GiB",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    check_record(rec, 0)
    assert rec["tls"]["ca_sha256"].startswith("sha256:")  # Security.temporary()'s, from memory
    same = hpcdask("versions", "--against", str(out / "provenance.json"))
    assert same.returncode == 0, same.stderr
    assert "1 role(s)" in same.stdout
    old = dict(rec)
    old["roles"] = {"scheduler": {**rec["roles"]["scheduler"],
                                  "packages": {**rec["roles"]["scheduler"]["packages"],
                                               "dask": "2020.1.0"}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    diff = hpcdask("versions", "--against", str(tmp_path / "old.json"))
    assert diff.returncode == 1
    assert "dask 2020.1.0 != " in diff.stderr and "(this environment)" in diff.stderr


def test_failed_run_records_its_exit_status(cluster, tmp_path):
    """A run whose workload fails still says what it ran on, with the failure's exit status."""
    out = tmp_path / "out"
    env = {**os.environ, "HPCDASK_SIZE": "tiny"}  # refused by the runner, after connecting
    proc = hpcdask("run", "--workload", "smoke", "--scheduler-file", str(cluster["path"]),
                   "--output", str(out), env=env)
    assert proc.returncode == 2, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["exit_status"] == 2 and not (out / "metrics.json").exists()


# --- GPUs (no GPU here: a fake nvidia-smi; what is checked is each worker's environment) ----

def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    (b / name).write_text(f"#!/bin/sh\n{body}\n")
    (b / name).chmod(0o755)
    return b


def test_gpu_workers_one_per_gpu_each_with_its_own_device_first(cluster, tmp_path):
    b = fake_bin(tmp_path, "nvidia-smi", 'echo 0; echo 1; echo 2')
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "HPCDASK_GPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with launch.connect(cluster["path"], check=False) as c:
        before = set(c.scheduler_info(n_workers=-1)["workers"])
        w = start(["worker", "--scheduler-file", str(cluster["path"]), "--interface", "lo",
                   "--nthreads", "1", "--memory-limit", "300MiB"], tmp_path / "gpu.log", env)
        try:
            c.wait_for_workers(len(before) + 3, timeout=90)
            new = set(c.scheduler_info(n_workers=-1)["workers"]) - before
            seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), workers=list(new))
            assert sorted(seen.values()) == ["0,1,2", "1,2,0", "2,0,1"]
            info = c.scheduler_info(n_workers=-1)["workers"]
            assert all(info[a]["resources"] == {"GPU": 1} for a in new)
        finally:
            assert stop(w) == 0, (tmp_path / "gpu.log").read_text()


def test_gpu_workers_follow_the_batch_systems_devices(cluster, tmp_path):
    """Slurm's --gres sets CUDA_VISIBLE_DEVICES: those GPUs (not nvidia-smi's list) are used."""
    b = fake_bin(tmp_path, "nvidia-smi", "exit 9")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "5,7"}
    with launch.connect(cluster["path"], check=False) as c:
        before = set(c.scheduler_info(n_workers=-1)["workers"])
        w = start(["worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", "--nthreads", "1", "--memory-limit", "300MiB"], tmp_path / "gpu.log", env)
        try:
            c.wait_for_workers(len(before) + 2, timeout=90)
            new = set(c.scheduler_info(n_workers=-1)["workers"]) - before
            seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), workers=list(new))
            assert sorted(seen.values()) == ["5,7", "7,5"]
        finally:
            assert stop(w) == 0


def test_gpu_worker_without_a_gpu_is_one_line_exit_2(cluster, tmp_path):
    b = fake_bin(tmp_path, "nvidia-smi", "exit 9")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = hpcdask("worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "shows no GPU" in proc.stderr and "--gres=gpu:N" in proc.stderr


def test_gpu_worker_hands_over_to_dask_cuda_when_installed(cluster, tmp_path):
    """With dask-cuda in the environment its CUDAWorker runs the GPU workers, given hpcdask's
    TLS, interface and sizing (a stand-in dask_cuda records what it was given: no CUDA here)."""
    pkg = tmp_path / "site" / "dask_cuda"
    pkg.mkdir(parents=True)
    record = tmp_path / "cuda.json"
    (pkg / "__init__.py").write_text(
        "import json, os\n"
        "class CUDAWorker:\n"
        "    def __init__(self, scheduler, **kw):\n"
        f"        json.dump(dict(scheduler=scheduler, cvd=os.environ['CUDA_VISIBLE_DEVICES'],\n"
        "            tls=kw['security'].require_encryption, ca=bool(kw['security'].tls_ca_file),\n"
        "            host=kw['host'], nthreads=kw['nthreads'], memory_limit=kw['memory_limit']),\n"
        f"            open({str(record)!r}, 'w'))\n"
        "    def __await__(self):\n"
        "        raise SystemExit(0)\n"
        "        yield\n")
    b = fake_bin(tmp_path, "nvidia-smi", "echo 0; echo 1")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "PYTHONPATH": str(pkg.parent)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = hpcdask("worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", "--nthreads", "2", "--memory-limit", "1GiB", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    address = json.loads(cluster["path"].read_text())["address"]
    assert got == {"scheduler": address, "cvd": "0,1", "tls": True, "ca": True,
                   "host": "127.0.0.1", "nthreads": 2, "memory_limit": 2**30}
