"""Out-of-core learning: the generated data set is larger than one worker's memory limit at
every size, computed from the workers' own ``memory_limit``, and it is never held whole
anywhere: dask generates each block where it is needed (a pure function of seed and block
index), dask-ml's ``StandardScaler`` streams over it once, and ``Incremental(SGDClassifier)``
streams over it once more, a few blocks per ``partial_fit`` call so that only those blocks are
ever in memory.  The run must finish without a worker being killed or restarted.

The baseline is scikit-learn on one machine doing the same thing block by block
(``StandardScaler.partial_fit``, then ``SGDClassifier.partial_fit`` on the same blocks in the
same order, ``shuffle=False``): it reaches the same model up to floating-point rounding of
the scaler's mean/variance (tree reduction vs running update), so accuracy agrees to ~1e-4.
"""

from __future__ import annotations

from hpcdask.connect import cluster_info

#: metrics.json sets the data's size beside the largest worker's memory limit and the
#: single-machine baseline's peak memory (runner.gained)
OUT_OF_CORE = True
DESCRIPTION = ("out-of-core scale + Incremental(SGDClassifier) on data larger than a worker's "
               "memory limit, no worker killed; same model as scikit-learn streaming the blocks")

D = 20  # features


def plan(ctx, limit: int) -> dict:
    """Block size and count from the smallest worker memory limit."""
    factor = ctx.pick(1.1, 1.5, 3.0)  # data bytes / smallest worker memory_limit
    # small blocks: a worker's own Python stack (dask, scikit-learn, ...) takes ~250 MiB
    block_bytes = min(max(limit // 48, 1 << 20), 128 << 20)
    rows = max(1000, block_bytes // (8 * (D + 1)))
    target = int(limit * factor) + 1
    nblocks = -(-target // (rows * D * 8))
    # blocks per partial_fit call: enough to keep every worker generating, but all of them
    # (and their scaled copies) could land on the worker holding the model: keep < limit / 16
    batch = max(1, min(2 * ctx.nworkers, limit // 16 // (rows * (D + 1) * 8)))
    return {"factor": factor, "rows": rows, "nblocks": nblocks, "batch": batch,
            "test_blocks": 2}


def run(ctx) -> dict:
    import threading

    import numpy as np
    import psutil
    from dask_ml.preprocessing import StandardScaler
    from dask_ml.wrappers import Incremental
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler as SkStandardScaler

    from hpcdask.workloads import _data

    client = ctx.client
    limit = _data.min_memory_limit(client)
    note = None
    if not limit:
        limit = psutil.virtual_memory().total
        note = "a worker has no memory_limit: data sized from this machine's memory instead"
    p = plan(ctx, limit)
    rows, nblocks, batch = p["rows"], p["nblocks"], p["batch"]
    XY = _data.dask_xy(ctx.seed, nblocks, rows, D)
    X, y = _data.split(XY)
    XYt = _data.dask_xy(ctx.seed, p["test_blocks"], rows, D, first=_data.TEST_BLOCKS)
    Xt, yt = _data.split(XYt)
    data_bytes = int(X.nbytes)

    def model():
        return SGDClassifier(loss="log_loss", alpha=1e-4, shuffle=False, random_state=ctx.seed)

    peak = {"memory": 0, "spilled": 0}
    done = threading.Event()

    def sample():  # peak worker memory (process RSS as the scheduler sees it) and spilling
        while not done.wait(1.0):
            try:
                for w in cluster_info(client)["workers"].values():
                    m = w.get("metrics", {})
                    peak["memory"] = max(peak["memory"], m.get("memory") or 0)
                    spilled = (m.get("spilled_bytes") or {}).get("disk") or 0
                    peak["spilled"] = max(peak["spilled"], spilled)
            except Exception:  # noqa: BLE001 -- the client closing under us ends the sampling
                return

    watch = _data.WorkerWatch(client).start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ctx.step("scale on the cluster (one streaming pass)", side="cluster"):
            scaler = StandardScaler().fit(X)
        with ctx.step("Incremental partial_fit on the cluster (one streaming pass)",
                      side="cluster"):
            Xs = scaler.transform(X)
            inc = Incremental(model(), shuffle_blocks=False, random_state=ctx.seed,
                              scoring="accuracy")
            for lo in range(0, nblocks, batch):  # only `batch` blocks in memory at a time
                hi = min(lo + batch, nblocks)
                inc.partial_fit(Xs.blocks[lo:hi], y.blocks[lo:hi], classes=[0, 1])
        with ctx.step("evaluate on the cluster", side="cluster"):
            score = float(inc.score(scaler.transform(Xt), yt))
    finally:
        done.set()
        sampler.join()
    workers = watch.stop()

    with ctx.step("single-machine baseline (streaming the same blocks)", side="baseline"):
        sk_scaler = SkStandardScaler()
        for i in range(nblocks):
            sk_scaler.partial_fit(_data.block_xy(ctx.seed, i, rows, D)[:, :D])
        sk = model()
        for i in range(nblocks):
            xi, yi = _data.split(_data.block_xy(ctx.seed, i, rows, D))
            sk.partial_fit(sk_scaler.transform(xi), yi, classes=[0, 1])
        test = np.concatenate([_data.block_xy(ctx.seed, _data.TEST_BLOCKS + i, rows, D)
                               for i in range(p["test_blocks"])])
        xte, yte = _data.split(test)
        baseline = float(sk.score(sk_scaler.transform(xte), yte))

    coef, sk_coef = inc.estimator_.coef_.ravel(), sk.coef_.ravel()
    result = {
        "metric": "accuracy",
        "score": score,
        "baseline_score": baseline,
        "score_difference": abs(score - baseline),
        "max_coef_relative_difference": float(np.max(np.abs(coef - sk_coef))
                                              / np.max(np.abs(sk_coef))),
        "data_bytes": data_bytes,
        "worker_memory_limit_min": int(limit),
        "data_over_memory_limit": round(data_bytes / limit, 3),
        "peak_worker_memory": int(peak["memory"]),
        "peak_worker_spilled_to_disk": int(peak["spilled"]),
        "workers": workers,
        "data": {"samples": rows * nblocks, "features": D, "test_samples": rows * p["test_blocks"],
                 "block_rows": rows, "blocks": nblocks, "blocks_per_partial_fit": batch,
                 "size_factor": p["factor"], "epochs": 1},
    }
    if note:
        result["note"] = note
    return result
