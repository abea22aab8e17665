"""The Dask collections one by one (delayed, array, bag, dataframe), as in the introductory
examples, each compared with plain Python / NumPy / pandas on the same data, plus the task
graph of the delayed example drawn with graphviz (when the ``graphviz`` package and the
``dot`` program are there; otherwise metrics say so).

Integer results must be equal; floating-point sums and means to a relative 1e-12 (the
chunks are added in a different order).
"""

from __future__ import annotations

DESCRIPTION = ("smoke: the Dask collections (delayed, array, bag, dataframe) vs plain "
               "Python/NumPy/pandas, task graph drawn with graphviz")

RTOL = 1e-12


def inc(x):
    return x + 1


def double(x):
    return x * 2


def add(x, y):
    return x + y


def random_walk(seed: int, steps: int = 1000) -> int:
    import random

    rng = random.Random(seed)
    x = 0
    for _ in range(steps):
        x += rng.choice([-1, 1])
    return x


def frame(part: int, rows: int, seed: int):
    """One partition of the example DataFrame: x in 0..9, y uniform."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, part])
    return pd.DataFrame({"x": rng.integers(0, 10, rows), "y": rng.random(rows)})


def run(ctx) -> dict:
    import shutil

    import dask
    import dask.array as da
    import dask.bag as db
    import dask.dataframe as dd
    import numpy as np

    n = ctx.pick(10_000, 4_000_000, 40_000_000)
    nbag = ctx.pick(10_000, 400_000, 4_000_000)
    walks = ctx.pick(1_000, 5_000, 50_000)
    parts = 4 * ctx.nworkers
    checks = {}

    with ctx.step("delayed"):
        data = list(range(1, 6 + ctx.pick(0, 300, 3000)))
        output = [dask.delayed(add)(dask.delayed(inc)(x), dask.delayed(double)(x)) for x in data]
        total = dask.delayed(sum)(output)
        got = total.compute()
        want = sum(inc(x) + double(x) for x in data)
        checks["delayed"] = {"dask": got, "plain": want, "equal": got == want}

    with ctx.step("array"):
        # generated on the workers (embedding big NumPy arrays in the graph would ship them
        # with it); the plain NumPy baseline gets the same numbers
        drng = da.random.default_rng(ctx.seed)
        dx = drng.random(n, chunks=-(-n // parts))
        dy = drng.random(n, chunks=-(-n // parts))
        x, y = dask.compute(dx, dy)
        got = float((dx + dy).sum().compute())
        want = float((x + y).sum())
        checks["array"] = {"dask": got, "plain": want,
                           "equal": bool(np.isclose(got, want, rtol=RTOL, atol=0))}

    with ctx.step("dataframe"):
        rows = -(-n // parts)
        ddf = dd.from_map(frame, range(parts), rows=rows, seed=ctx.seed)
        df = ddf.compute()
        got = ddf.groupby("x").y.mean().compute().sort_index()
        want = df.groupby("x").y.mean().sort_index()
        same = bool(got.index.equals(want.index)
                    and np.allclose(got.values, want.values, rtol=RTOL, atol=0))
        checks["dataframe"] = {"dask": got.round(6).to_dict(), "plain": want.round(6).to_dict(),
                               "max_difference": float(np.max(np.abs(got.values - want.values))),
                               "equal": same}

    with ctx.step("bag"):
        b = db.from_sequence(range(nbag), npartitions=parts)
        got = b.map(lambda v: v ** 2).filter(lambda v: v % 2 == 0).sum().compute()
        want = sum(v ** 2 for v in range(nbag) if v ** 2 % 2 == 0)
        checks["bag"] = {"dask": got, "plain": want, "equal": got == want}

    with ctx.step("bag of random walks"):
        seeds = [ctx.seed * 1_000_003 + i for i in range(walks)]
        w = db.from_sequence(seeds, npartitions=parts).map(random_walk)
        got = w.sum().compute()
        want = sum(random_walk(s) for s in seeds)
        checks["random_walks"] = {"dask": got, "plain": want, "equal": got == want}

    with ctx.step("task graph"):
        graph = None
        if shutil.which("dot") is None:
            note = "task graph not drawn: the graphviz 'dot' program is not installed"
        else:
            try:
                import graphviz  # noqa: F401
            except ImportError:
                note = "task graph not drawn: the python package graphviz is not installed"
            else:
                small = [dask.delayed(add)(dask.delayed(inc)(x), dask.delayed(double)(x))
                         for x in range(1, 6)]
                dask.visualize(dask.delayed(sum)(small),
                               filename=str(ctx.outdir / "task_graph.svg"))
                graph, note = "task_graph.svg", "drawn with graphviz"

    passed = sum(c["equal"] for c in checks.values())
    return {
        "metric": "collections equal to plain Python/NumPy/pandas",
        "score": passed,
        "baseline_score": len(checks),
        "checks": checks,
        "float_tolerance": f"rtol {RTOL}",
        "task_graph": graph,
        "task_graph_note": note,
        "data": {"array_length": n, "dataframe_rows": n, "bag_items": nbag, "walks": walks,
                 "partitions": parts},
    }
