"""The default workload: a dask-ml pipeline (scale, incremental fit, evaluate) on generated
classification data chunked across the workers, checked against scikit-learn on the same data.

``Incremental(SGDClassifier)`` with ``shuffle_blocks=False`` calls ``partial_fit`` on the blocks
in order, so scikit-learn doing the same sequence on the same numbers must reach the same
model: the comparison is near-exact, not statistical.
"""

from __future__ import annotations

import numpy as np

DESCRIPTION = ("scale + Incremental(SGDClassifier) + evaluate on chunked data; "
               "same model as scikit-learn on the same blocks")


def sizes(ctx) -> tuple[int, int]:
    """(samples, features) of the generated data."""
    return ctx.pick((20_000, 20), (1_000_000, 20), (8_000_000, 20))


def run(ctx) -> dict:
    import dask
    from dask_ml.datasets import make_classification
    from dask_ml.preprocessing import StandardScaler
    from dask_ml.wrappers import Incremental
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler as SkStandardScaler

    n, d = sizes(ctx)
    blocks = max(4, 4 * ctx.nworkers)
    chunk = -(-n // blocks)
    epochs = 3
    n_test = n // 5
    with ctx.step("generate data"):
        X, y = make_classification(n_samples=n, n_features=d, n_informative=d // 2,
                                   n_redundant=d // 4, chunks=chunk, random_state=ctx.seed)
        X, y = dask.persist(X, y)
        X_train, X_test = X[n_test:], X[:n_test]
        y_train, y_test = y[n_test:], y[:n_test]

    def model():
        return SGDClassifier(loss="log_loss", alpha=1e-4, shuffle=False, random_state=ctx.seed)

    with ctx.step("fit on the cluster", side="cluster"):
        scaler = StandardScaler().fit(X_train)
        Xs_train = scaler.transform(X_train).persist()
        inc = Incremental(model(), shuffle_blocks=False, random_state=ctx.seed, scoring="accuracy")
        for _ in range(epochs):
            inc.partial_fit(Xs_train, y_train, classes=[0, 1])
    with ctx.step("evaluate on the cluster", side="cluster"):
        score = float(inc.score(scaler.transform(X_test), y_test))

    with ctx.step("single-machine baseline", side="baseline"):
        xtr, xte, ytr, yte = dask.compute(X_train, X_test, y_train, y_test)
        sk_scaler = SkStandardScaler().fit(xtr)
        sxtr = sk_scaler.transform(xtr)
        sk = model()
        bounds = np.cumsum((0, *Xs_train.chunks[0]))
        for _ in range(epochs):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                sk.partial_fit(sxtr[lo:hi], ytr[lo:hi], classes=[0, 1])
        baseline = float(sk.score(sk_scaler.transform(xte), yte))

    coef, sk_coef = inc.estimator_.coef_.ravel(), sk.coef_.ravel()
    return {
        "metric": "accuracy",
        "score": score,
        "baseline_score": baseline,
        "score_difference": abs(score - baseline),
        "max_coef_difference": float(np.max(np.abs(coef - sk_coef))),
        "data": {"samples": n, "features": d, "train": n - n_test, "test": n_test,
                 "chunk_rows": chunk, "blocks": len(Xs_train.chunks[0]), "epochs": epochs,
                 "bytes": int(X.nbytes)},
    }
