"""Section `peers` (Slurm test cluster): hpcdask's all-in-one job, time from its start to 3 workers.

Today: the all-in-one jobscript (`sbatch -N3 jobscripts/slurm/dask-cluster.sbatch`) with every
role in the image, against the same jobscript with `HPCDASK_APPTAINER=bench/bare-exec` (the
roles from the bench's venv). The peers a user would pick instead (the seeds' hand-written
recipe, dask-jobqueue's SLURMRunner and SLURMCluster.scale) come with the strict test-cluster
rig; until then goals.py reports their rows as not measured.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import stats
from common import HERE, REPO, VENV, Skip, log, ok, pair, private_dir

ALL_IN_ONE = REPO / "jobscripts" / "slurm" / "dask-cluster.sbatch"
BARE_EXEC = HERE / "bare-exec"


def slurm_job(env, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, env=env).stdout
        rec = dict(re.findall(r"(\w+)=(\S*)", out))
        if rec.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return rec
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env, capture_output=True)
            raise RuntimeError(f"job {job_id} not done after {timeout}s ({rec.get('JobState')})")
        time.sleep(0.3)


def _slurm_time(s: str) -> float | None:
    try:
        return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None


def cluster_job(mode: str, env: dict, image: str | None, tmp: Path, nodes: int) -> dict:
    wd = private_dir(tmp, f"job-{mode}-")
    shared = private_dir(wd, "clusters-")
    script = wd / "ready.py"
    script.write_text("from distributed import get_client\n"
                      "print('client sees', len(get_client().scheduler_info(n_workers=-1)"
                      "['workers']), 'workers')\n")
    jenv = {**env, "HPCDASK_SHARED_DIR": str(shared), "HPCDASK_STOP_TIMEOUT": "20",
            "HPCDASK_READY_TIMEOUT": "150s"}
    if mode == "container":
        jenv["HPCDASK_IMAGE"] = image
    else:
        jenv.update(HPCDASK_IMAGE=str(VENV), HPCDASK_APPTAINER=str(BARE_EXEC))
    t_submit = time.time()
    proc = subprocess.run(["sbatch", "--parsable", f"-N{nodes}", "--time=5",
                           f"--output={wd}/slurm-%j.out", f"--error={wd}/slurm-%j.err",
                           str(ALL_IN_ONE), str(script)], capture_output=True, text=True, env=jenv,
                          cwd=wd, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    rec = slurm_job(env, job, 240)
    out = (wd / f"slurm-{job}.out").read_text(errors="replace")
    err = (wd / f"slurm-{job}.err").read_text(errors="replace")
    m_at = re.search(r"worker\(s\) ready after [\d.]+s \(at ([\d.]+)\)", out)
    m_in = re.search(r"hpcdask-job: (\d+) worker\(s\) ready after ([\d.]+)s in the job", err)
    m_s = re.search(r"scheduler up after ([\d.]+)s", err)
    if not (m_at and m_in):
        raise RuntimeError(f"job {job} {rec.get('JobState')} {rec.get('ExitCode')}: "
                           f"{' / '.join(err.strip().splitlines()[-4:])}")
    start, submit = _slurm_time(rec.get("StartTime")), _slurm_time(rec.get("SubmitTime"))
    shutil.rmtree(wd, ignore_errors=True)
    return {"job": job, "workers": int(m_in.group(1)),
            "in_job_ready_s": float(m_in.group(2)),
            "scheduler_in_job_s": float(m_s.group(1)) if m_s else None,
            "submit_to_ready_s": float(m_at.group(1)) - t_submit,
            "queue_wait_s": (start - submit) if start and submit else None,
            "state": rec.get("JobState")}


def section(args, setup, tmp: Path) -> dict:
    env = setup.cluster_env()
    image = setup.image()
    reps = 1 if args.quick else 3
    nodes = 3
    runs: dict[str, list[dict]] = {"container": [], "bare": []}
    errors = []
    for r, v in stats.interleave(["container", "bare"], reps):
        try:
            res = cluster_job(v, env, image, tmp, nodes)
            log(f"cluster {v:9s} rep {r}: in job {res['in_job_ready_s']:.1f}s, "
                f"from sbatch {res['submit_to_ready_s']:.1f}s")
        except Exception as e:
            errors.append(str(e)[:400])
            res = {"in_job_ready_s": float("nan"), "submit_to_ready_s": float("nan"),
                   "error": str(e)[:400]}
            log(f"cluster {v} rep {r} FAILED: {e}")
        runs[v].append(res)
    if not any(x["in_job_ready_s"] == x["in_job_ready_s"] for x in runs["container"]):
        raise Skip(f"no cluster job reached ready: {errors[:1]}")
    return {"nodes": nodes, "workers": nodes, "reps": reps, "runs": runs, "errors": errors,
            "summary": {v: {k: stats.summarize(ok([x[k] for x in runs[v]]))
                            for k in ("in_job_ready_s", "submit_to_ready_s")} for v in runs},
            "ratio_in_job": pair(runs["container"], runs["bare"], "in_job_ready_s"),
            "ratio_submit": pair(runs["container"], runs["bare"], "submit_to_ready_s")}
