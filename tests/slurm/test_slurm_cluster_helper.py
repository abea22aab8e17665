"""hpcdask.cluster.slurm_cluster scaling a real dask-jobqueue SLURMCluster on the test cluster.

The calling script runs INSIDE the image (``apptainer exec IMAGE python script.py``), as the
module's docstring asks, as hpcuser on the login node (eth0 only), so its scheduler's Python and
packages are the workers' and the IdentityGuard keeps them. The scheduler listens on the login
node's eth0; each worker is a Slurm job started by sbatch from inside the image and runs
``apptainer exec IMAGE python -m distributed.cli.dask_worker`` on a node. The login node has no
ib0, so the workers bind eth0 too (the scheduler must reach them): hpcdask says so in its log.

The image has no Slurm commands: as a site would, the test binds the host's into it (its /usr,
the munge socket's folder and a slurm.conf seen from inside) and submits through
tests/testcluster/jobqueue_slurm.sh as ``submit_prefix``.

Required in CI: without the cluster or the image this FAILS (the fixtures fail loudly).
The time from ``scale()`` to all workers connected is printed and appended to
``$HPCDASK_MEASUREMENTS`` (default /tmp/hpcdask-measurements.jsonl).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from testcluster.cluster import host_slurm_in_image

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MEASURE = Path(os.environ.get("HPCDASK_MEASUREMENTS", "/tmp/hpcdask-measurements.jsonl"))
JOBS = 3
TIMEOUT = 240  # scale() to all workers connected; the machine is small and shared

SCRIPT = r'''
import json, os, subprocess, sys, time
import dask.array as da
from distributed import Client
from hpcdask.cluster import slurm_cluster
from hpcdask.connect import cluster_info

prefix, jobs, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
hold = sys.argv[4:6]  # COMMS_FILE RELEASE_FILE: publish the comm addresses, wait for RELEASE
# Fail fast (rather than after the workers' timeout) when the bound Slurm cannot reach the cluster.
subprocess.run([prefix, "sinfo", "-h"], check=True, timeout=60)
# cores=2: a whole test node per job, so the workers land on distinct nodes.
with slurm_cluster(cores=2, processes=1, memory="1GiB", walltime="00:10:00",
                   scheduler_interface="eth0", submit_prefix=prefix,
                   dashboard="off") as cluster, Client(cluster) as client:
    print("SCHEDULER " + cluster.scheduler_address, flush=True)
    print("JOBSCRIPT-BEGIN\n" + cluster.job_script() + "\nJOBSCRIPT-END", flush=True)
    t0 = time.time()
    cluster.scale(jobs=jobs)
    try:
        client.wait_for_workers(jobs, timeout=timeout)
    finally:
        ids = sorted(j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None))
        print("JOBS " + json.dumps(ids), flush=True)
    ready = time.time() - t0
    if hold:
        from pathlib import Path
        info = cluster_info(client)
        comms = {info["address"]: "scheduler", **{a: "worker" for a in info["workers"]},
                 **{w["nanny"]: "nanny" for w in info["workers"].values() if w.get("nanny")}}
        Path(hold[0]).write_text(json.dumps(comms))
        while not Path(hold[1]).exists():
            time.sleep(0.2)
    total = int(da.arange(1_000_000, chunks=100_000).sum().compute())
    workers = cluster_info(client)["workers"]
    def nested():  # hpcdask.nested's preload patched joblib's dask backend in this worker
        from joblib import _dask
        return getattr(_dask.DaskDistributedBackend, "_hpcdask_nested", False)
    nested_calls = sorted(set(client.run(nested).values()))
    guard = client.run_on_scheduler(
        lambda dask_scheduler: dict(dask_scheduler.plugins["hpcdask-identity-guard"].refused))
    print("RESULT " + json.dumps({
        "ready_s": round(ready, 1), "sum": total, "workers": sorted(workers),
        "names": sorted(str(w["name"]) for w in workers.values()), "refused": guard,
        "nested": nested_calls,
        "jobs": ids, "scheduler": cluster.scheduler_address,
        "container": os.environ.get("APPTAINER_CONTAINER"), "python": sys.executable,
    }), flush=True)
    t1 = time.time()
print(f"CLOSED after {time.time() - t1:.1f}s", flush=True)
'''


def measure(name: str, **values) -> None:
    print(f"MEASURE {name}: {values}")
    with MEASURE.open("a") as f:
        f.write(json.dumps({"test": name, **values}) + "\n")


def cancel_leftovers(slurm_cluster, workdir: Path) -> list[str]:
    """scancel this test's jobs still pending or running (their WorkDir is WORKDIR); their ids."""
    out = slurm_cluster.run(["squeue", "-h", "-t", "PD,R", "-o", "%i %Z"], check=False).stdout
    left = [line.split()[0] for line in out.splitlines()
            if len(line.split()) == 2 and Path(line.split()[1]) == workdir]
    if left:
        slurm_cluster.run(["scancel", *left], check=False)
    return left


