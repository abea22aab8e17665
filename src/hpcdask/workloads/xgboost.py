"""Distributed gradient boosting: ``xgboost.dask`` (``DaskDMatrix``, ``xgboost.dask.train``,
``xgboost.dask.predict``) on data generated lazily on the workers, against single-machine
``xgboost.train`` on the same rows, with the feature-importance plot.

XGBoost's collective tracker opens its own (plain TCP) sockets, outside Dask's TLS comms; it
runs in the scheduler process and is bound explicitly to the scheduler's host address (the
``ib0`` address on a cluster, through ``coll_cfg=xgboost.collective.Config(tracker_host_ip=...)``,
the 3.x replacement of the ``xgboost.scheduler_address`` Dask setting), so workers on other
nodes can reach it.

The distributed ``hist`` method builds its histogram bins from quantile sketches merged
across workers, so the model is not bit-identical to the single-machine one: test accuracy
and AUC must agree within 0.01.
"""

from __future__ import annotations

DESCRIPTION = ("xgboost.dask training and prediction vs single-machine xgboost.train "
               "(accuracy/AUC within 0.01), feature importance plot")

def run(ctx) -> dict:
    import matplotlib
    import numpy as np
    import xgboost as xgb
    from distributed.comm import get_address_host
    from sklearn.metrics import roc_auc_score
    from xgboost import dask as dxgb
    from xgboost.collective import Config as CollConfig

    from hpcdask.workloads import _data

    d = _data.FEATURES
    n = ctx.pick(100_000, 500_000, 10_000_000)
    rounds = ctx.pick(30, 50, 200)
    X, y, nblocks, rows = _data.lazy_xy(ctx, n)
    test_blocks = max(1, nblocks // 5)
    Xt, yt = _data.split(_data.dask_xy(ctx.seed, test_blocks, rows, d, first=_data.TEST_BLOCKS))
    params = {"tree_method": "hist", "objective": "binary:logistic",
              "eval_metric": ["logloss", "auc"], "max_depth": 6, "eta": 0.3,
              "seed": ctx.seed}
    tracker_host = get_address_host(ctx.client.scheduler.address).strip("[]")
    coll = CollConfig(tracker_host_ip=tracker_host)

    with ctx.step("xgboost.dask train on the cluster", side="cluster"):
        dtrain = dxgb.DaskDMatrix(ctx.client, X, y)
        out = dxgb.train(ctx.client, params, dtrain, num_boost_round=rounds,
                         evals=[(dtrain, "train")], verbose_eval=False, coll_cfg=coll)
        booster = out["booster"]
    with ctx.step("xgboost.dask predict on the cluster", side="cluster"):
        proba = dxgb.predict(ctx.client, booster, Xt)
        proba, truth = ctx.client.compute([proba, yt], sync=True)

    with ctx.step("single-machine xgboost.train (baseline)", side="baseline"):
        def local(first, count):
            return _data.split(np.concatenate(
                [_data.block_xy(ctx.seed, first + i, rows, d) for i in range(count)]))
        xtr, ytr = local(0, nblocks)
        xte, yte = local(_data.TEST_BLOCKS, test_blocks)
        sk_booster = xgb.train(params, xgb.DMatrix(xtr, label=ytr), num_boost_round=rounds)
        ref = sk_booster.predict(xgb.DMatrix(xte))

    with ctx.step("feature importance plot"):
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ax = xgb.plot_importance(booster, height=0.8, max_num_features=d)
        ax.grid(False, axis="y")
        ax.set_title("Feature importance (xgboost.dask, weight)")
        ax.figure.tight_layout()
        ax.figure.savefig(ctx.outdir / "feature_importance.png", dpi=100)
        plt.close(ax.figure)

    auc, ref_auc = float(roc_auc_score(truth, proba)), float(roc_auc_score(yte, ref))
    acc = float(np.mean((proba > 0.5) == truth))
    ref_acc = float(np.mean((ref > 0.5) == yte))
    hist = out["history"]["train"]
    return {
        "metric": "test AUC",
        "score": auc,
        "baseline_score": ref_auc,
        "accuracy": acc,
        "baseline_accuracy": ref_acc,
        "same_test_labels": bool(np.array_equal(truth, yte)),
        "tolerance": {"auc": 0.01, "accuracy": 0.01},
        "train_logloss_last": float(hist["logloss"][-1]),
        "tracker_host": tracker_host,
        "plot": "feature_importance.png",
        "data": {"samples": rows * nblocks, "test_samples": rows * test_blocks, "features": d,
                 "blocks": nblocks, "rounds": rounds, "bytes": int(X.nbytes)},
    }
