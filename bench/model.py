"""The scaling model: time to ready and tiny-task throughput at N workers, as a band.

Pure functions, checked in bench/tests/test_bench.py. The bench fits the model on the workers
it measured first (1-16), records its prediction for 32 and 64, measures those, and reports
both (bench/scaling.py measures, bench/goals.py judges). The 100/1000-worker rows are an
extrapolation from all measured points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stats import linear_fit

def heartbeat_interval(n: int) -> float:
    """distributed.scheduler.heartbeat_interval (2026.8): the heartbeat period Dask asks of each
    worker when n workers are connected (at most ~200 heartbeats a second in total)."""
    if n <= 10:
        return 0.5
    if n < 50:
        return 1.0
    if n < 200:
        return 2.0
    return n / 200 + 1


MODEL_ASSUMPTIONS = [
    "Workers start in parallel, one node each, so a worker's own start-up (import + TLS "
    "handshake + registration) is paid once, not N times; the scheduler then handles the "
    "joins one after another (its event loop is single-threaded).",
    "Per-join scheduler cost = the scheduler process's CPU time while N workers joined, "
    "divided by N (measured with TLS over the 3 test nodes' ib0; an upper bound: it includes the heartbeats "
    "and client traffic of that window).",
    "The pessimistic time to ready is this machine's straight-line fit of ready time against N "
    "(every worker start competes for the same 2 cores; no cluster is that bad unless the "
    "shared filesystem serialises the Python imports), raised by the largest amount any "
    "measured point lay above the fit.",
    "Throughput: tiny tasks are scheduler-bound; the scheduler spends (1 - heartbeat load) of "
    "its time on tasks at a measured cost per task. The optimistic cost per task is the "
    "scheduler's own CPU time per task; the pessimistic one is the measured wall time per task "
    "at 2 workers (which also holds the client's and the workers' share of the 2 cores).",
    "Heartbeat load = N / heartbeat_interval(N) heartbeats per second (Dask caps it near 200/s) "
    "times the measured scheduler CPU per heartbeat.",
    "Not modelled: the batch system's own start-up of 100-1000 tasks (srun fan-out, queue "
    "wait), a shared filesystem slowed by 1000 simultaneous imports, network congestion, "
    "and task graphs whose tasks take longer than the scheduler's per-task cost.",
]


def ready_band(n: int, *, ready_one: float, join_cpu: float, fit: Sequence[float],
               margin: float) -> list[float]:
    """[optimistic, pessimistic] seconds to ready with n workers.

    optimistic   one worker's start (they start in parallel) + n - 1 serial joins
    pessimistic  this machine's line (intercept, slope) + margin (largest residual above it)
    """
    lo = ready_one + (n - 1) * join_cpu
    hi = fit[0] + fit[1] * n + margin
    return [lo, max(lo, hi)]


def fit_ready(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """The line through (workers, seconds) points and the largest residual above it."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    a, b = linear_fit(xs, ys)
    margin = max(0.0, *(y - (a + b * x) for x, y in points))
    return {"fit": [a, b], "margin": margin, "fitted_on": sorted(set(xs))}


def in_band(value: float, band: Sequence[float]) -> bool:
    return band[0] <= value <= band[1]


def scaling_model(*, ready_one: float, join_cpu: float, ready_fit: Sequence[float],
                  task_cpu: float, task_wall: float, heartbeat_cpu: float, margin: float = 0.0,
                  workers: Sequence[int] = (100, 1000)) -> dict[str, Any]:
    """Time to ready and tiny-task throughput at each N in ``workers``, as a range.

    ready_one      measured time to ready with one worker (scheduler start + one worker), s
    join_cpu       scheduler CPU per worker join, s
    ready_fit      (intercept, slope) of ready time against N on this machine, s and s/worker
    margin         largest measured ready time above that line, s
    task_cpu       scheduler CPU per task, s (optimistic per-task cost)
    task_wall      measured wall time per task at 2 workers, s (pessimistic per-task cost)
    heartbeat_cpu  scheduler CPU per worker heartbeat, s
    """
    rows = []
    for n in workers:
        ready = ready_band(n, ready_one=ready_one, join_cpu=join_cpu, fit=ready_fit,
                           margin=margin)
        hb_rate = n / heartbeat_interval(n)
        hb_load = min(0.95, hb_rate * heartbeat_cpu)  # share of the scheduler's time
        tput_hi = (1 - hb_load) / task_cpu if task_cpu > 0 else float("nan")
        tput_lo = (1 - hb_load) / task_wall if task_wall > 0 else float("nan")
        rows.append({"workers": n,
                     "ready_s": [round(ready[0], 2), round(ready[1], 2)],
                     "heartbeats_per_s": round(hb_rate, 1),
                     "heartbeat_load": round(hb_load, 4),
                     "tasks_per_s": [round(tput_lo), round(max(tput_lo, tput_hi))]})
    return {"kind": "extrapolation (a model on paper, not a measurement)",
            "inputs": {"ready_one_s": ready_one, "join_cpu_s": join_cpu,
                       "ready_fit_s": list(ready_fit), "margin_s": margin, "task_cpu_s": task_cpu,
                       "task_wall_s": task_wall, "heartbeat_cpu_s": heartbeat_cpu},
            "assumptions": MODEL_ASSUMPTIONS, "rows": rows}


def from_results(sections: dict[str, Any]) -> dict[str, Any]:
    """The 100/1000-worker extrapolation from the `scaling` and `throughput` sections.

    Fitted on every measured size; ``band_contains`` is the share of measured medians that lie
    inside the model's own band (goals.py wants 1).
    """
    sc, t = sections.get("scaling", {}), sections.get("throughput", {})
    if not sc.get("summary") or not t.get("summary"):
        return {"skipped": "needs the scaling and throughput sections"}
    pts = [(int(n), v) for n, runs in sc["runs"].items() for v in
           (x["ready_s"] for x in runs) if v is not None and v == v]
    fit = fit_ready(pts)
    pred = sc["prediction"]
    ns = sorted(int(n) for n in sc["summary"] if sc["summary"][n].get("n"))
    lo_n, hi_n = str(pred["fitted_on"][0]), str(pred["fitted_on"][-1])
    idle = sc.get("idle_cpu_rate", {})
    extra_hb = int(hi_n) / heartbeat_interval(int(hi_n)) - int(lo_n) / heartbeat_interval(int(lo_n))
    hb = 0.0
    if idle.get(lo_n) and idle.get(hi_n) and extra_hb > 0:
        hb = max(0.0, (idle[hi_n][0] - idle[lo_n][0]) / extra_hb)
    ts = t["summary"]["hpcdask TLS"]
    m = scaling_model(ready_one=pred["ready_one_s"], join_cpu=pred["join_cpu_s"],
                      ready_fit=fit["fit"], margin=fit["margin"],
                      task_cpu=ts["scheduler_cpu_per_task_s"]["median"],
                      task_wall=1 / ts["tasks_per_s"]["median"], heartbeat_cpu=hb)
    inside = [in_band(sc["summary"][str(n)]["median"],
                      ready_band(n, ready_one=pred["ready_one_s"], join_cpu=pred["join_cpu_s"],
                                 fit=fit["fit"], margin=fit["margin"])) for n in ns]
    m["fitted_on"] = ns
    m["band_contains"] = {"n": len(inside), "median": sum(inside) / len(inside),
                          "min": sum(inside) / len(inside), "max": sum(inside) / len(inside)}
    m["from"] = ("scaling: hpcdask scheduler-file path, TLS over the test nodes' ib0; "
                 "throughput: hpcdask TLS")
    return m