def scale_command(slurm_cluster, image: Path, udir: Path, *hold: str,
                  script: str = SCRIPT) -> tuple[list[str], dict]:
    """The login node's command that runs SCRIPT in the image, and its environment."""
    shared = slurm_cluster.mkdtemp("clusters-")
    binds, prefix = host_slurm_in_image(slurm_cluster, udir / "mnt")
    slurm_cluster.give(udir / "mnt")
    (udir / "scale.py").write_text(script)
    env = {"HPCDASK_IMAGE": str(image), "HPCDASK_SHARED_DIR": str(shared)}
    cmd = ["apptainer", "exec", *(a for b in binds for a in ("--bind", b)), str(image),
           "python", "scale.py", prefix, str(JOBS), str(TIMEOUT), *hold]
    return cmd, env


def wait_all_ended(slurm_cluster, udir: Path, jobs: list[str], states=("CANCELLED",)) -> dict:
    """Each of JOBS ended in one of STATES and none is queued, running or completing (60 s)."""
    deadline = time.monotonic() + 60
    while True:
        got = {j: slurm_cluster.job(j, workdir=udir).state for j in jobs}
        queued = slurm_cluster.run(["squeue", "-h", "-j", ",".join(jobs), "-t", "PD,R,CG"],
                                   check=False).stdout.strip()
        done = all(s in states for s in got.values()) and not queued
        if done or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done, (got, queued)
    return got


def run_on_login(slurm_cluster, cmd, env, udir: Path, timeout: float):
    """Run CMD (a script printing ``RESULT {json}``) on the login node; cancel what it left
    queued or running. Returns the process, its RESULT, the jobs cancelled after it, and a
    text with its output and the jobs' outputs for assertion messages."""
    try:
        proc = slurm_cluster.run(cmd, env=env, cwd=udir, timeout=timeout, check=False)
    finally:
        leftovers = cancel_leftovers(slurm_cluster, udir)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(udir.glob("slurm-*.out")))
    text = (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}\n{logs}")
    assert proc.returncode == 0, text
    res = json.loads(re.search(r"^RESULT (.*)$", proc.stdout, re.MULTILINE).group(1))
    return proc, res, leftovers, text


def assert_nothing_of_the_jobs_left(slurm_cluster, jobs) -> None:
    """Nothing of JOBS in any node's $TMPDIR (the Epilog's record), /tmp or /var/tmp."""
    assert slurm_cluster.user_files_in_node_tmp() == []
    left = {k: v for k, v in slurm_cluster.leftovers().items()
            if any(f"-job-{j}." in k for j in jobs)}
    assert left == {}, left


