"""The four ways to a Dask cluster on Slurm that the `peers` section compares, as the files a user
would write: every one runs in the same image (HPCDASK_IMAGE, the .sif) as hpcuser.

  hpcdask       jobscripts/slurm/dask-cluster.sbatch USER_SCRIPT (TLS, identity check, ib0)
  seeds         the seeds' recipe: `dask scheduler --scheduler-file` on the batch node and
                `srun dask worker --scheduler-file`, plain TCP over ib0, via `apptainer exec`
  slurmrunner   dask-jobqueue's SLURMRunner: `srun -n N+2 apptainer exec IMAGE python script.py`
                (rank 0 scheduler, rank 1 the client, the rest workers), plain TCP over ib0
  slurmcluster  dask-jobqueue's SLURMCluster(...).scale(N) from the login node (the script runs
                there in the image; one worker job per node; plain TCP over eth0: the login
                node has no ib0)

Each user script ends in the same PROBE: wait for N workers, note the time, run tiny tasks, and
print one ``PEER {json}`` line. Pure text, checked in bench/tests/test_bench_peers.py.
"""

from __future__ import annotations

import json
import re

PEERS = ("hpcdask", "seeds", "slurmrunner", "slurmcluster")

PROBE = r'''
import json, os, statistics, sys, time

import dask.array as da


def _inc(x):
    return x + 1


def probe(client, n, extra=dict):
    """Wait for N workers; tiny tasks/s (median of 3 rounds of TASKS); one PEER line (with
    extra(), called once the workers are there)."""
    tasks, rounds = int(os.environ.get("BENCH_TINY_TASKS", "1000")), 3
    client.wait_for_workers(n, timeout=240)
    t_ready = time.time()
    workers = client.scheduler_info(n_workers=-1)["workers"]
    sums = []  # the first dask.array result of a fresh cluster, then the same sum again
    for _ in range(2):
        t0 = time.perf_counter()
        assert da.arange(10_000_000, chunks=400_000).sum().compute() == 49999995000000
        sums.append(time.perf_counter() - t0)
        if len(sums) == 1:
            t_first = time.time()
    client.gather(client.map(_inc, range(100), pure=False))  # warm-up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        client.gather(client.map(_inc, range(tasks), pure=False))
        rates.append(tasks / (time.perf_counter() - t0))
    print("PEER " + json.dumps({
        "t_ready": t_ready, "t_done": time.time(), "tasks_per_s": statistics.median(rates),
        "t_first": t_first, "first_s": sums[0], "second_s": sums[1],
        "rates": rates, "tasks": tasks, "workers": len(workers),
        "hosts": sorted({w["host"] for w in workers.values()}),
        "scheduler": client.scheduler.address, **extra()}), flush=True)
'''

HPCDASK_SCRIPT = PROBE + r'''
from distributed import get_client

probe(get_client(), int(sys.argv[1]))
'''

SEEDS_CLIENT = PROBE + r'''
from distributed import Client

sf, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 240
while not os.path.exists(sf) and time.time() < deadline:
    time.sleep(0.05)
with Client(scheduler_file=sf) as client:
    probe(client, n)
'''

SEEDS_JOB = r'''#!/bin/bash
#SBATCH --job-name=seeds
#SBATCH --ntasks-per-node=1
# The seeds' recipe in the image: scheduler on the batch node, one worker per node, plain TCP.
sf=$PWD/scheduler-$SLURM_JOB_ID.json
apptainer exec "$HPCDASK_IMAGE" dask scheduler --scheduler-file "$sf" --interface ib0 &
sched=$!
srun apptainer exec "$HPCDASK_IMAGE" dask worker --scheduler-file "$sf" --interface ib0 \
    --nthreads 1 &
workers=$!
apptainer exec "$HPCDASK_IMAGE" python "$1" "$sf" "$SLURM_JOB_NUM_NODES"
rc=$?
kill "$workers" "$sched"
wait
exit $rc
'''

RUNNER_SCRIPT = PROBE + r'''
from dask_jobqueue.slurm import SLURMRunner
from distributed import Client

with SLURMRunner(scheduler_file=os.path.join(os.getcwd(), "scheduler-{job_id}.json"),
                 scheduler_options={"interface": "ib0"},
                 worker_options={"interface": "ib0", "nthreads": 1}) as runner:
    with Client(runner) as client:
        probe(client, runner.n_workers)
'''

RUNNER_JOB = r'''#!/bin/bash
#SBATCH --job-name=slurmrunner
# dask-jobqueue's SLURMRunner: every rank runs the same script in the image.
srun apptainer exec "$HPCDASK_IMAGE" python "$1"
'''

CLUSTER_SCRIPT = PROBE + r'''
from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import Client

prefix, n, image = sys.argv[1], int(sys.argv[2]), sys.argv[3]


class Job(SLURMJob):  # the host's sbatch/scancel, bound into the image (tests/testcluster)
    submit_command = f"{prefix} sbatch"
    cancel_command = f"{prefix} scancel"


t0 = time.time()
cluster = SLURMCluster(job_cls=Job, cores=2, processes=1, memory="1GiB", walltime="00:10:00",
                       interface="eth0", python=f"apptainer exec {image} python")
client = Client(cluster)
t_scale = time.time()
cluster.scale(n)
try:
    probe(client, n, lambda: {"t_scale": t_scale, "t_create": t0, "jobs": sorted(
        j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None))})
finally:
    client.close()
    cluster.close()
print("CLOSED " + json.dumps({"t_closed": time.time()}), flush=True)
'''


def peer_line(text: str) -> dict | None:
    """The PEER record a run printed (the last one), or None."""
    found = re.findall(r"^PEER (\{.*\})\s*$", text, re.MULTILINE)
    return json.loads(found[-1]) if found else None


def sbatch_args(peer: str, nodes: int, mem: str = "2000M") -> list[str]:
    """sbatch's options per batch peer: N nodes for N workers, the same memory per node."""
    if peer == "slurmrunner":  # rank 0 scheduler, rank 1 client, N workers
        return [f"-N{nodes}", f"-n{nodes + 2}", f"--mem={mem}", "--time=5"]
    if peer in ("hpcdask", "seeds"):
        return [f"-N{nodes}", f"--mem={mem}", "--time=5"]
    raise ValueError(f"{peer} is not a batch-job peer")
