"""Every goal the bench is held to, and the verdicts: the one place that decides what results mean.

The sections (ready.py, transfer.py, ...) only measure and summarise; ``goal_rows`` reads their
summaries out of latest.json's ``sections`` and judges each against its goal. A verdict is

  met            every repetition is on the goal's side (the whole min-max spread)
  not met        every repetition misses it
  inconclusive   the spread straddles the goal, or fewer than MIN_N repetitions
  not measured   the section did not run (the reason is given)

Pure functions, checked in bench/tests/test_bench.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stats import fmt_num

MIN_N = 3

MET, NOT_MET, INCONCLUSIVE, NOT_MEASURED = "met", "not met", "inconclusive", "not measured"


def verdict(s: dict[str, Any] | None, op: str, threshold: float | Sequence[float]) -> str:
    """Judge a summary (n, min, max, ...) against ``op`` (">=", "<=" or "within" [lo, hi])."""
    if not s or not s.get("n"):
        return NOT_MEASURED
    if s["n"] < MIN_N:
        return INCONCLUSIVE
    lo, hi = s["min"], s["max"]
    if op == ">=":
        return MET if lo >= threshold else NOT_MET if hi < threshold else INCONCLUSIVE
    if op == "<=":
        return MET if hi <= threshold else NOT_MET if lo > threshold else INCONCLUSIVE
    if op == "within":
        a, b = threshold
        if a <= lo and hi <= b:
            return MET
        return NOT_MET if hi < a or lo > b else INCONCLUSIVE
    raise ValueError(f"unknown goal operator {op!r}")


def fmt_goal(op: str, threshold, unit: str) -> str:
    if op == "within":
        if threshold is None:
            return "within the band predicted from 1-16 workers"
        return f"within {fmt_num(threshold[0])}-{fmt_num(threshold[1])} {unit}".strip()
    return f"{op} {fmt_num(threshold)}{unit}"


def fmt_measured(s: dict[str, Any] | None, unit: str) -> str:
    """'0.97x (0.91-1.02, n=5)': median (min-max, n)."""
    if not s or not s.get("n"):
        return "-"
    sep = "" if unit == "x" else " "
    if s["n"] == 1:
        return f"{fmt_num(s['median'])}{sep}{unit} (n=1)"
    return (f"{fmt_num(s['median'])}{sep}{unit} ({fmt_num(s['min'])}-{fmt_num(s['max'])}, "
            f"n={s['n']})")


def _get(d: dict, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _skip_reason(sections: dict, name: str, *sub: str) -> str:
    s = sections.get(name) or {}
    for k in sub:
        if isinstance(s, dict) and isinstance(s.get(k), dict) and s[k].get("skipped"):
            return s[k]["skipped"]
    return s.get("skipped") or "not in this run"


# A goal: (figure, op, threshold, unit, section, how to read the summary, note).
Goal = tuple[str, str, Any, str, str, Callable[[dict], Any], str]


def _ready_goals(S: dict) -> list[Goal]:
    ns = _get(S, "ready", "workers") or [1]
    out: list[Goal] = []
    for n in ns:
        out += [(f"time to ready, scheduler + {n} worker(s), loopback TLS: image (kernel "
                 f"squashfs mount, setuid Apptainer's) / bare (same Python build)", "<=", 1.05,
                 "x", "ready", lambda S, n=n: _get(S, "ready", "ratios", "kernel/bare", str(n)),
                 "the mount made once for the run; the runner's own start is part of it"),
                (f"time to ready, scheduler + {n} worker(s), loopback TLS: image (FUSE mount, "
                 f"unprivileged Apptainer's; Debian's single-threaded squashfuse) / bare",
                 "<=", 1.05, "x", "ready",
                 lambda S, n=n: _get(S, "ready", "ratios", "container/bare", str(n)),
                 "Apptainer 1.3+ bundles a multithreaded squashfuse_ll: a worst case here")]
    return out


def _nworkers_goals() -> list[Goal]:
    note = "same venv (the image's Python run bare), loopback; hpcdask TLS, dask worker TCP"
    return [
        ("8 worker processes on one node, time to 8 registered: hpcdask worker / dask worker "
         "--nworkers 8", "<=", 0.6, "x", "nworkers",
         lambda S: _get(S, "nworkers", "ratios", "warm/dask ready"), note),
        ("8 worker processes on one node, process tree PSS: hpcdask worker / dask worker "
         "--nworkers 8", "<=", 0.7, "x", "nworkers",
         lambda S: _get(S, "nworkers", "ratios", "warm/dask pss"), note),
        ("hpcdask time to ready, 8 worker processes / 1 on one node", "<=", 1.5, "x",
         "nworkers", lambda S: _get(S, "nworkers", "ratios", "warm8/warm1 ready"),
         "the warm server's fork: one interpreter start per node"),
    ]


def _transfer_goals(S: dict) -> list[Goal]:
    sizes = _get(S, "transfer", "sizes") or [400_000_000]
    out: list[Goal] = []
    for size in sizes:
        mb = f"{size / 1e6:.0f} MB"
        out += [
            (f"{mb} worker to worker, Dask TLS / raw Python ssl (same cipher)", ">=", 0.80, "x",
             "transfer", lambda S, k=str(size): _get(S, "transfer", "ratios", k, "TLS/raw ssl"),
             "two network namespaces over a veth pair; receive memory warm in both"),
            (f"{mb} worker to worker, Dask TCP / raw TCP", ">=", 0.80, "x", "transfer",
             lambda S, k=str(size): _get(S, "transfer", "ratios", k, "TCP/raw TCP"), ""),
            (f"{mb} worker to worker, Dask TLS / Dask TCP (bulk cost of TLS)", ">=", 0.80, "x",
             "transfer", lambda S, k=str(size): _get(S, "transfer", "ratios", k, "TLS/TCP"),
             "raw ssl / raw TCP bounds it: see the transfer table"),
            (f"{mb} worker to worker, cold receive memory: Dask TLS / raw Python ssl", ">=",
             0.80, "x", "transfer",
             lambda S, k=str(size): _get(S, "transfer", "ratios", k, "TLS/raw ssl cold"),
             "memory as it comes: on this VM a first touch costs up to ~1 s per 400 MB"),
        ]
    return out


def all_goals(S: dict) -> list[Goal]:
    return [
        *_ready_goals(S),
        *_nworkers_goals(),
        ("default workload `hpcdask run`, wall time: image / bare (same Python build)", "<=", 1.03,
         "x", "workloads", lambda S: _get(S, "workloads", "default_workload", "ratio_wall"), ""),
        ("peers: hpcdask time to 3 workers / fastest peer (Slurm test cluster)", "<=", 1.0, "x",
         "peers", lambda S: _get(S, "peers", "ratio_ready_vs_fastest"),
         f"fastest peer: {_get(S, 'peers', 'fastest_ready')}; from sbatch (scale) to the user's "
         f"client seeing 3 workers, hpcdask's TLS and identity check included"),
        ("peers: hpcdask submission to the first dask.array result / fastest peer", "<=", 1.0,
         "x", "peers", lambda S: _get(S, "peers", "ratio_first_result_vs_fastest"),
         f"fastest peer: {_get(S, 'peers', 'fastest_first_result')}; each script imports "
         f"dask.array at its top, as users write it"),
        ("peers: hpcdask first / second run of the same dask.array sum in one job", "<=", 1.5,
         "x", "peers", lambda S: _get(S, "peers", "summary", "hpcdask", "first_over_second"),
         "the workers' first task of its kind: imports, connections"),
        ("peers: hpcdask ready to the job's end / SLURMRunner's", "<=", 1.0, "x", "peers",
         lambda S: _get(S, "peers", "ratio_ready_to_end_vs_slurmrunner"),
         "the same work (two sums, tiny tasks), then the job leaves the queue"),
        ("peers: hpcdask tiny tasks/s / fastest peer", ">=", 0.95, "x", "peers",
         lambda S: _get(S, "peers", "ratio_tasks_vs_fastest"),
         f"fastest peer: {_get(S, 'peers', 'fastest_tasks')}; hpcdask runs TLS, the peers TCP"),
        ("tiny tasks/s, hpcdask TLS / hpcdask --no-tls (small-message cost of TLS)", ">=", 0.90,
         "x", "throughput", lambda S: _get(S, "throughput", "ratios", "TLS/no-TLS"),
         "the bench's own goal"),
        *_transfer_goals(S),
        ("hyperband: partial fits to the score both reach, RandomizedSearchCV / Hyperband",
         ">=", 1.0, "x", "workloads",
         lambda S: _get(S, "workloads", "hyperband", "fits_ratio_randomized_over_hyperband"),
         "> 1: Hyperband needs fewer fits; one value per seed"),
        ("hyperband: wall time to that score, RandomizedSearchCV / Hyperband", ">=", 1.0, "x",
         "workloads",
         lambda S: _get(S, "workloads", "hyperband", "time_ratio_randomized_over_hyperband"),
         "one value per seed"),
        ("hyperband: held-out test accuracy, Hyperband - RandomizedSearchCV", ">=", 0.0, "",
         "workloads", lambda S: _get(S, "workloads", "hyperband", "test_score_difference"),
         "same validation split and test set for both; one value per seed"),
        ("grid search on 2 workers x 1 thread: sequential (1 thread) / joblib-dask", ">=", 1.6, "x",
         "workloads", lambda S: _get(S, "workloads", "gridsearch", "speedup"),
         "limit 2.0x on 2 cores; the loky control and the fit times in the grid search table"),
        *_scaling_goals(S),
    ]


def _scaling_goals(S: dict) -> list[Goal]:
    pred = _get(S, "scaling", "prediction") or {}
    out: list[Goal] = []
    for n, band in sorted(pred.get("bands", {}).items(), key=lambda kv: int(kv[0])):
        out.append((f"time to ready with {n} workers vs the model fitted on "
                    f"{pred.get('fitted_on')} before measuring", "within", band, "s", "scaling",
                    lambda S, n=n: _get(S, "scaling", "summary", n),
                    "prediction recorded before the measurement"))
    if not out:
        out.append(("time to ready at 32 and 64 workers vs the model's prediction", "within",
                    None, "s", "scaling", lambda S: None, ""))
    out.append(("100/1000-worker model band contains every measured point", ">=", 1.0, "",
                "model", lambda S: _get(S, "model", "band_contains"),
                "1 = every measured median inside the band"))
    return out


def goal_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One judged row per goal: figure, goal, measured, verdict, note (and the raw summary)."""
    S = results.get("sections", {})
    rows = []
    for figure, op, thr, unit, section, read, note in all_goals(S):
        s = read(S)
        v = verdict(s, op, thr)
        if v == NOT_MEASURED:
            note = _skip_reason(S, section, "default_workload", "hyperband", "gridsearch")
        rows.append({"figure": figure, "goal": fmt_goal(op, thr, unit), "op": op,
                     "threshold": thr, "unit": unit,
                     "measured": fmt_measured(s, unit), "verdict": v, "note": note,
                     "summary": s})
    return rows
