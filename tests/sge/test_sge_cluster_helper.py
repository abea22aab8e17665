"""hpcdask.cluster.sge_cluster from the login node: a real dask-jobqueue SGECluster on the Grid
Engine test cluster, ``scale(2)`` and then ``adapt()`` up under queued work and back to zero.

As for Slurm (tests/slurm/test_slurm_cluster_helper.py) the calling script runs INSIDE the image
(``apptainer exec IMAGE python script.py``) as hpcuser on the login node (eth0 only), so the
scheduler's Python and packages are the workers' and the IdentityGuard keeps them. The image has
no Grid Engine commands: as a site would, the test binds the host's (its /usr and the cell) and
submits through tests/testcluster/jobqueue_sge.sh as ``submit_prefix``.

Required in CI: without the cluster or the image this FAILS (the fixtures fail loudly).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sge, pytest.mark.slow]

MEASURE = Path("/tmp/hpcdask-measurements.jsonl")
TIMEOUT = 240  # scale()/adapt() to the workers wanted; the machine is small and shared

SCRIPT = r'''
import json, os, subprocess, sys, time
import dask.array as da
from distributed import Client
from hpcdask.cluster import sge_cluster
from hpcdask.connect import cluster_info

prefix, timeout = sys.argv[1], float(sys.argv[2])
# Fail fast (rather than after the workers' timeout) when the bound Grid Engine cannot answer.
subprocess.run([prefix, "qstat", "-g", "c"], check=True, timeout=60)


def slow(x):
    time.sleep(0.5)
    return 2 * x


def until(what, cond):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            sys.exit(f"{what}: not within {timeout}s")
        time.sleep(0.2)
    return round(time.time() - t, 1)


jobs = set()


def workers(cluster, client):
    jobs.update(j.job_id for j in list(cluster.workers.values()) if getattr(j, "job_id", None))
    return cluster_info(client)["workers"]


# 3000 MiB of h_vmem per job: two do not fit on one node (4000M each), so each lands on its own.
with sge_cluster(cores=1, processes=1, memory="3000MiB", walltime="00:10:00",
                 scheduler_interface="eth0", submit_prefix=prefix,
                 dashboard="off") as cluster, Client(cluster) as client:
    print("SCHEDULER " + cluster.scheduler_address, flush=True)
    print("JOBSCRIPT-BEGIN\n" + cluster.job_script() + "\nJOBSCRIPT-END", flush=True)
    cluster.scale(jobs=2)
    ready = until("scale(2)", lambda: len(workers(cluster, client)) == 2)
    total = int(da.arange(1_000_000, chunks=100_000).sum().compute())
    scaled = sorted(workers(cluster, client))
    scaled_jobs = sorted(jobs)
    guard = client.run_on_scheduler(
        lambda dask_scheduler: dict(dask_scheduler.plugins["hpcdask-identity-guard"].refused))
    cluster.scale(0)
    down = until("scale(0)", lambda: not workers(cluster, client) and not cluster.workers)

    cluster.adapt(minimum=0, maximum=3)
    time.sleep(3)  # minimum=0: nothing to do, nothing submitted
    idle_jobs = len(cluster.workers)
    before, peak = set(jobs), 0
    futures = client.map(slow, range(120))
    t0 = time.time()
    while not all(f.done() for f in futures):
        peak = max(peak, len(workers(cluster, client)))
        if time.time() - t0 > timeout:
            sys.exit(f"the queued work did not finish within {timeout}s")
        time.sleep(0.2)
    adapted = sum(client.gather(futures))
    del futures  # adapt() never retires the last worker holding data a client still holds
    adapt_down = until("adapt back to 0", lambda: not workers(cluster, client) and not cluster.workers)
    print("RESULT " + json.dumps({
        "ready_s": ready, "sum": total, "workers": scaled, "scaled_jobs": scaled_jobs,
        "refused": guard, "down_s": down, "idle_jobs": idle_jobs, "peak": peak,
        "adapt_jobs": sorted(jobs - before), "adapted": adapted, "adapt_down_s": adapt_down,
        "jobs": sorted(jobs), "scheduler": cluster.scheduler_address,
        "container": os.environ.get("APPTAINER_CONTAINER"),
    }), flush=True)
'''


def test_sge_cluster_scales_and_adapts_from_the_login_node(sge_cluster, sif, sge_udir):
    """sge_cluster(...) in the image on the login node: scale(2) gives two workers on two hosts
    (worker jobs in the image, TLS, none refused), scale(0) ends them; adapt(minimum=0, maximum=3)
    submits nothing while idle, more than one job under a queue of tasks (never more than 3), the
    right results, then back to zero; no job left queued or running, nothing left on the nodes."""
    c = sge_cluster
    shared = c.mkdtemp("clusters-")
    binds, prefix, env = c.client_in_image(sge_udir / "mnt")
    (sge_udir / "scale.py").write_text(SCRIPT)
    c.give(sge_udir / "scale.py")
    env.update(HPCDASK_IMAGE=str(sif), HPCDASK_SHARED_DIR=str(shared))
    cmd = ["apptainer", "exec", *(a for b in binds for a in ("--bind", b)), str(sif),
           "python", "scale.py", prefix, str(TIMEOUT)]
    try:
        proc = c.run(cmd, env=env, cwd=sge_udir, timeout=3 * TIMEOUT + 120, check=False)
    finally:
        # Jobs close() did not qdel (a "d" in their state when it did: they are ending).
        mine = c.run(["qstat", "-u", c.USER], check=False).stdout
        left = [f[0] for line in mine.splitlines()[2:] if len(f := line.split()) > 4
                and "d" not in f[4]]
        if left:
            c.run(["qdel", *left], check=False)
    logs = {p.name: p.read_text(errors="replace") for p in sorted(sge_udir.glob("dask-worker.o*"))}
    text = (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
            f"{proc.stderr[-6000:]}\n" + "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items()))
    assert proc.returncode == 0, text
    res = json.loads(re.search(r"^RESULT (.*)$", proc.stdout, re.M).group(1))

    # The scheduler ran in the image's process on the login node's eth0, over TLS; the jobscript
    # dask-jobqueue submitted asks Grid Engine for h_vmem and h_rt and runs the worker in the image.
    assert res["container"] == str(Path(sif).resolve()), res
    assert re.fullmatch(rf"tls://{re.escape(c.login_address)}:\d+", res["scheduler"]), res
    jobscript = re.search(r"JOBSCRIPT-BEGIN\n(.*)\nJOBSCRIPT-END", proc.stdout, re.S).group(1)
    assert "#$ -l h_vmem=3000M" in jobscript and "#$ -l h_rt=00:10:00" in jobscript, jobscript
    assert re.search(rf"apptainer exec .* {re.escape(str(sif))} python -m "
                     rf"distributed\.cli\.dask_worker tls://", jobscript), jobscript
    # scale(2): two jobs, two workers on two hosts' eth0, none refused, the right sum.
    assert len(res["scaled_jobs"]) == 2 and res["refused"] == {}, res
    hosts = {re.fullmatch(r"tls://([\d.]+):\d+", w).group(1) for w in res["workers"]}
    assert len(hosts) == 2 and hosts <= set(c.eth_addresses.values()), (hosts, c.eth_addresses)
    assert res["sum"] == sum(range(1_000_000)), res
    # adapt(0, 3): nothing while idle, up beyond one worker under the queue (at most 3), back to 0.
    assert res["idle_jobs"] == 0, res
    assert 2 <= res["peak"] <= 3 and len(res["adapt_jobs"]) >= res["peak"], res
    assert res["adapted"] == 2 * sum(range(120)), res
    # Every job ended (qdel by scale-down, adapt and close): none queued or running afterwards.
    assert left == [], f"jobs still queued or running after close(): {left}\n{text}"
    deadline = time.monotonic() + 60
    while (live := [j for j in res["jobs"] if c.run(["qstat", "-j", j], check=False).returncode == 0]):
        assert time.monotonic() < deadline, f"jobs {live} still known to qstat\n{text}"
        time.sleep(1)
    # Each retired worker's job ended by itself (exit 0), not by qdel's SIGKILL: -notify.
    ended = {j: c.job(j, workdir=sge_udir) for j in res["jobs"]}
    bad = {j: (r.state, r.exit_code, r.info.get("failed")) for j, r in ended.items()
           if r.state != "COMPLETED" or r.exit_code != 0}
    # On failure, Grid Engine's whole record of those jobs too (host, start, end, signals' usage).
    assert bad == {}, f"{bad}\n{ {j: ended[j].info for j in bad} }\n{text}"
    assert c.user_files_in_node_tmp() == []
    gone = {k: v for k, v in c.leftovers().items() if any(f"-job-{j}." in k for j in res["jobs"])}
    assert gone == {}, gone
    for name, log in logs.items():
        assert "Traceback" not in log, (name, text)
    assert "Traceback" not in proc.stderr, text
    line = {"test": "sge_cluster scale(2) + adapt(0, 3)", "scale_to_workers_s": res["ready_s"],
            "down_s": res["down_s"], "peak": res["peak"], "adapt_down_s": res["adapt_down_s"]}
    print(f"MEASURE {line}")
    with MEASURE.open("a") as f:
        f.write(json.dumps(line) + "\n")
