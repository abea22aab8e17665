"""The bench's pure part: statistics, paired ratios, the scaling model, the Markdown table.

No timing, no I/O, no Dask: ``tests/unit/test_bench.py`` checks these functions on made-up
numbers. ``bench/run.py`` measures and feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# --- statistics ---------------------------------------------------------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within 0..1, not {q}")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """median, min, max, quartiles and n of the repetitions (the raw values are kept too)."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": quantile(xs, 0.5), "min": min(xs), "max": max(xs),
            "q1": quantile(xs, 0.25), "q3": quantile(xs, 0.75), "values": xs}


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Summary of a[i] / b[i]: each repetition's A against the B measured next to it.

    Pairing the interleaved repetitions cancels slow drift (other load on the machine) that a
    ratio of two medians would keep.
    """
    if len(a) != len(b):
        raise ValueError(f"paired ratios need as many A as B values ({len(a)} != {len(b)})")
    ratios = [x / y for x, y in zip(a, b) if y]
    return summarize(ratios)


def interleave(variants: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """The run order: repetition by repetition, each round rotated (A B C, B C A, C A B, ...),
    so no variant always runs first (when caches are cold) or last."""
    order = []
    k = len(variants)
    for r in range(reps):
        for i in range(k):
            order.append((r, variants[(i + r) % k]))
    return order


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs; slope 0 from a single distinct x."""
    n = len(xs)
    if n == 0 or n != len(ys):
        raise ValueError("linear_fit needs as many x as y values, at least one")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def fits_to_reach(xs: Sequence[float], ys: Sequence[float], target: float):
    """The first x whose running-best score y reaches target (None if never)."""
    for x, y in zip(xs, ys):
        if y >= target - 1e-12:
            return x
    return None


# --- the scaling model (an extrapolation, on paper) ---------------------------------------------

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
    "divided by N (measured on loopback with TLS; an upper bound: it includes the heartbeats "
    "and client traffic of that window).",
    "The pessimistic time to ready is this machine's straight-line fit of ready time against N, "
    "where every worker start competes for the same 2 cores (no cluster is that bad unless "
    "the shared filesystem serialises the Python imports).",
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


def scaling_model(*, ready_one: float, join_cpu: float, ready_fit: tuple[float, float],
                  task_cpu: float, task_wall: float, heartbeat_cpu: float,
                  workers: Sequence[int] = (100, 1000)) -> dict[str, Any]:
    """Time to ready and tiny-task throughput at each N in ``workers``, as a range.

    ready_one      measured time to ready with one worker (scheduler start + one worker), s
    join_cpu       scheduler CPU per worker join, s
    ready_fit      (intercept, slope) of ready time against N on this machine, s and s/worker
    task_cpu       scheduler CPU per task, s (optimistic per-task cost)
    task_wall      measured wall time per task at 2 workers, s (pessimistic per-task cost)
    heartbeat_cpu  scheduler CPU per worker heartbeat, s
    """
    rows = []
    for n in workers:
        ready_lo = ready_one + (n - 1) * join_cpu
        ready_hi = ready_fit[0] + ready_fit[1] * n
        hb_rate = n / heartbeat_interval(n)
        hb_load = min(0.95, hb_rate * heartbeat_cpu)  # share of the scheduler's time
        tput_hi = (1 - hb_load) / task_cpu if task_cpu > 0 else float("nan")
        tput_lo = (1 - hb_load) / task_wall if task_wall > 0 else float("nan")
        rows.append({"workers": n,
                     "ready_s": [round(ready_lo, 2), round(max(ready_lo, ready_hi), 2)],
                     "heartbeats_per_s": round(hb_rate, 1),
                     "heartbeat_load": round(hb_load, 4),
                     "tasks_per_s": [round(tput_lo), round(max(tput_lo, tput_hi))]})
    return {"kind": "extrapolation (a model on paper, not a measurement)",
            "inputs": {"ready_one_s": ready_one, "join_cpu_s": join_cpu,
                       "ready_fit_s": list(ready_fit), "task_cpu_s": task_cpu,
                       "task_wall_s": task_wall, "heartbeat_cpu_s": heartbeat_cpu},
            "assumptions": MODEL_ASSUMPTIONS, "rows": rows}