def test_slurm_cluster_scales_on_the_test_cluster(slurm_cluster, sif, udir):
    image = sif
    cmd, env = scale_command(slurm_cluster, image, udir)
    proc, res, leftovers, text = run_on_login(slurm_cluster, cmd, env, udir, TIMEOUT + 180)
    print(proc.stdout.split("JOBSCRIPT-END")[-1].strip())  # jobs, result, close (under -s)

    # The scheduler ran in the image's process, on the login node's eth0, over TLS.
    assert res["container"] == str(Path(image).resolve()), res
    assert res["python"].startswith("/opt/hpcdask/"), res
    login = re.escape(slurm_cluster.login_address)
    assert re.fullmatch(rf"tls://{login}:\d+", res["scheduler"]), res
    assert "has no ib0: the workers bind eth0 too" in proc.stderr
    # The jobscript dask-jobqueue submitted runs the worker in the image, binding the node-local
    # $TMPDIR as its scratch, on eth0 (reachable from the login node).
    jobscript = re.search(r"JOBSCRIPT-BEGIN\n(.*)\nJOBSCRIPT-END", proc.stdout, re.DOTALL).group(1)
    worker = (rf"apptainer exec .*--bind \"\$\{{TMPDIR:-/tmp\}}\" {re.escape(str(image))} python -m "
              rf"distributed\.cli\.dask_worker tls://{login}:\d+ ")
    assert re.search(worker, jobscript), jobscript
    assert "--interface eth0" in jobscript and "--protocol tls://" in jobscript, jobscript
    assert "--local-directory $HPCDASK_SCRATCH" in jobscript, jobscript
    # One worker per job, each on its own node, none refused by the IdentityGuard.
    assert len(res["jobs"]) == JOBS and len(set(res["jobs"])) == JOBS, res
    addrs = [re.fullmatch(r"tls://([\d.]+):\d+", w).group(1) for w in res["workers"]]
    assert len(addrs) == JOBS and len(set(addrs)) == JOBS, res
    assert set(addrs) <= set(slurm_cluster.eth_addresses.values()), (addrs, slurm_cluster.eth_addresses)
    assert res["refused"] == {}, res
    assert res["sum"] == sum(range(1_000_000)), res
    # Every worker has the preloads of the workers hpcdask starts itself: a joblib call nested in
    # a task runs in that task (hpcdask.nested, issue 21), on dask-jobqueue's workers too.
    assert res["nested"] == [True], res
    assert "--preload hpcdask.nested" in jobscript, jobscript
    nodes = {}
    for job_id in res["jobs"]:
        job = slurm_cluster.job(job_id, workdir=udir)
        assert job.info.get("JobName") == "dask-worker", job
        nodes[job_id] = job.info.get("NodeList")
    assert len(set(nodes.values())) == JOBS, nodes

    # cluster.close() cancelled the jobs: none left queued or running, all CANCELLED.
    assert leftovers == [], f"jobs still pending/running after close(): {leftovers}\n{text}"
    wait_all_ended(slurm_cluster, udir, res["jobs"])
    # The per-cluster credentials folder is the cluster's: nothing of the jobs is left anywhere.
    assert_nothing_of_the_jobs_left(slurm_cluster, res["jobs"])
    measure(f"slurm_cluster scale(jobs={JOBS})", scale_to_workers_s=res["ready_s"],
            close=re.search(r"^CLOSED after ([\d.]+)s", proc.stdout, re.MULTILINE).group(1))


