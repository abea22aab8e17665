"""Section `peers` (strict Slurm test cluster): hpcdask's all-in-one job against what a user would
write instead, side by side, interleaved, in the same image (the .sif), as hpcuser.

The four peers and their scripts: peer_scripts.py. For each repetition of each peer:

  ready_s      submission (sbatch; for SLURMCluster, ``scale``) to the user's code holding a
               client that sees N workers (hpcdask's TLS and identity check included)
  tasks_per_s  tiny tasks (inc) through that client, the median of 3 rounds
  first_result_s  submission to the first result of a dask.array sum (10 M elements, 25 chunks)
               on the fresh cluster; first_over_second: that sum's time / the same sum again
  ready_to_end_s  ready to every job of the run in a final state (the same work for every peer)
  teardown_s   the user's code done to every job of the run in a final state (Slurm's Epilog
               included), as polled every 0.2 s
  left         jobs still queued/running, files in any node's /tmp or /var/tmp, the Epilog's
               records of the run's $TMPDIR, hpcuser processes in the cluster's namespaces,
               new files in the job's working folder

The goals (goals.py) compare hpcdask with the fastest peer, paired repetition by repetition.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import peer_scripts as ps
import rig
import stats
from common import REPO, Skip, log, pair

ALL_IN_ONE = "jobscripts/slurm/dask-cluster.sbatch"
NODES = 3
POLL = 0.2
# The run's own files in its working folder: the scripts, Slurm's logs, hpcdask's provenance
# record (hpcdask-output/, the product's documented output), the Slurm binds (slurmcluster).
OUTPUTS = re.compile(r"^(slurm-\d+\.(out|err)|.*\.(py|sh)|mnt|hpcdask-output)$")
# The bubblewrap runner's own squashfuse mount (test infrastructure, tests/testcluster/bin/apptainer)
# can outlive a role that Slurm or the recipe killed; it is recorded apart.
# A /proc line reads "PID CMDLINE", the program named by its full path.
RUNNER_MOUNT = re.compile(r"^\d+ (?:\S*/)?squashfuse(?:_ll)? ")


def _write(cluster, wd: Path, name: str, text: str, mode: int = 0o644) -> Path:
    p = wd / name
    p.write_text(text)
    p.chmod(mode)
    cluster.give(p)
    return p


def _wait_final(cluster, job_ids, timeout: float) -> float:
    """Poll until every job is in a final state; the time.time() it was seen so."""
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        out = cluster.run(["scontrol", "-o", "show", "job", ",".join(sorted(pending))],
                          check=False, user=None).stdout
        for rec in out.splitlines():
            m = re.search(r"JobId=(\d+) .*JobState=(\S+)", rec)
            if m and m.group(2) in rig.FINAL_STATES:
                pending.discard(m.group(1))
        if not out.strip():  # forgotten by the controller: long done
            pending.clear()
        if not pending:
            return time.time()
        if time.monotonic() > deadline:
            cluster.run(["scancel", *pending], check=False, user=None)
            raise RuntimeError(f"jobs {sorted(pending)} not done after {timeout}s (cancelled)")
        time.sleep(POLL)
    return time.time()


def _batch(cluster, peer: str, wd: Path, image: str, shared: Path) -> tuple[dict, list[str], str]:
    """One batch-job peer: (PEER record + t_submit + t_gone, job ids, log tail)."""
    env = {"HPCDASK_IMAGE": image, "HPCDASK_SHARED_DIR": str(shared)}
    if peer == "hpcdask":
        script = _write(cluster, wd, "user.py", ps.HPCDASK_SCRIPT)
        argv = [str(cluster.src / ALL_IN_ONE), str(script), str(NODES)]
    elif peer == "seeds":
        job = _write(cluster, wd, "seeds.sh", ps.SEEDS_JOB, 0o755)
        argv = [str(job), str(_write(cluster, wd, "client.py", ps.SEEDS_CLIENT))]
    else:
        job = _write(cluster, wd, "runner.sh", ps.RUNNER_JOB, 0o755)
        argv = [str(job), str(_write(cluster, wd, "runner.py", ps.RUNNER_SCRIPT))]
    opts = [*ps.sbatch_args(peer, NODES), f"--output={wd}/slurm-%j.out",
            f"--error={wd}/slurm-%j.err"]
    t_submit = time.time()
    out = cluster.run(["sbatch", "--parsable", *opts, *argv], env=env, cwd=wd).stdout
    job_id = out.strip().split(";")[0]
    t_gone = _wait_final(cluster, [job_id], 300)
    res = cluster.job(job_id, workdir=wd)
    return ({**(ps.peer_line(res.stdout) or {}), "t_submit": t_submit, "t_gone": t_gone,
             "state": res.state}, [res.job_id], f"{res.stdout[-600:]} / {res.stderr[-900:]}")


def _login(cluster, wd: Path, image: str) -> tuple[dict, list[str], str]:
    """SLURMCluster(...).scale(N) from the login node, in the image (host Slurm bound in)."""
    binds, prefix = rig.host_slurm_binds(cluster, wd / "mnt")
    cluster.give(wd / "mnt")
    script = _write(cluster, wd, "scale.py", ps.CLUSTER_SCRIPT)
    cmd = ["apptainer", "exec", *(a for b in binds for a in ("--bind", b)), image, "python",
           str(script), prefix, str(NODES), image]
    proc = cluster.run(cmd, env={"HPCDASK_IMAGE": image}, cwd=wd, timeout=400, check=False)
    rec = ps.peer_line(proc.stdout) or {}
    jobs = [str(j) for j in rec.get("jobs", [])]
    t_gone = _wait_final(cluster, jobs, 120) if jobs else time.time()
    return ({**rec, "t_submit": rec.get("t_scale"), "t_gone": t_gone,
             "state": f"exit {proc.returncode}"}, jobs,
            f"{proc.stdout[-600:]} / {proc.stderr[-900:]}")


def one_run(cluster, peer: str, image: str) -> dict:
    wd = cluster.mkdtemp(f"peer-{peer}-")
    shared = cluster.mkdtemp("clusters-")
    tmp_before = set(cluster.user_files_in_node_tmp())
    procs_before = set(rig.user_processes(cluster))
    if peer == "slurmcluster":
        rec, jobs, tail = _login(cluster, wd, image)
    else:
        rec, jobs, tail = _batch(cluster, peer, wd, image, shared)
    if "t_ready" not in rec:
        raise RuntimeError(f"{peer}: no PEER line ({rec.get('state')}): {tail}")
    time.sleep(1.0)  # what lingers a moment after the jobs end is not "left"
    procs, runner_mounts = split_runner_mounts(set(rig.user_processes(cluster)) - procs_before)
    left = {"jobs": [j for j in rig.user_jobs(cluster) if j.split()[0] in jobs],
            "node_tmp": top_level(set(cluster.user_files_in_node_tmp()) - tmp_before),
            "epilog_tmpdir": rig.epilog_records(cluster, jobs),
            "processes": procs,
            "workdir": sorted(str(p.relative_to(wd)) for p in wd.iterdir()
                              if not OUTPUTS.match(p.name)),
            "shared_dir": sorted(p.name for p in shared.iterdir())}
    for p in left["node_tmp"]:  # so the next run starts from clean nodes
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else Path(p).unlink(missing_ok=True)
    return {"ready_s": rec["t_ready"] - rec["t_submit"], "tasks_per_s": rec["tasks_per_s"],
            "first_result_s": rec["t_first"] - rec["t_submit"],
            "first_over_second": rec["first_s"] / rec["second_s"],
            "ready_to_end_s": rec["t_gone"] - rec["t_ready"],
            "teardown_s": rec["t_gone"] - rec["t_done"], "workers": rec["workers"],
            "hosts": rec["hosts"], "scheduler": rec["scheduler"], "jobs": jobs,
            "create_s": (rec["t_scale"] - rec["t_create"]) if "t_create" in rec else None,
            "left": left, "n_left": sum(len(v) for v in left.values()),
            "runner_mounts_left": len(runner_mounts)}


def split_runner_mounts(procs) -> tuple[list[str], list[str]]:
    """PROCS ("PID CMDLINE" lines) as (the others, the test runner's squashfuse mounts)."""
    mounts = sorted(q for q in procs if RUNNER_MOUNT.match(q))
    return sorted(q for q in procs if not RUNNER_MOUNT.match(q)), mounts


def top_level(paths) -> list[str]:
    """The topmost of PATHS under each node's tmp folder (.../nodes/NODE/tmp/X/... -> that X)."""
    tops = set()
    for p in paths:
        m = re.match(r"^(.*/nodes/[^/]+/(?:var-)?tmp/[^/]+)", p)
        tops.add(m.group(1) if m else p)
    return sorted(tops)


def fastest(summary: dict, key: str, higher_is_better: bool, exclude: str = "hpcdask"):
    """The peer (other than EXCLUDE) with the best median of KEY, or None."""
    cands = [(v[key]["median"], p) for p, v in summary.items()
             if p != exclude and v.get(key, {}).get("n")]
    if not cands:
        return None
    return (max if higher_is_better else min)(cands)[1]


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per-peer summaries, and hpcdask against the fastest peer (paired by repetition)."""
    keys = ("ready_s", "tasks_per_s", "teardown_s", "n_left", "first_result_s",
            "first_over_second", "ready_to_end_s")
    summary = {p: {k: stats.summarize([r[k] for r in rs if r.get(k) is not None and r[k] == r[k]])
                   for k in keys} for p, rs in runs.items()}
    f_ready = fastest(summary, "ready_s", higher_is_better=False)
    f_tasks = fastest(summary, "tasks_per_s", higher_is_better=True)
    f_first = fastest(summary, "first_result_s", higher_is_better=False)
    me = runs.get("hpcdask", [])
    return {"summary": summary, "fastest_ready": f_ready, "fastest_tasks": f_tasks,
            "ratio_ready_vs_fastest": pair(me, runs[f_ready], "ready_s") if f_ready else None,
            "ratio_tasks_vs_fastest": pair(me, runs[f_tasks], "tasks_per_s") if f_tasks else None,
            "fastest_first_result": f_first,
            "ratio_first_result_vs_fastest": (pair(me, runs[f_first], "first_result_s")
                                              if f_first else None),
            "ratio_ready_to_end_vs_slurmrunner": (pair(me, runs["slurmrunner"], "ready_to_end_s")
                                                  if runs.get("slurmrunner") else None)}


def section(args, setup, tmp: Path) -> dict:
    image = setup.image()
    if not Path(image).is_file():
        raise Skip(f"{image} is not a SIF file")
    cluster = setup.rig()
    reps = 1 if args.quick else 5
    runs: dict[str, list[dict]] = {p: [] for p in ps.PEERS}
    errors = []
    for r, peer in stats.interleave(ps.PEERS, reps):
        try:
            res = one_run(cluster, peer, image)
            log(f"peers {peer:12s} rep {r}: ready {res['ready_s']:.1f}s, "
                f"{res['tasks_per_s']:.0f} tasks/s, teardown {res['teardown_s']:.1f}s, "
                f"{res['n_left']} left")
        except Exception as e:
            errors.append(f"{peer}: {e}"[:600])
            res = {"ready_s": float("nan"), "tasks_per_s": float("nan"), "error": str(e)[:600]}
            log(f"peers {peer} rep {r} FAILED: {str(e)[:300]}")
        runs[peer].append(res)
    if not any(x.get("ready_s") == x.get("ready_s") for x in runs["hpcdask"]):
        raise Skip(f"hpcdask's job never reached ready: {errors[:1]}")
    return {"nodes": NODES, "workers": NODES, "reps": reps, "image": image, "runs": runs,
            "errors": errors, "jobscript": str(REPO / ALL_IN_ONE), **summarize(runs)}
