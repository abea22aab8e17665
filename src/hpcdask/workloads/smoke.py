"""A seconds-long check that a combination of packages really works: the image's ``%test``
runs it. A small pipeline plus a small ``HyperbandSearchCV`` (the dask-ml path that needs
hpcdask's compatibility fix on current Dask)."""

from __future__ import annotations

DESCRIPTION = "seconds-long check: a small pipeline and a small HyperbandSearchCV (image %test)"


def run(ctx) -> dict:
    import dask
    import numpy as np
    from dask_ml.datasets import make_classification
    from dask_ml.model_selection import HyperbandSearchCV
    from sklearn.linear_model import SGDClassifier

    from hpcdask.workloads import pipeline

    result = pipeline.run(ctx)
    with ctx.step("hyperband"):
        X, y = make_classification(n_samples=4_000, n_features=10, chunks=500,
                                   random_state=ctx.seed)
        X, y = dask.persist(X, y)
        params = {"alpha": np.logspace(-5, -1, 8), "l1_ratio": np.linspace(0, 1, 4)}
        search = HyperbandSearchCV(SGDClassifier(penalty="elasticnet", random_state=ctx.seed),
                                   params, max_iter=9, random_state=ctx.seed)
        search.fit(X, y, classes=[0, 1])
    result["hyperband"] = {"best_score": float(search.best_score_),
                           "best_params": {k: float(v) for k, v in search.best_params_.items()},
                           "models": len(search.cv_results_["params"])}
    return result
