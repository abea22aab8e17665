"""Issue 14's recipes on the strict Slurm test cluster: a worker job array
(``sbatch --array=1-3 dask-workers.sbatch``) joining a scheduler job.
Required in CI: without the cluster or the image these FAIL (the fixtures fail loudly)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm.test_slurm_jobs import end_session, jobscript, measure

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
            env=env, timeout=240, cwd=udir, check=False)
        tasks = [f"{arr.job_id}_{i}" for i in (1, 2, 3)]
        results = [slurm_cluster.wait(t, timeout=180, workdir=udir) for t in tasks]
        logs = "\n".join(str(r) for r in results)
        assert "3 worker(s) ready" in out.stdout, out.stdout + out.stderr + logs
        for res in results:
            # Ended on its own before its 1-minute limit: retired, not killed.
            assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
            assert "workers ended (exit 0)" in res.stderr, str(res)
            assert int(res.info["ArrayTaskId"]) in (1, 2, 3), res.info
        # Each task is a job of its own: its own end time, its own node allocation.
        assert len({r.info["JobId"] for r in results}) == 3
        measure("job array of 3 worker jobs", tasks=len(results))
    finally:
        end_session(slurm_cluster, jobs, udir, cdir, Path(job_env["HPCDASK_SHARED_DIR"]))

