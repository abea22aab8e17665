"""Adaptive hyperparameter search: dask-ml's ``HyperbandSearchCV`` on the cluster against
scikit-learn's ``RandomizedSearchCV`` on one machine, on the same data, the same search space
and the same budget of partial fits.

Budget accounting: one Hyperband ``partial_fit`` call trains one model on one block of the
training data.  Each random-search candidate is an ``SGDClassifier(max_iter=E, tol=None)``
whose ``fit`` makes ``E`` passes over the training fold, i.e. ``E x blocks`` block-sized
partial fits; ``E x blocks`` is set equal to Hyperband's ``max_iter`` (the most any one of its
models gets), and the number of random candidates is Hyperband's total partial fits divided
by that.  Both searches score their candidates on the same validation split (the one
Hyperband makes with ``dask_ml.model_selection.train_test_split``, given to the random
search as its single predefined split), and both winners on the same held-out test set.  Hyperband runs on Dask 2026
only with hpcdask's compatibility fix (``hpcdask.compat``, dask/dask-ml#1016).
"""

from __future__ import annotations

DESCRIPTION = ("HyperbandSearchCV on the cluster vs scikit-learn RandomizedSearchCV, same space "
               "and partial-fit budget; score vs partial fits plot")


def run(ctx) -> dict:
    import matplotlib
    import numpy as np
    from scipy.stats import loguniform, uniform
    from sklearn.datasets import make_classification
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import RandomizedSearchCV, train_test_split

    from hpcdask import compat
    from hpcdask.workloads import _data

    n = ctx.pick(20_000, 200_000, 2_000_000)
    d = 20
    max_iter = ctx.pick(9, 27, 81)  # the most partial fits any one model gets
    epochs = 3
    blocks = max_iter // epochs  # so max_iter is a whole number of passes over the blocks
    val = 0.15
    with ctx.step("generate data"):
        X, y = make_classification(n_samples=n + n // 5, n_features=d, n_informative=10,
                                   n_redundant=4, flip_y=0.05, class_sep=1.0,
                                   random_state=ctx.seed)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=n // 5, random_state=ctx.seed)
        chunk = -(-len(X_train) // blocks)
        dX = _data.scatter_array(ctx.client, X_train, chunk)
        dy = _data.scatter_array(ctx.client, y_train, chunk)

    space = {
        "loss": ["hinge", "log_loss", "modified_huber"],
        "alpha": loguniform(1e-7, 1e0),
        "l1_ratio": uniform(0, 1),
        "average": [False, True],
        "learning_rate": ["optimal", "invscaling", "adaptive"],
        "eta0": loguniform(1e-4, 1e0),
    }

    def model(**kw):
        return SGDClassifier(penalty="elasticnet", random_state=ctx.seed, **kw)

    from dask_ml.model_selection import HyperbandSearchCV

    with ctx.step("HyperbandSearchCV on the cluster", side="cluster"):
        hb = HyperbandSearchCV(model(), space, max_iter=max_iter, test_size=val,
                               random_state=ctx.seed)
        hb.fit(dX, dy, classes=[0, 1])
        hb_calls = int(hb.metadata_["partial_fit_calls"])
        hb_test = float(hb.best_estimator_.score(X_test, y_test))

    n_iter = max(1, hb_calls // max_iter)
    with ctx.step("RandomizedSearchCV on one machine (same budget)", side="baseline"):
        # Hyperband's own validation split (its documented hook), as one predefined split.
        fX, vX, fy, vy = (a.compute() for a in hb._get_train_test_split(dX, dy))
        split = [(np.arange(len(fX)), np.arange(len(fX), len(fX) + len(vX)))]
        rs = RandomizedSearchCV(model(max_iter=epochs, tol=None), space, n_iter=n_iter,
                                cv=split, random_state=ctx.seed, refit=True)
        rs.fit(np.concatenate([fX, vX]), np.concatenate([fy, vy]))
        rs_test = float(rs.best_estimator_.score(X_test, y_test))
    rs_calls = n_iter * epochs * blocks

    with ctx.step("plot"):
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = sorted(hb.history_, key=lambda h: h["elapsed_wall_time"])
        spent: dict[int, int] = {}
        hb_x, hb_y, best = [], [], -np.inf
        for h in hist:
            spent[h["model_id"]] = h["partial_fit_calls"]
            best = max(best, h["score"])
            hb_x.append(sum(spent.values()))
            hb_y.append(best)
        rs_scores = rs.cv_results_["mean_test_score"]
        rs_x = [(i + 1) * epochs * blocks for i in range(n_iter)]
        rs_y = np.maximum.accumulate(rs_scores)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.step(hb_x, hb_y, where="post", label="HyperbandSearchCV (dask-ml, cluster)")
        ax.step(rs_x, rs_y, where="post", label="RandomizedSearchCV (scikit-learn)")
        ax.set_xlabel("partial fits (one model x one block)")
        ax.set_ylabel("best validation accuracy so far")
        ax.set_title(f"Search budget: {hb_calls} partial fits, {n:,} samples")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(ctx.outdir / "score_vs_partial_fits.png", dpi=100)
        plt.close(fig)

    def plain(params):
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}

    return {
        "metric": "test accuracy of the best model",
        "score": hb_test,
        "baseline_score": rs_test,
        "hyperband": {"best_validation_score": float(hb.best_score_),
                      "best_params": plain(hb.best_params_),
                      "partial_fit_calls": hb_calls, "models": int(hb.metadata_["n_models"]),
                      "brackets": len(hb.metadata_["brackets"])},
        "randomized_search": {"best_validation_score": float(rs.best_score_),
                              "best_params": plain(rs.best_params_),
                              "partial_fit_calls": rs_calls, "models": n_iter,
                              "epochs_per_model": epochs},
        "compat_patches": sorted(compat.active()),
        "plot": "score_vs_partial_fits.png",
        "data": {"samples": len(X_train), "test_samples": len(X_test), "features": d,
                 "blocks": len(dX.chunks[0]), "max_iter": max_iter, "validation_fraction": val,
                 "validation_samples": len(vX)},
    }
