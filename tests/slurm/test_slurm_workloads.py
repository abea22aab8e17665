"""Every workload at ``--size small`` on the Slurm test cluster: one all-in-one job over three
nodes (workers on ib0, every role in the image) runs them all through a user script, and each
result passes the same checks against its single-machine baseline as on a LocalCluster
(test_workloads_local.py's ``check_*`` functions, tolerances stated there)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loopback import test_workloads_local as local
from slurm.test_slurm_jobs import assert_clean, jobscript, submit

from hpcdask.workloads import WORKLOADS

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1500)]

SCRIPT = """\
import sys
from pathlib import Path
from distributed import get_client
from hpcdask.workloads import WORKLOADS, execute

out = Path(sys.argv[1])
client = get_client()
for name in WORKLOADS:
    path = execute(client, name, "small", 0, out / name)
    print(f"WORKLOAD-DONE {name} {path}", flush=True)
"""


def test_every_workload_on_three_nodes(slurm_cluster, job_env, udir):
    (udir / "all_workloads.py").write_text(SCRIPT)
    out = slurm_cluster.mkdtemp("out-")
    # --mem: Slurm enforces it (OverMemoryKill). Each node's worker is sized from it, less its
    # nanny's share and, on the batch node, the scheduler's and client's: the incremental
    # workload's data outgrows the smallest worker, which pauses and spills; no step is killed.
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=30"], ["all_workloads.py", str(out)], job_env,
                 udir, timeout=1400)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    done = dict(re.findall(r"^WORKLOAD-DONE (\S+) (\S+)$", res.stdout, re.M))
    assert set(done) == set(WORKLOADS), str(res)
    for name, path in done.items():
        m = json.loads(Path(path).read_text())
        assert m["workload"] == name and m["size"] == "small"
        assert m["cluster"]["workers"] == 3
        hosts = {h for h in m["cluster"]["worker_hosts"]}
        assert hosts == set(slurm_cluster.addresses.values()), (name, hosts)
        check = getattr(local, f"check_{name}", None)
        if name == "incremental":
            assert m["worker_memory_limit_min"] == (1500 - 160 - 750) * 2**20
            check(m, Path(path).parent, workers=3)
        elif name == "xgboost":
            tracker = m["cluster"]["scheduler"][len("tls://"):].rsplit(":", 1)[0]
            check(m, Path(path).parent, tracker_host=tracker)
        elif name == "gridsearch":  # a worker per node, threads and BLAS from its allocation
            check(m, Path(path).parent, threads=None, local_cpus=False)
        elif check is not None:
            check(m, Path(path).parent)
        else:  # pipeline and smoke: the same model as scikit-learn on the same blocks
            assert m["max_coef_difference"] < 1e-9
            assert abs(m["score"] - m["baseline_score"]) <= 1 / m["data"]["test"]
    assert "exceeded memory limit" not in res.stderr
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
