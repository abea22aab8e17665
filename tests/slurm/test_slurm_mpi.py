"""Issue 14's dask-mpi recipe on the strict Slurm test cluster: ``sbatch -N 3 -n 4
dask-mpi.sbatch SCRIPT``, one ``srun --mpi=pmi2`` step whose ranks all run ``hpcdask mpi`` in
the test image (its MPICH talking PMI to Slurm's pmi2 plugin): rank 0 the scheduler, rank 1 the
client, ranks 2-3 workers. Required in CI: without the cluster or the image these FAIL."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from slurm.test_slurm_jobs import assert_clean, jobscript, measure, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = '''
import json, socket
import dask.array as da
from distributed import get_client
from hpcdask.connect import cluster_info

client = get_client()
x = da.arange(2_000_000, chunks=100_000)
total = int((x * 3).sum().compute())
info = cluster_info(client)  # not scheduler_info(): see hpcdask.connect.cluster_info
print("RESULT " + json.dumps({
    "sum": total, "scheduler": info["address"],
    "workers": {a: w["name"] for a, w in info["workers"].items()},
    "hosts": client.run(socket.gethostname),
    "scheduler_host": client.run_on_scheduler(socket.gethostname),
}), flush=True)
'''


def test_dask_mpi_layout_runs_every_rank_in_the_image_with_tls_on_ib0(slurm_cluster, job_env,
                                                                      udir):
    script = udir / "mpi_check.py"
    script.write_text(SCRIPT)
    slurm_cluster.give(script)
    # ib0 is the default, named here too: hpcuser's home is shared by every cluster instance on
    # this machine, and test_slurm_jobs.py's interface test (run by another instance at the same
    # time) briefly puts `interface: eth0` into ~/.config/dask/; the variable outranks the file.
    env = {**job_env, "HPCDASK_INTERFACE": "ib0"}
    # Block distribution of 4 ranks over 3 nodes: ranks 0-1 on the first, one worker on each other.
    t0 = time.monotonic()
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-mpi.sbatch"),
                 ["-N3", "-n4", "--mem=1500M", "--time=5"], [script.name], env, udir,
                 timeout=300)
    seconds = time.monotonic() - t0
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    m = re.search(r"^RESULT (.*)$", res.stdout, re.M)
    assert m, str(res)
    out = json.loads(m.group(1))
    # The workload's answer: 3 * sum(range(2e6)).
    assert out["sum"] == 3 * (2_000_000 * (2_000_000 - 1) // 2)
    # dask-mpi's layout: ranks 0-3 from one MPI world, each saying its role.
    roles = dict(re.findall(r"hpcdask mpi: rank (\d) of 4 on \S+ \(\d rank\(s\) on this node\): "
                            r"(\w+)", res.stderr))
    assert roles == {"0": "scheduler", "1": "client", "2": "worker", "3": "worker"}, res.stderr
    assert sorted(out["workers"].values()) == ["rank-2", "rank-3"]
    # TLS everywhere, on ib0 addresses, and the ranks on three nodes (the workers on two).
    ib0 = slurm_cluster.addresses  # node -> its ib0 address
    addrs = [out["scheduler"], *out["workers"]]
    assert all(a.startswith("tls://") for a in addrs), addrs
    ips = {re.match(r"tls://([\d.]+):\d+$", a).group(1) for a in addrs}
    assert ips <= set(ib0.values()) and len(ips) == 3, (ips, ib0)
    assert len(set(out["hosts"].values())) == 2 and out["scheduler_host"] not in out["hosts"].values()
    # The identity check: the scheduler's guard proved each worker, each worker checked itself
    # against the scheduler before starting (it logs "joined" only after), the client checked all.
    for addr in out["workers"]:
        assert f"hpcdask.guard - INFO - hpcdask: worker {addr} proved its identity" in res.stderr
    assert res.stderr.count("hpcdask: 1 worker(s) on ") == 2, res.stderr
    # The end: the client rank's message stops the scheduler, which retires the workers in order.
    assert "hpcdask scheduler stopping (the client rank is done (exit 0)): retiring 2 worker(s)" \
        in res.stderr, res.stderr
    assert "the MPI step ended (exit 0)" in res.stderr
    # provenance.json of the client rank, as `hpcdask client` writes it.
    prov = json.loads(next(udir.glob(f"hpcdask-output/mpi_check-job{res.job_id}/provenance.json"))
                      .read_text())
    assert prov["exit_status"] == 0, prov
    # Nothing left: cluster folder, node-local $TMPDIR, /tmp; no traceback or ERROR in any log.
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
    assert " - WARNING - " not in res.stderr, res.stderr
    step = float(re.search(r"the MPI step ended \(exit 0\) after ([\d.]+)s", res.stderr).group(1))
    measure("dask-mpi job, 4 ranks on 3 nodes", sbatch_to_done_s=round(seconds, 1), job_s=step)


def test_dask_mpi_with_too_few_ranks_is_one_line_and_exit_2(slurm_cluster, job_env, udir):
    script = udir / "mpi_check.py"
    script.write_text(SCRIPT)
    slurm_cluster.give(script)
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-mpi.sbatch"),
                 ["-N2", "-n2", "--mem=1000M", "--time=3"], [script.name], job_env, udir,
                 timeout=180)
    assert res.state == "FAILED" and res.exit_code == 2, str(res)
    # One line naming the fix, before any rank starts (no srun step at all).
    assert res.stderr.strip().splitlines() == [
        "hpcdask-job: error: dask-mpi's layout needs at least 3 MPI ranks (scheduler, client, one "
        "worker), this job has 2; submit with more, e.g. sbatch -N 2 -n 4 dask-mpi.sbatch "
        "mpi_check.py"], str(res)
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
