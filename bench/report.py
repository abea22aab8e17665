"""latest.md: the goal table first, then each section's measured values, the model, the load.

Pure functions of latest.json's content, checked in bench/tests/test_bench.py.
"""

from __future__ import annotations

from typing import Any

from goals import goal_rows
from stats import fmt_num, fmt_value, markdown_table


def _load(x) -> str:
    return " / ".join(fmt_num(v, 2) for v in x) if x else "-"


def goal_table(results: dict[str, Any]) -> str:
    rows = [[r["figure"], r["goal"], r["measured"], f"**{r['verdict']}**", r["note"]]
            for r in goal_rows(results)]
    return markdown_table(rows, ["figure", "goal", "measured: median (min-max, n)", "verdict",
                                 "note"])


def _details(S: dict[str, Any]) -> list[str]:
    out = []
    r = S.get("ready", {})
    if r.get("summary"):
        out.append("\n## Time to ready on loopback (TLS), image vs bare\n\n")
        b = r.get("bare", {})
        out.append(f"Bare: `{b.get('how')}`, Python {b.get('python')}; "
                   f"image: Python {b.get('image_python')}.\n\n")
        out.append(markdown_table(
            [[str(n), fmt_value(r["summary"]["container"][str(n)], "s"),
              fmt_value(r["summary"]["bare"][str(n)], "s")] for n in r["workers"]],
            ["workers", "image (runner)", "bare venv"]))
    out.extend(_peers(S.get("peers", {})))
    t = S.get("throughput", {})
    if t.get("summary"):
        out.append(f"\n## Tiny tasks ({t['tasks']} x inc, 2 workers x 1 thread)\n\n")
        out.append(markdown_table(
            [[k, fmt_value(v["tasks_per_s"], "tasks/s"),
              f"{fmt_num(v['scheduler_cpu_per_task_s']['median'] * 1e6)} us"]
             for k, v in t["summary"].items()],
            ["cluster", "tasks/s", "scheduler CPU per task"]))
    x = S.get("transfer", {})
    if x.get("summary"):
        out.append(f"\n## Transfer: {x['path']}\n\n")
        out.append(f"Ciphers: {x.get('ciphers')}.\n\n")
        rows = []
        for s in x["sizes"]:
            for v, q in x["summary"][str(s)].items():
                q = {**q, **{k: q[k] / 1e6 for k in ("median", "min", "max") if k in q}}
                rows.append([f"{s / 1e6:.0f} MB", v, fmt_value(q, "MB/s")])
        out.append(markdown_table(rows, ["size", "variant", "bandwidth"]))
    w = S.get("workloads", {})
    hb = w.get("hyperband", {})
    if hb.get("runs"):
        out.append("\n## Hyperband vs RandomizedSearchCV (same validation split and test set)\n\n")
        out.append(markdown_table(
            [[str(q["seed"]), fmt_num(q["target_validation_score"], 4),
              f"{q['hyperband_fits_to_target']} / {q['randomized_fits_to_target']}",
              f"{fmt_num(q['hyperband_s_to_target'])} / {fmt_num(q['randomized_s_to_target'])}",
              f"{fmt_num(q['hyperband_test_score'], 4)} / {fmt_num(q['randomized_test_score'], 4)}"]
             for q in hb["runs"]],
            ["seed", "score both reach", "fits to it (HB / RS)", "seconds to it (HB / RS)",
             "test accuracy (HB / RS)"]))
    gs = w.get("gridsearch", {})
    if gs.get("runs"):
        out.append(f"\n## Grid search: {gs['fits']} fits, {gs['samples']:,} samples, "
                   f"mean fit {fmt_value(gs['mean_fit_s'], 's')}\n\n")
        loky = "loky_s" in gs["runs"][0]

        def fit(q, v):
            return fmt_num(q.get(f"{v}_mean_fit_s", float("nan")))
        out.append(markdown_table(
            [[str(i), f"{fmt_num(q['sequential_s'])} ({fit(q, 'sequential')})",
              f"{fmt_num(q['joblib-dask_s'])} ({fit(q, 'joblib-dask')})",
              *([f"{fmt_num(q['loky_s'])} ({fit(q, 'loky')})"] if loky else [])]
             for i, q in enumerate(gs["runs"])],
            ["rep", "sequential s (mean fit s)", "joblib-dask s (mean fit s)",
             *(["loky, 2 processes s (mean fit s)"] if loky else [])]))
        if loky:
            out.append(f"\nControl: joblib's own loky pool (2 processes, no Dask) runs the same "
                       f"search at {fmt_value(gs['speedup_loky'], 'x')} of sequential: what two "
                       f"concurrent fits of this pipeline give on these 2 cores at all.\n")
    sc = S.get("scaling", {})
    if sc.get("summary"):
        p = sc["prediction"]
        where = (f"over the {sc['nodes']} test nodes' {sc['interface']}" if sc.get("nodes")
                 else "on loopback")
        out.append(f"\n## Scaling: time to ready, 1-{sc['workers'][-1]} worker processes {where} "
                   f"(model fitted on {p['fitted_on']}, predicted before measuring)\n\n")
        out.append(markdown_table(
            [[str(n), fmt_value(sc["summary"][str(n)], "s"),
              (f"{fmt_num(p['bands'][str(n)][0])}-{fmt_num(p['bands'][str(n)][1])} s"
               if str(n) in p["bands"] else "(fitted)")] for n in sc["workers"]],
            ["workers", "measured", "predicted band"]))
    m = S.get("model", {})
    if m.get("rows"):
        out.append("\n## Scaling on paper: 100 and 1000 workers (an extrapolation)\n\n")
        out.append(markdown_table(
            [[str(q["workers"]), f"{fmt_num(q['ready_s'][0])}-{fmt_num(q['ready_s'][1])} s",
              f"{fmt_num(q['tasks_per_s'][0])}-{fmt_num(q['tasks_per_s'][1])}",
              f"{fmt_num(q['heartbeats_per_s'])}/s ({fmt_num(100 * q['heartbeat_load'], 2)}%)"]
             for q in m["rows"]],
            ["workers", "time to ready", "tiny tasks/s", "heartbeats (scheduler load)"]))
        out.append("\nAssumptions:\n\n")
        out.extend(f"- {a}\n" for a in m.get("assumptions", []))
    return out


