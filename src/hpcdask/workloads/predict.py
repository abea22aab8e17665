"""Batch prediction at scale: a scikit-learn model trained on a sample on this machine,
wrapped in dask-ml's ``ParallelPostFit`` and applied block by block to the full chunked data
on the cluster (the data is generated lazily on the workers, never gathered).  The baseline
is the same model's ``predict`` on the same blocks on one machine: prediction is row-wise,
so the labels must be identical and the probabilities equal to the last bit.
"""

from __future__ import annotations

DESCRIPTION = ("ParallelPostFit batch prediction of a model trained on a sample, over the full "
               "chunked data; equal to scikit-learn's predict")

def run(ctx) -> dict:
    import numpy as np
    from dask_ml.wrappers import ParallelPostFit
    from sklearn.ensemble import HistGradientBoostingClassifier

    from hpcdask.workloads import _data

    X, y, nblocks, rows = _data.lazy_xy(ctx, ctx.pick(200_000, 1_000_000, 40_000_000),
                                        per_worker=4)
    n_sample, d = ctx.pick(20_000, 50_000, 100_000), _data.FEATURES

    with ctx.step("train on a sample (one machine)"):
        # the sample: the first rows of the data, generated locally
        sample_blocks = -(-n_sample // rows)
        s = np.concatenate([_data.block_xy(ctx.seed, i, rows, d) for i in range(sample_blocks)])
        xs, ys = _data.split(s[:n_sample])
        model = HistGradientBoostingClassifier(max_iter=50, random_state=ctx.seed).fit(xs, ys)

    with ctx.step("ParallelPostFit predict on the cluster", side="cluster"):
        wrapped = ParallelPostFit(estimator=model)
        labels, proba, truth = ctx.client.compute(
            [wrapped.predict(X), wrapped.predict_proba(X)[:, 1], y], sync=True)

    with ctx.step("single-machine baseline (predict block by block)", side="baseline"):
        ref_labels, ref_proba, ref_truth = [], [], []
        for i in range(nblocks):
            xi, yi = _data.split(_data.block_xy(ctx.seed, i, rows, d))
            ref_labels.append(model.predict(xi))
            ref_proba.append(model.predict_proba(xi)[:, 1])
            ref_truth.append(yi)
        ref_labels = np.concatenate(ref_labels)
        ref_proba = np.concatenate(ref_proba)
        ref_truth = np.concatenate(ref_truth)

    return {
        "metric": "accuracy over the full data",
        "score": float(np.mean(labels == truth)),
        "baseline_score": float(np.mean(ref_labels == ref_truth)),
        "predictions": len(labels),
        "labels_different": int(np.sum(labels != ref_labels)),
        "max_probability_difference": float(np.max(np.abs(proba - ref_proba))),
        "same_truth": bool(np.array_equal(truth, ref_truth)),
        # whole blocks: the data holds rows * nblocks samples, a little more than asked for
        "data": {"samples": rows * nblocks, "features": d, "train_sample": n_sample,
                 "blocks": nblocks,
                 "block_rows": rows, "bytes": int(X.nbytes)},
    }
