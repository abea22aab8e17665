"""A native distributed estimator: dask-ml's ``KMeans`` (k-means|| initialisation, Lloyd
iterations as dask array reductions) against scikit-learn's ``KMeans`` (k-means++, 10
initialisations) on the same blob data.

They are different algorithms with random initialisation, so the comparison is by quality,
not bits: on well-separated blobs both must find the same partition (adjusted Rand index
>= 0.99) and the same within-cluster sum of squares (inertia ratio within 1 %).
"""

from __future__ import annotations

DESCRIPTION = ("dask-ml KMeans (k-means||) vs scikit-learn KMeans: same clusters "
               "(adjusted Rand index) and inertia within 1 %")


def run(ctx) -> dict:
    import numpy as np
    from dask_ml.cluster import KMeans
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    from hpcdask.workloads import _data

    n = ctx.pick(50_000, 500_000, 20_000_000)
    d, k = 10, 8
    with ctx.step("generate data"):
        X, truth = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=1.5,
                              center_box=(-20, 20), random_state=ctx.seed)
        nblocks, chunk = _data.layout(n, X.itemsize * d, ctx.nworkers)
        dX = _data.scatter_array(ctx.client, X, chunk)

    with ctx.step("dask-ml KMeans on the cluster", side="cluster"):
        km = KMeans(n_clusters=k, random_state=ctx.seed).fit(dX)
        labels = np.asarray(km.labels_.compute() if hasattr(km.labels_, "compute")
                            else km.labels_)
    with ctx.step("scikit-learn KMeans (baseline)", side="baseline"):
        sk = SkKMeans(n_clusters=k, n_init=10, random_state=ctx.seed).fit(X)

    inertia, sk_inertia = float(km.inertia_), float(sk.inertia_)
    return {
        "metric": "inertia (within-cluster sum of squares, lower is better)",
        "score": inertia,
        "baseline_score": sk_inertia,
        "inertia_ratio": inertia / sk_inertia,
        "adjusted_rand_index": float(adjusted_rand_score(sk.labels_, labels)),
        "adjusted_rand_index_vs_truth": float(adjusted_rand_score(truth, labels)),
        "baseline_adjusted_rand_index_vs_truth": float(adjusted_rand_score(truth, sk.labels_)),
        "iterations": int(getattr(km, "n_iter_", -1)),
        "tolerance": {"inertia_ratio_max": 1.01, "adjusted_rand_index_min": 0.99},
        "data": {"samples": n, "features": d, "clusters": k, "blocks": nblocks,
                 "bytes": int(X.nbytes)},
    }