def _peers(pe: dict[str, Any]) -> list[str]:
    if not pe.get("summary"):
        return []
    out = [f"\n## Peers on the Slurm test cluster ({pe['workers']} workers on {pe['nodes']} nodes, "
           f"same .sif, {pe['reps']} interleaved repetitions)\n\n"]
    rows = []
    for peer, s in pe["summary"].items():
        runs = pe["runs"].get(peer, [])
        left = sorted({f"{k}: {_left_name(k, x)}" for r in runs
                       for k, v in r.get("left", {}).items() for x in v})
        mounts = max((r.get("runner_mounts_left", 0) for r in runs), default=0)
        if mounts:
            left.append(f"the test runner's squashfuse mounts still up 1 s after: up to {mounts}")
        rows.append([peer, fmt_value(s["ready_s"], "s"), fmt_value(s["tasks_per_s"], "tasks/s"),
                     fmt_value(s["teardown_s"], "s"), "; ".join(left) or "nothing"])
    out.append(markdown_table(rows, ["peer", "sbatch/scale to ready", "tiny tasks/s",
                                     "teardown", "left behind"]))
    if pe.get("errors"):
        out.append(f"\nFailed repetitions: {len(pe['errors'])} ({pe['errors'][0][:200]}).\n")
    return out


def _left_name(kind: str, what: str) -> str:
    """A left-behind entry, short: a process ("PID /path/prog args") by its program's name, a
    path by its last part."""
    if kind == "processes":
        argv = what.split()
        return argv[1].rsplit("/", 1)[-1] if len(argv) > 1 else what
    return what.rstrip("/").rsplit("/", 1)[-1]


def render_markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    S = results.get("sections", {})
    out = [f"# hpcdask benchmarks ({'quick' if meta.get('quick') else 'full'} run)\n\n",
           f"{meta.get('started', '?')} on {meta.get('host', '?')} ({meta.get('cpus', '?')} cores, "
           f"{meta.get('memory_gib', '?')} GiB), Dask {meta.get('dask', '?')}; the run took "
           f"{fmt_num(meta.get('duration_s'))} s. Load average (1/5/15 min) at the start "
           f"{_load(meta.get('load_avg_at_start'))}, at the end "
           f"{_load(meta.get('load_avg_at_end'))}. Ratios are taken per interleaved "
           f"repetition pair. A verdict is *met* when every repetition is on the goal's side, "
           f"*not met* when none is, *inconclusive* when the spread straddles the goal (or "
           f"fewer than 3 repetitions).\n\n",
           goal_table(results)]
    out.append("\n## Load average around each section\n\n")
    out.append(markdown_table(
        [[k, _load(v.get("load_before")), _load(v.get("load_after")),
          fmt_num(v.get("section_s"))] for k, v in S.items()
         if isinstance(v, dict) and "load_before" in v],
        ["section", "load before (1/5/15)", "load after", "seconds"]))
    out.extend(_details(S))
    skipped = {k: v["skipped"] for k, v in S.items() if isinstance(v, dict) and v.get("skipped")}
    if skipped:
        out.append("\n## Not measured in this run\n\n")
        out.extend(f"- {k}: {why}\n" for k, why in skipped.items())
    if results.get("plots"):
        out.append("\n## Plots\n\n")
        out.extend(f"- [{p}]({p})\n" for p in results["plots"])
    return "".join(out)
