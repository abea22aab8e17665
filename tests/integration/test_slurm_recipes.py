"""Issue 14's recipes on the strict Slurm test cluster: worker job arrays
(``sbatch --array=1-3 dask-workers.sbatch``) joining a scheduler job, and adaptive scaling of
``hpcdask.cluster.slurm_cluster(...).adapt(minimum=0, maximum=3)`` from a process in the image.
Required in CI: without the cluster or the image these FAIL (the fixtures fail loudly)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from integration.test_slurm_cluster_helper import RUNNER, cancel_leftovers, host_slurm_in_image
from integration.test_slurm_jobs import assert_clean, jobscript, measure

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_worker_job_array_joins_the_scheduler_job_and_each_task_retires(slurm_cluster, job_env,
                                                                        udir):
    cdir = Path(job_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**job_env, "HPCDASK_CLUSTER_DIR": str(cdir)}
    sched = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-scheduler.sbatch"), "--time=5",
                                 "--mem=1000M", env={**env, "HPCDASK_SCHEDULER_INTERFACE": "eth0"},
                                 wait=False, workdir=udir)
    jobs = [sched.job_id]
    try:
        # Three tasks of one array, 1 min each: each retires ~25 s after its own start.
        arr = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-workers.sbatch"), "--array=1-3",
                                   "--time=1", "--mem=1000M", f"--dependency=after:{sched.job_id}",
                                   wait=False, workdir=udir,
                                   env={**env, "HPCDASK_LIFETIME_MARGIN": "35s",
                                        "HPCDASK_LIFETIME_STAGGER": "1s"})
        jobs.append(arr.job_id)
        out = slurm_cluster.run(
            ["apptainer", "exec", job_env["HPCDASK_IMAGE"], "hpcdask", "wait", "--scheduler-file",
             str(cdir / "scheduler.json"), "--workers", "3", "--timeout", "180s"],
            env=env, timeout=240, cwd=udir)
        assert "3 worker(s) ready" in out.stdout, out.stdout + out.stderr
        tasks = [f"{arr.job_id}_{i}" for i in (1, 2, 3)]
        results = [slurm_cluster.wait(t, timeout=120, workdir=udir) for t in tasks]
        for res in results:
            # Ended on its own before its 1-minute limit: retired, not killed.
            assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
            assert "workers ended (exit 0)" in res.stderr, str(res)
            assert int(res.info["ArrayTaskId"]) in (1, 2, 3), res.info
        # Each task is a job of its own: its own end time, its own node allocation.
        assert len({r.info["JobId"] for r in results}) == 3
        measure("job array of 3 worker jobs", tasks=len(results))
    finally:
        for j in jobs:
            slurm_cluster.run(["scancel", j], check=False)
    res = slurm_cluster.wait(sched.job_id, timeout=60, workdir=udir)
    assert not cdir.exists()
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))


ADAPT = r'''
import json, subprocess, sys, time
from distributed import Client
from hpcdask.cluster import slurm_cluster

prefix = sys.argv[1]
subprocess.run([prefix, "sinfo", "-h"], check=True, timeout=60)
seen, jobs = [], set()
with slurm_cluster(cores=2, processes=1, memory="1GiB", walltime="00:10:00",
                   scheduler_interface="hpcd-br0", submit_prefix=prefix,
                   dashboard="off") as cluster, Client(cluster) as client:
    cluster.adapt(minimum=0, maximum=3, interval="1s", wait_count=5, target_duration="5s")
    def slow(i):
        import time
        time.sleep(2)
        return i
    futs = client.map(slow, range(60))  # queued work: 120 s of one thread
    t0 = time.time()
    while not all(f.done() for f in futs):
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        seen.append(n)
        jobs |= {j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None)}
        assert time.time() - t0 < 420, ("stuck", seen)
        time.sleep(1)
    total = sum(client.gather(futs))
    up = time.time() - t0
    t1 = time.time()
    while cluster.workers or client.scheduler_info(n_workers=-1)["workers"]:
        assert time.time() - t1 < 240, "did not scale down"
        time.sleep(1)
    print("RESULT " + json.dumps({"sum": total, "max": max(seen), "jobs": sorted(jobs),
                                  "work_s": round(up, 1), "down_s": round(time.time() - t1, 1)}),
          flush=True)
'''


def test_adaptive_scaling_up_under_load_and_down_to_zero(slurm_cluster, image, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    binds, prefix = host_slurm_in_image(slurm_cluster, tmp_path / "mnt")
    script = tmp_path / "adapt.py"
    script.write_text(ADAPT)
    env = {**slurm_cluster.env, "HPCDASK_IMAGE": str(image), "HPCDASK_SHARED_DIR": str(shared)}
    cmd = [str(RUNNER), "exec", *(a for b in binds for a in ("--bind", b)), str(image),
           "python", str(script), prefix]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL, check=False)
    finally:
        leftovers = cancel_leftovers(slurm_cluster, tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    res = json.loads(re.search(r"^RESULT (.*)$", proc.stdout, re.MULTILINE).group(1))
    assert res["sum"] == sum(range(60))
    assert res["max"] >= 2 and len(res["jobs"]) >= 2, res  # scaled up under the queued work
    assert res["max"] <= 3, res
    assert leftovers == [], leftovers  # scaled down to 0: no job left behind
    deadline = time.monotonic() + 60
    while slurm_cluster.run(["squeue", "-h", "-j", ",".join(res["jobs"]), "-t", "PD,R,CG"],
                            check=False).stdout.strip():
        assert time.monotonic() < deadline, res
        time.sleep(1)
    measure("slurm_cluster adapt(0..3)", **{k: res[k] for k in ("max", "work_s", "down_s")})