ADAPT_SCRIPT = r"""
import json, subprocess, sys, time
from distributed import Client
from hpcdask.cluster import slurm_cluster
from hpcdask.connect import cluster_info

prefix, maximum, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
subprocess.run([prefix, "sinfo", "-h"], check=True, timeout=60)


def slow(x):
    time.sleep(0.5)
    return 2 * x


def sample(cluster, client, jobs, peak):
    jobs.update(j.job_id for j in list(cluster.workers.values()) if getattr(j, "job_id", None))
    n = len(cluster_info(client)["workers"])
    return max(peak, n), n


with slurm_cluster(cores=2, processes=1, memory="1GiB", walltime="00:10:00",
                   scheduler_interface="eth0", submit_prefix=prefix,
                   dashboard="off") as cluster, Client(cluster) as client:
    print("JOBSCRIPT-BEGIN\n" + cluster.job_script() + "\nJOBSCRIPT-END", flush=True)
    cluster.adapt(minimum=0, maximum=maximum)
    jobs, peak, t0 = set(), 0, time.time()
    time.sleep(3)  # minimum=0: nothing to do, nothing submitted
    idle_jobs = len(cluster.workers)
    futures = client.map(slow, range(240))
    while not all(f.done() for f in futures):
        peak, _ = sample(cluster, client, jobs, peak)
        if time.time() - t0 > timeout:
            sys.exit(f"the queued work did not finish within {timeout}s")
        time.sleep(0.2)
    total = sum(client.gather(futures))
    busy_s = time.time() - t0
    # Released: adapt() never retires the last worker holding data a client still holds.
    del futures
    t1 = time.time()
    while True:  # back down to minimum=0: every worker retired, its job gone
        peak, n = sample(cluster, client, jobs, peak)
        if n == 0 and not cluster.workers:
            break
        if time.time() - t1 > timeout:
            sys.exit(f"still {n} worker(s), {len(cluster.workers)} job(s) {timeout}s after the work")
        time.sleep(0.5)
    print("RESULT " + json.dumps({"sum": total, "peak": peak, "jobs": sorted(jobs),
                                  "idle_jobs": idle_jobs, "busy_s": round(busy_s, 1),
                                  "down_s": round(time.time() - t1, 1)}), flush=True)
"""


def test_slurm_cluster_adapts_up_under_queued_work_and_back_to_zero(slurm_cluster, sif, udir):
    """slurm_cluster(...).adapt(minimum=0, maximum=3) from the login node (the Cedar tutorial's
    SLURMCluster + scaling, adaptive): no job while idle, worker jobs in the image submitted
    under a queued workload (never more than 3 at once), the right result, then back to zero
    workers and every job ended, nothing left on the nodes."""
    cmd, env = scale_command(slurm_cluster, sif, udir, script=ADAPT_SCRIPT)
    proc, res, leftovers, text = run_on_login(slurm_cluster, cmd, env, udir, 2 * TIMEOUT + 180)
    assert res["sum"] == 2 * sum(range(240)), res
    assert res["idle_jobs"] == 0, res  # minimum=0 and nothing queued: nothing submitted
    # Scaled up beyond one worker under the queue, never beyond maximum=3.
    assert 2 <= res["peak"] <= JOBS, res
    assert len(res["jobs"]) >= res["peak"], res
    jobscript = re.search(r"JOBSCRIPT-BEGIN\n(.*)\nJOBSCRIPT-END", proc.stdout, re.DOTALL).group(1)
    assert re.search(rf"apptainer exec .* {re.escape(str(sif))} python -m "
                     rf"distributed\.cli\.dask_worker tls://", jobscript), jobscript
    # Scaled down to zero by retiring the workers and cancelling their jobs: none left.
    assert leftovers == [], f"jobs still pending/running after scaling down: {leftovers}\n{text}"
    wait_all_ended(slurm_cluster, udir, res["jobs"], states=("CANCELLED", "COMPLETED"))
    for job_id in res["jobs"]:
        assert slurm_cluster.job(job_id, workdir=udir).info.get("JobName") == "dask-worker"
    assert_nothing_of_the_jobs_left(slurm_cluster, res["jobs"])
    for p in udir.glob("slurm-*.out"):
        assert "Traceback" not in p.read_text(errors="replace"), (p.name, text)
    measure("slurm_cluster adapt(0, 3)", peak=res["peak"], jobs=len(res["jobs"]),
            busy_s=res["busy_s"], down_s=res["down_s"])
