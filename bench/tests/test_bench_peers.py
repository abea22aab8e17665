"""bench/peers.py and bench/peer_scripts.py: the peers' scripts as text, and how the runs are read,
summarised and judged. No timings are asserted; the measuring runs on the Slurm rig
(`bench/run.py --only peers`)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import goals as G  # noqa: E402
import peer_scripts as PS  # noqa: E402
import peers as P  # noqa: E402
import report as R  # noqa: E402


@pytest.mark.parametrize("name", ["HPCDASK_SCRIPT", "SEEDS_CLIENT", "RUNNER_SCRIPT",
                                  "CLUSTER_SCRIPT"])
def test_user_scripts_are_python_ending_in_the_probe(name):
    text = getattr(PS, name)
    tree = ast.parse(text)
    calls = [n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "probe" in calls, name  # every peer measures the same way
    assert "def probe(client, n, extra=dict):" in text


@pytest.mark.parametrize("name", ["SEEDS_JOB", "RUNNER_JOB"])
def test_jobscripts_are_bash(name):
    bash = shutil.which("bash")
    proc = subprocess.run([bash, "-n"], input=getattr(PS, name), text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_the_seeds_recipe_is_plain_tcp_with_a_scheduler_file_and_srun_workers():
    job = PS.SEEDS_JOB
    assert 'dask scheduler --scheduler-file "$sf" --interface ib0 &' in job
    assert 'srun apptainer exec "$HPCDASK_IMAGE" dask worker --scheduler-file "$sf"' in job
    assert "tls" not in job.lower()


def test_the_probe_prints_one_peer_line_read_back_by_peer_line():
    calls = []

    class FakeClient:
        class scheduler:
            address = "tcp://10.0.0.1:8786"

        def wait_for_workers(self, n, timeout):
            calls.append(("wait", n))

        def scheduler_info(self, n_workers):
            return {"workers": {"a": {"host": "10.0.0.2"}, "b": {"host": "10.0.0.3"}}}

        def map(self, f, xs, pure):
            return [f(x) for x in xs]

        def gather(self, futs):
            return futs

    ns: dict = {}
    exec(compile(PS.PROBE, "probe", "exec"), ns)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("noise")
        ns["probe"](FakeClient(), 2, lambda: {"jobs": ["7"]})
    rec = PS.peer_line(buf.getvalue())
    assert calls == [("wait", 2)]
    assert rec["workers"] == 2 and rec["hosts"] == ["10.0.0.2", "10.0.0.3"]
    assert rec["jobs"] == ["7"] and rec["tasks"] == 1000 and len(rec["rates"]) == 3
    assert rec["t_done"] >= rec["t_ready"] and rec["tasks_per_s"] > 0
    assert PS.peer_line("no record here\n") is None


def test_sbatch_args():
    assert PS.sbatch_args("slurmrunner", 3) == ["-N3", "-n5", "--mem=2000M", "--time=5"]
    assert PS.sbatch_args("seeds", 3) == PS.sbatch_args("hpcdask", 3) == [
        "-N3", "--mem=2000M", "--time=5"]
    with pytest.raises(ValueError):
        PS.sbatch_args("slurmcluster", 3)


def test_top_level_collapses_to_the_entry_in_each_nodes_tmp():
    s = "/var/lib/hpcdask-test/hpcd4/nodes"
    paths = {f"{s}/node1/tmp/dask-scratch-space/worker-x/storage",
             f"{s}/node1/tmp/dask-scratch-space/global.lock", f"{s}/node2/var-tmp/f",
             f"{s}/login/tmp/dask-scratch-space"}
    assert P.top_level(paths) == [f"{s}/login/tmp/dask-scratch-space",
                                  f"{s}/node1/tmp/dask-scratch-space", f"{s}/node2/var-tmp/f"]


def _runs():
    nan = float("nan")
    return {
        "hpcdask": [{"ready_s": 12.0, "tasks_per_s": 700.0}, {"ready_s": 10.0, "tasks_per_s": 720.0},
                    {"ready_s": nan, "tasks_per_s": nan, "error": "x"}],
        "seeds": [{"ready_s": 8.0, "tasks_per_s": 800.0}, {"ready_s": 10.0, "tasks_per_s": 900.0},
                  {"ready_s": 9.0, "tasks_per_s": 850.0}],
        "slurmrunner": [{"ready_s": 6.0, "tasks_per_s": 600.0},
                        {"ready_s": 5.0, "tasks_per_s": 650.0},
                        {"ready_s": 7.0, "tasks_per_s": 640.0}],
    }


def test_summarize_pairs_hpcdask_with_the_fastest_peer_by_median():
    out = P.summarize(_runs())
    assert out["fastest_ready"] == "slurmrunner" and out["fastest_tasks"] == "seeds"
    r = out["ratio_ready_vs_fastest"]
    assert r["n"] == 2 and r["values"] == [2.0, 2.0]  # the failed repetition drops out
    t = out["ratio_tasks_vs_fastest"]
    assert t["values"] == [700 / 800, 720 / 900]
    assert out["summary"]["hpcdask"]["ready_s"]["n"] == 2
    assert P.fastest({"hpcdask": out["summary"]["hpcdask"]}, "ready_s", False) is None


def test_peer_goals_and_report_read_the_section():
    pe = {"nodes": 3, "workers": 3, "reps": 3, "errors": [],
          "runs": {p: [{**r, "left": {"node_tmp": ["/x/nodes/n1/tmp/dask-scratch-space"]}
                       if p == "seeds" else {}} for r in rs] for p, rs in _runs().items()},
          **P.summarize(_runs())}
    rows = {r["figure"]: r for r in G.goal_rows({"sections": {"peers": pe}})}
    ready = rows["peers: hpcdask time to 3 workers / fastest peer (Slurm test cluster)"]
    assert ready["verdict"] == G.INCONCLUSIVE  # n=2 < MIN_N
    assert ready["note"].startswith("fastest peer: slurmrunner;")
    tasks = rows["peers: hpcdask tiny tasks/s / fastest peer"]
    assert tasks["note"].startswith("fastest peer: seeds;")
    md = "".join(R._peers(pe))
    assert "| seeds | 9.00 s [8.00-10.0] | 850 tasks/s [800-900] | - | node_tmp: " in md
    assert "node_tmp: dask-scratch-space" in md and "| slurmrunner |" in md
