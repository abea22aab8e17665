"""Section `scaling`: time to ready with 1 to 64 worker processes over the 3 nodes of the Slurm
test cluster, against the model's prediction.

Every worker is a process of an `hpcdask worker --nworkers K` command (one thread, 256 MiB), one
command per node as the jobscripts start them, from the bench's venv, TLS over the nodes' ib0: the scheduler and the bench's client in the first node's network namespace
(scale_probe.py, run there), the workers spread over the nodes in turn. Slurm is not involved:
this measures Dask's joins, not the batch system. The model (bench/model.py) is fitted on the
first sizes (1-16) and its band for the larger ones (32, 64) is recorded in the results *before*
they are measured; goals.py then compares. The scheduler's CPU per join and per heartbeat (idle,
smallest and largest fitted size) feed the 100/1000-worker extrapolation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import stats
from common import env_clean, log, ok
from model import fit_ready, ready_band

HERE = Path(__file__).resolve().parent


def probe(nodes: list[str], n: int, tmp: Path, idle: float, timeout: float = 600) -> dict:
    """One measurement with n workers: scale_probe.py in the first node's namespace."""
    kw = {"n": n, "tmp": str(tmp), "what": f"scale{n}", "idle_s": idle, "memory": "256MiB",
          "timeout": timeout, "interface": "ib0", "worker_netns": nodes, "per_node": True}
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{nodes[0]}", sys.executable,
                           HERE / "scale_probe.py", json.dumps(kw)], capture_output=True,
                          text=True, timeout=timeout + 120, env=env_clean(), cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"scale_probe exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section(args, setup, tmp) -> dict:
    fit_ns = [1, 2] if args.quick else [1, 2, 4, 8, 16]
    pred_ns = [4] if args.quick else [32, 64]
    reps = 1 if args.quick else 3  # a verdict needs 3
    runs: dict[str, list[dict]] = {}

    cluster = setup.rig()
    nodes = [cluster.netns(node) for node in cluster.nodes]

    def measure(n: int, r: int, idle: float = 0) -> None:
        try:
            res = probe(nodes, n, tmp, idle)
            log(f"scaling n={n} rep {r}: {res['ready_s']:.2f}s over {len(nodes)} nodes")
        except Exception as e:
            res = {"ready_s": float("nan"), "error": str(e)[:400]}
            log(f"scaling n={n} rep {r} FAILED: {e}")
        runs.setdefault(str(n), []).append(res)

    for r in range(reps):
        for n in fit_ns:
            measure(n, r, idle=3.0 if r == 0 and n in (fit_ns[0], fit_ns[-1]) else 0)
    pts = [(n, x["ready_s"]) for n in fit_ns for x in runs[str(n)] if x["ready_s"] == x["ready_s"]]
    joins = ok([x.get("join_cpu_s", float("nan")) for x in runs[str(fit_ns[-1])]])
    fit = fit_ready(pts)
    one = stats.quantile([p[1] for p in pts if p[0] == 1], 0.5)
    join_cpu = stats.quantile(joins, 0.5) if joins else 0.0
    prediction = {"fitted_on": fit_ns, **fit, "ready_one_s": one, "join_cpu_s": join_cpu,
                  "bands": {str(n): ready_band(n, ready_one=one, join_cpu=join_cpu,
                                               fit=fit["fit"], margin=fit["margin"])
                            for n in pred_ns}}
    log(f"scaling: the model fitted on {fit_ns} predicts " + ", ".join(
        f"{n}: {b[0]:.1f}-{b[1]:.1f}s" for n, b in prediction["bands"].items()))
    for r in range(reps):
        for n in pred_ns:
            measure(n, r)
    idle = {n: [x["idle_cpu_rate"] for x in runs[str(n)] if "idle_cpu_rate" in x]
            for n in (fit_ns[0], fit_ns[-1])}
    all_ns = fit_ns + pred_ns
    return {"workers": all_ns, "reps": reps, "nodes": len(nodes), "interface": "ib0",
            "prediction": prediction, "runs": runs,
            "idle_cpu_rate": {str(n): v for n, v in idle.items()},
            "summary": {str(n): stats.summarize(ok([x["ready_s"] for x in runs[str(n)]]))
                        for n in all_ns}}