# --- rendering ----------------------------------------------------------------------------------

def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no scientific notation for usual sizes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def fmt_ratio(s: dict[str, Any] | None) -> str:
    """'1.23x (1.10-1.40, n=3)' from a summary of ratios."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{fmt_num(s['median'])}x (n=1)"
    return f"{fmt_num(s['median'])}x ({fmt_num(s['min'])}-{fmt_num(s['max'])}, n={s['n']})"


def fmt_value(s: dict[str, Any] | None, unit: str) -> str:
    """'2.31 s [2.10-2.52]' from a summary of measurements."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{fmt_num(s['median'])} {unit}"
    return f"{fmt_num(s['median'])} {unit} [{fmt_num(s['min'])}-{fmt_num(s['max'])}]"


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub Markdown table; '|' in cells is escaped."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {r!r} has {len(r)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(cell(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    """The summary table: one row per comparison, from latest.json's ``headlines``.

    Each headline: {"figure", "a", "b", "ratio" (summary), "a_value", "b_value", "unit",
    "note"}; a section that could not run has {"figure", "skipped": reason}.
    """
    rows = []
    for h in results.get("headlines", []):
        if h.get("skipped"):
            rows.append([h["figure"], "-", "-", "not measured", h["skipped"]])
            continue
        unit = h.get("unit", "")
        rows.append([h["figure"],
                     f"{h['a']}: {fmt_value(h.get('a_value'), unit)}",
                     f"{h['b']}: {fmt_value(h.get('b_value'), unit)}",
                     fmt_ratio(h.get("ratio")),
                     h.get("note", "")])
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    """latest.md: the headline table, the scaling model, and what could not run."""
    meta = results.get("meta", {})
    out = [f"# hpcdask benchmarks ({'quick' if meta.get('quick') else 'full'} run)\n",
           f"{meta.get('started', '?')} on {meta.get('host', '?')} ({meta.get('cpus', '?')} cores, "
           f"{meta.get('memory_gib', '?')} GiB), Dask {meta.get('dask', '?')}; "
           f"run took {fmt_num(meta.get('duration_s'))} s. Ratios are A/B per interleaved "
           f"repetition: median (min-max, n pairs); values are median [min-max].\n\n",
           markdown_table(headline_rows(results),
                          ["figure", "A", "B", "ratio A/B", "note"])]
    model = results.get("scaling_model") or {}
    if model.get("rows"):
        out.append("\n## Scaling on paper (an extrapolation, not a measurement)\n\n")
        out.append(markdown_table(
            [[str(r["workers"]),
              f"{fmt_num(r['ready_s'][0])}-{fmt_num(r['ready_s'][1])} s",
              f"{fmt_num(r['tasks_per_s'][0])}-{fmt_num(r['tasks_per_s'][1])}",
              f"{fmt_num(r['heartbeats_per_s'])}/s ({fmt_num(100 * r['heartbeat_load'], 2)}%)"]
             for r in model["rows"]],
            ["workers", "time to ready", "tiny tasks/s", "heartbeats (scheduler load)"]))
        out.append("\nAssumptions:\n\n")
        out.extend(f"- {a}\n" for a in model.get("assumptions", []))
    elif model.get("skipped"):
        out.append(f"\nScaling model: not computed ({model['skipped']})\n")
    skipped = {k: v["skipped"] for k, v in results.get("sections", {}).items()
               if isinstance(v, dict) and v.get("skipped")}
    if skipped:
        out.append("\n## Not measured in this run\n\n")
        out.extend(f"- {k}: {why}\n" for k, why in skipped.items())
    plots = results.get("plots", [])
    if plots:
        out.append("\n## Plots\n\n")
        out.extend(f"- [{p}]({p})\n" for p in plots)
    return "".join(out)
