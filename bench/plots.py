"""The PNG plots of a run, each with its goal lines (matplotlib, Agg). Returns the files made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goals import goal_rows
from model import ready_band


def _ax_done(ax, fig, outdir: Path, name: str, made: list[str]) -> None:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(outdir / name, dpi=100)
    made.append(name)


def plots(res: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made: list[str] = []
    S = res["sections"]

    # 1. every ratio goal: median with min-max, and its goal as a red tick
    rows = [r for r in goal_rows(res) if r["unit"] == "x" and r["summary"]
            and r["summary"].get("n")]
    if rows:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
        for i, r in enumerate(rows):
            s = r["summary"]
            color = {"met": "C2", "not met": "C3"}.get(r["verdict"], "C1")
            ax.errorbar([s["median"]], [i], xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                        fmt="o", color=color, capsize=3)
            thr = r["threshold"]
            ax.plot([thr, thr], [i - 0.35, i + 0.35], color="red", lw=2)
        ax.set_yticks(range(len(rows)), [r["figure"][:70] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ratio (median, min-max); red: the goal; green met, red not met, "
                      "orange inconclusive")
        ax.set_title("Goals")
        _ax_done(ax, fig, outdir, "goals.png", made)
        plt.close(fig)

    # 2. transfer bandwidth with the 0.80x goal lines
    x = S.get("transfer", {})
    if x.get("summary"):
        s = x["summary"][str(x["sizes"][-1])]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        names = list(s)
        med = [s[v]["median"] / 1e6 for v in names]
        err = [[(s[v]["median"] - s[v]["min"]) / 1e6 for v in names],
               [(s[v]["max"] - s[v]["median"]) / 1e6 for v in names]]
        ax.bar(range(len(names)), med, yerr=err, capsize=4,
               color=[f"C{i}" for i in range(len(names))])
        for limit, dask in (("raw ssl", "dask TLS"), ("raw TCP", "dask TCP"),
                            ("raw ssl cold", "dask TLS cold")):
            if limit not in s or dask not in s:
                continue
            i = names.index(dask)
            g = 0.8 * s[limit]["median"] / 1e6
            ax.plot([i - 0.4, i + 0.4], [g, g], color="red", lw=2)
        ax.set_xticks(range(len(names)), [n.replace(" cold", "\ncold") for n in names],
                      fontsize=8)
        ax.set_ylabel("MB/s")
        ax.set_title(f"{x['sizes'][-1] / 1e6:.0f} MB worker to worker; red: goal 0.80x of the "
                     f"raw limit", fontsize=9)
        _ax_done(ax, fig, outdir, "transfer.png", made)
        plt.close(fig)

    # 3. scaling: measured, the prediction made before measuring, and the 1-1000 model band
    sc, m = S.get("scaling", {}), S.get("model", {})
    if sc.get("summary"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        p = sc["prediction"]
        if m.get("inputs"):
            inp = m["inputs"]
            ns = np.unique(np.logspace(0, 3, 50).astype(int))
            band = [ready_band(int(n), ready_one=inp["ready_one_s"], join_cpu=inp["join_cpu_s"],
                               fit=inp["ready_fit_s"], margin=inp["margin_s"]) for n in ns]
            ax.fill_between(ns, [b[0] for b in band], [b[1] for b in band], alpha=0.2,
                            label="model band (fitted on every measured point)")
        for n, b in p["bands"].items():
            ax.plot([int(n), int(n)], b, color="red", lw=6, alpha=0.5,
                    label="predicted before measuring" if n == list(p["bands"])[0] else None)
        pts = [(int(n), q) for n, q in sc["summary"].items() if q.get("n")]
        ax.errorbar([n for n, _ in pts], [q["median"] for _, q in pts],
                    yerr=[[q["median"] - q["min"] for _, q in pts],
                          [q["max"] - q["median"] for _, q in pts]], fmt="o", color="k",
                    capsize=3, label="measured (this machine, loopback TLS)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("seconds to ready")
        ax.legend(fontsize=8)
        _ax_done(ax, fig, outdir, "scaling.png", made)
        plt.close(fig)

    # 4. hyperband vs random search, every seed
    hb = S.get("workloads", {}).get("hyperband", {})
    if hb.get("runs"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(hb["runs"]):
            (hx, hy, _), (rx, ry, _) = run["curves"]["hyperband"], run["curves"]["randomized"]
            ax.step(hx, hy, where="post", color="C0", alpha=0.7,
                    label="HyperbandSearchCV" if i == 0 else None)
            ax.step(rx, ry, where="post", color="C1", alpha=0.7,
                    label="RandomizedSearchCV" if i == 0 else None)
        ax.set_xlabel("partial fits")
        ax.set_ylabel("best validation accuracy so far")
        ax.set_title(f"Seeds {[r['seed'] for r in hb['runs']]}, same validation split")
        ax.legend(fontsize=8, loc="lower right")
        _ax_done(ax, fig, outdir, "hyperband.png", made)
        plt.close(fig)
    return made
