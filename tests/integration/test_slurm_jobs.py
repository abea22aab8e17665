"""The jobscripts on the real Slurm test cluster (tests/cluster), every role in the test image.

Required in CI: without the cluster or the image these tests FAIL (the fixtures fail loudly).
Timings (sbatch to all workers connected, sbatch to workload done) are printed and appended
to ``$HPCDASK_MEASUREMENTS`` (default /tmp/hpcdask-measurements.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "jobscripts" / "slurm"
ALL_IN_ONE = SLURM / "dask-cluster.sbatch"
SCHEDULER = SLURM / "dask-scheduler.sbatch"
WORKERS = SLURM / "dask-workers.sbatch"
RUNNER = REPO / "tests" / "cluster" / "bin" / "apptainer"
LOCK_LABEL = "lock:" + hashlib.sha256((REPO / "containers" / "requirements.lock").read_bytes()
                                      ).hexdigest()[:16]
MEASURE = Path(os.environ.get("HPCDASK_MEASUREMENTS", "/tmp/hpcdask-measurements.jsonl"))


def measure(name: str, **values) -> None:
    print(f"MEASURE {name}: {values}")
    with MEASURE.open("a") as f:
        f.write(json.dumps({"test": name, **values}) + "\n")


@pytest.fixture
def job_env(image, tmp_path_factory):
    """What every job gets: the image and a private shared folder for its cluster folders."""
    shared = tmp_path_factory.mktemp("clusters")
    shared.chmod(0o700)
    return {"HPCDASK_IMAGE": str(image), "HPCDASK_SHARED_DIR": str(shared)}


def ready_at(res) -> float:
    """When `hpcdask wait` saw every worker (Unix time it printed)."""
    m = re.search(r"worker\(s\) ready after [\d.]+s \(at ([\d.]+)\)", res.stdout)
    assert m, str(res)
    return float(m.group(1))


def wait_for_text(res_path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = re.search(pattern, res_path.read_text(errors="replace"))
        except FileNotFoundError:
            m = None
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {res_path} after {timeout}s:\n"
                         f"{res_path.read_text(errors='replace') if res_path.exists() else ''}")


def pids_in_node(slurm_cluster, node: str, pattern: str) -> list[int]:
    """Processes on NODE (its network namespace) whose command line matches PATTERN."""
    out = subprocess.run(["ip", "netns", "pids", slurm_cluster.netns(node)],
                         capture_output=True, text=True, check=True).stdout.split()
    found = []
    for pid in out:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmd):
            found.append(int(pid))
    return found


def submit(slurm_cluster, script: Path, opts: list[str], args: list[str], env: dict,
           workdir: Path, wait: bool = True, timeout: float = 300):
    """sbatch OPTS SCRIPT ARGS (the fixture's sbatch puts no arguments after the script)."""
    out = slurm_cluster.run(["sbatch", "--parsable", *opts, f"--output={workdir}/slurm-%j.out",
                             f"--error={workdir}/slurm-%j.err", str(script), *args],
                            env=env, cwd=workdir).stdout
    job_id = out.strip().split(";")[0]
    if not wait:
        return slurm_cluster.job(job_id, workdir=workdir)
    return slurm_cluster.wait(job_id, timeout=timeout, workdir=workdir)


def metrics_of(res, workdir: Path) -> dict:
    m = re.search(r"^metrics: (\S+)$", res.stdout, re.M)
    assert m, str(res)
    return json.loads((workdir / m.group(1)).read_text())


def test_all_in_one_runs_the_default_workload_on_three_nodes(slurm_cluster, job_env, tmp_path):
    t0 = time.time()
    res = slurm_cluster.sbatch(ALL_IN_ONE, "-N3", "--time=10", env=job_env, timeout=400,
                               workdir=tmp_path)
    done = time.time()
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    metrics = metrics_of(res, tmp_path)
    workers = {k: v for k, v in metrics["roles"].items() if k.startswith("worker ")}
    addrs = {re.match(r"worker tls://([\d.]+):\d+$", k).group(1) for k in workers}
    assert len(workers) == 3 and len(addrs) == 3, metrics["roles"].keys()
    assert addrs == set(slurm_cluster.addresses.values())
    assert all(a.startswith("10.253.71.") for a in addrs)
    for role in ("scheduler", "client", *workers):
        rep = metrics["roles"][role]
        assert rep["container"] == str(Path(job_env["HPCDASK_IMAGE"]).resolve()), (role, rep)
        assert rep["image"] == LOCK_LABEL, (role, rep)
    assert metrics["score"] == metrics["baseline_score"], metrics
    assert metrics["cluster"]["workers"] == 3
    # The job's own folder (credentials included) is gone; no stray worker remains.
    assert not list(Path(job_env["HPCDASK_SHARED_DIR"]).iterdir())
    measure("all-in-one -N3 default workload", sbatch_to_workers_s=round(ready_at(res) - t0, 1),
            sbatch_to_done_s=round(done - t0, 1), workload_s=metrics["durations"]["total"])


def test_user_script_gets_a_connected_client(slurm_cluster, job_env, tmp_path):
    script = tmp_path / "my_analysis.py"
    script.write_text(
        "import sys\n"
        "import distributed\n"
        "client = distributed.get_client()\n"
        "n = len(client.scheduler_info(n_workers=-1)['workers'])\n"
        "total = client.submit(sum, range(10)).result()\n"
        "print(f'USER-SCRIPT args={sys.argv[1:]} workers={n} sum={total} '\n"
        "      f'scheduler={client.scheduler.address}')\n")
    res = submit(slurm_cluster, ALL_IN_ONE, ["-N2", "--time=5"], ["my_analysis.py", "--arg", "1"],
                 job_env, tmp_path, timeout=240)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert re.search(r"^USER-SCRIPT args=\['--arg', '1'\] workers=2 sum=45 "
                     r"scheduler=tls://10\.253\.71\.\d+:\d+$", res.stdout, re.M), str(res)


def test_user_script_exit_code_is_the_jobs(slurm_cluster, job_env, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(5)\n")
    res = submit(slurm_cluster, ALL_IN_ONE, ["-N1", "--time=5"], ["fails.py"], job_env, tmp_path,
                 timeout=240)
    assert res.exit_code == 5, str(res)
    assert "client ended (exit 5)" in res.stderr


RETIRE_SCRIPT = r'''
import os, sys, time
import distributed
import numpy as np

marks = sys.argv[1]
client = distributed.get_client()
client.wait_for_workers(2, timeout=120)
workers = sorted(client.scheduler_info(n_workers=-1)["workers"])

def block(i):
    open(os.path.join(marks, f"{i}-{time.time_ns()}"), "w").close()
    return np.full(200_000, i, dtype="f8")

futs = client.map(block, range(24), pure=False)
distributed.wait(futs)
held = {w: len(keys) for w, keys in client.has_what().items()}
print(f"HELD {held}", flush=True)
t0 = time.time()
while len(client.scheduler_info(n_workers=-1)["workers"]) > 1:
    assert time.time() - t0 < 120, "no worker retired"
    time.sleep(0.5)
print(f"RETIRED after {time.time() - t0:.1f}s; left {sorted(client.has_what())}", flush=True)
sums = [float(x.sum()) for x in client.gather(futs)]
assert sums == [200_000.0 * i for i in range(24)], sums
runs = len(os.listdir(marks))
print(f"RESULT ok runs={runs}", flush=True)

from hpcdask.workloads import execute
path = execute(client, "pipeline", "small", 0, sys.argv[2])
print(f"metrics: {path}", flush=True)
'''


def test_scheduler_job_and_short_worker_jobs(slurm_cluster, job_env, tmp_path):
    cdir = Path(job_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**job_env, "HPCDASK_CLUSTER_DIR": str(cdir)}
    t0 = time.time()
    sched = slurm_cluster.sbatch(SCHEDULER, "--time=5", env=env, wait=False, workdir=tmp_path)
    jobs = [sched.job_id]
    try:
        # A retires ~25 s after it starts (1 min limit - 35 s margin), well before its limit.
        short = slurm_cluster.sbatch(WORKERS, "--time=1", wait=False, workdir=tmp_path,
                                     env={**env, "HPCDASK_LIFETIME_MARGIN": "35s",
                                          "HPCDASK_LIFETIME_STAGGER": "1s"})
        jobs.append(short.job_id)
        long = slurm_cluster.sbatch(WORKERS, "--time=5", env=env, wait=False, workdir=tmp_path)
        jobs.append(long.job_id)
        script = tmp_path / "retire.py"
        script.write_text(RETIRE_SCRIPT)
        marks = tmp_path / "marks"
        marks.mkdir()
        out = slurm_cluster.srun(
            "-N1", "--time=4", str(RUNNER), "exec", str(job_env["HPCDASK_IMAGE"]), "hpcdask",
            "client", "--scheduler-file", str(cdir / "scheduler.json"), "--", str(script),
            str(marks), str(tmp_path / "out"), env=env, timeout=200, cwd=tmp_path)
        done = time.time()
        text = out.stdout
        assert "RESULT ok runs=24" in text, text + out.stderr  # nothing recomputed: data moved
        held = eval(re.search(r"^HELD (.*)$", text, re.M).group(1))  # noqa: S307 - our own dict
        assert len(held) == 2 and all(held.values()), held  # both workers held results
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert metrics["score"] == metrics["baseline_score"]
        # The short job's worker retired before the time limit: the job ended on its own.
        res = slurm_cluster.wait(short.job_id, timeout=90, workdir=tmp_path)
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert "workers ended (exit 0)" in res.stderr, str(res)
        measure("scheduler job + worker jobs", sbatch_to_done_s=round(done - t0, 1),
                retired=re.search(r"RETIRED after ([\d.]+)s", text).group(1))
    finally:
        for j in jobs:
            slurm_cluster.run(["scancel", j], check=False)
    res = slurm_cluster.wait(sched.job_id, timeout=60, workdir=tmp_path)
    assert not (cdir / "scheduler.json").exists()


def test_a_killed_worker_does_not_lose_the_workload(slurm_cluster, job_env, tmp_path):
    t0 = time.time()
    job = slurm_cluster.sbatch(ALL_IN_ONE, "-N3", "--time=10", env=job_env, wait=False,
                               workdir=tmp_path)
    err = tmp_path / f"slurm-{job.job_id}.err"
    try:
        wait_for_text(err, r"fit on the cluster \.\.\.", 240)
        victim = slurm_cluster.nodes[-1]
        pids = pids_in_node(slurm_cluster, victim, r"hpcdask worker|multiprocessing|bwrap")
        assert pids, "no worker processes found on " + victim
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        killed = time.time()
        res = slurm_cluster.wait(job.job_id, timeout=400, workdir=tmp_path)
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    metrics = metrics_of(res, tmp_path)
    assert metrics["score"] == metrics["baseline_score"], metrics
    assert metrics["cluster"]["workers"] == 2  # the killed one did not come back
    measure("worker killed mid-workload", killed_after_s=round(killed - t0, 1),
            sbatch_to_done_s=round(time.time() - t0, 1))


def test_a_killed_scheduler_ends_the_job(slurm_cluster, job_env, tmp_path):
    script = tmp_path / "long.py"
    script.write_text("import time, distributed\n"
                      "c = distributed.get_client()\n"
                      "print('STARTED', flush=True)\n"
                      "for _ in range(3000):\n"
                      "    c.submit(time.sleep, 0.1, pure=False).result()\n")
    job = submit(slurm_cluster, ALL_IN_ONE, ["-N3", "--time=10"], ["long.py"], job_env, tmp_path,
                 wait=False)
    out = tmp_path / f"slurm-{job.job_id}.out"
    try:
        wait_for_text(out, "STARTED", 180)
        first = slurm_cluster.nodes[0]
        pids = pids_in_node(slurm_cluster, first, rf"python\S* \S*hpcdask scheduler .*job-{job.job_id}/")
        assert len(pids) == 1, pids
        os.kill(pids[0], 9)
        killed = time.monotonic()
        res = slurm_cluster.wait(job.job_id, timeout=90, workdir=tmp_path)
        took = time.monotonic() - killed
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    assert res.exit_code not in (0, None), str(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("hpcdask-job: error:")]
    assert lines == ["hpcdask-job: error: the scheduler ended (exit 137) while the client was "
                     "running; stopping the job"], str(res)
    assert took < 45, took
    deadline = time.monotonic() + 20
    while subprocess.run(["pgrep", "-f", "hpcdask worker"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, subprocess.run(
            ["pgrep", "-af", "hpcdask worker"], capture_output=True, text=True).stdout
        time.sleep(0.5)
    measure("scheduler killed", kill_to_job_end_s=round(took, 1))


def test_wrong_interface_fails_fast_listing_the_interfaces(slurm_cluster, job_env, tmp_path):
    t0 = time.monotonic()
    res = slurm_cluster.sbatch(ALL_IN_ONE, "-N2", "--time=5", env={**job_env,
                               "HPCDASK_INTERFACE": "ib9"}, timeout=120, workdir=tmp_path)
    took = time.monotonic() - t0
    assert res.state == "FAILED" and res.exit_code == 2, str(res)
    lines = [ln for ln in res.stderr.splitlines() if "interfaces here" in ln]
    assert len(lines) == 1, str(res)
    assert re.search(r"interface 'ib9' does not exist on \S+; interfaces here: "
                     r"ib0 \(10\.253\.71\.\d+\), lo \(127\.0\.0\.1\); pass one: --interface ib0",
                     lines[0]), lines
    assert took < 30, took
    measure("wrong interface", sbatch_to_failure_s=round(took, 1))


def test_missing_image_fails_before_anything_starts(slurm_cluster, job_env, tmp_path):
    res = slurm_cluster.sbatch(ALL_IN_ONE, "-N1", "--time=2", timeout=60, workdir=tmp_path,
                               env={**job_env, "HPCDASK_IMAGE": str(tmp_path / "nope.sif")})
    assert res.exit_code == 2, str(res)
    assert res.stderr.strip().splitlines() == [
        f"hpcdask-job: error: image {tmp_path / 'nope.sif'} does not exist (HPCDASK_IMAGE); "
        f"build it (make sif) or point HPCDASK_IMAGE at it"], str(res)
