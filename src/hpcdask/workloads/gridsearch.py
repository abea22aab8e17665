"""Exhaustive search on the cluster, two ways, against the sequential scikit-learn run.

The same scikit-learn ``Pipeline`` (StandardScaler -> PCA -> LogisticRegression) and grid
are searched three times: scikit-learn's ``GridSearchCV`` with ``n_jobs=1`` on this machine
(the baseline), the same ``GridSearchCV`` with ``n_jobs=-1`` inside
``joblib.parallel_backend("dask")`` (each fit is a task on the cluster), and dask-ml's own
``GridSearchCV`` (one graph that shares the pipeline's common prefixes between candidates).
Every fit is deterministic (full SVD, lbfgs) on the same folds, so the best parameters must
be identical and the cross-validation scores equal to floating-point rounding.  The score is
the log-loss (``neg_log_loss``): unlike accuracy it practically never ties between candidates.
"""

from __future__ import annotations

DESCRIPTION = ("Pipeline + GridSearchCV via joblib's dask backend and dask-ml GridSearchCV; "
               "same best parameters as sequential scikit-learn")


def how_a_fit_sees_the_cluster() -> dict:
    """A task's view (run on a worker): the BLAS/OpenMP threads one fit gets (threadpoolctl)
    and the slots ``n_jobs=-1`` gets under joblib's dask backend; their product should be the
    CPUs of the workers (more: they compete for cores; fewer: cores stay idle)."""
    import joblib
    from threadpoolctl import threadpool_info

    with joblib.parallel_backend("dask"):
        slots = joblib.effective_n_jobs(-1)
    return {"joblib_slots": slots,
            "threadpools": sorted({(p["internal_api"], p["num_threads"])
                                   for p in threadpool_info()})}


def calls_sent(tasks: list[dict]) -> dict[str, int]:
    """Function calls that joblib's dask backend sent as tasks (its keys are
    ``batch_of_<function>_<n>_calls-<uuid>``), by function: a fit's own nested joblib calls
    show up here when they become tasks of their own."""
    import re

    calls: dict[str, int] = {}
    for t in tasks:
        m = re.match(r"batch_of_(.+)_(\d+)_calls-[0-9a-f]+$", str(t.get("key")))
        if m:
            calls[m.group(1)] = calls.get(m.group(1), 0) + int(m.group(2))
    return calls


def run(ctx) -> dict:
    import joblib
    import numpy as np
    from dask_ml.model_selection import GridSearchCV as DaskGridSearchCV
    from distributed import get_task_stream
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    n = ctx.pick(2_000, 10_000, 200_000)
    d = 30
    with ctx.step("generate data"):
        X, y = make_classification(n_samples=n, n_features=d, n_informative=12, n_redundant=6,
                                   flip_y=0.03, random_state=ctx.seed)
    pipe = Pipeline([("scale", StandardScaler()),
                     ("pca", PCA(svd_solver="full")),
                     ("clf", LogisticRegression(max_iter=1000))])
    grid = {"pca__n_components": [5, 10, 20, 30],
            "clf__C": [0.001, 0.01, 0.1, 1.0, 10.0]}
    folds = 5
    cv = StratifiedKFold(folds, shuffle=True, random_state=ctx.seed)
    scoring = "neg_log_loss"

    with ctx.step("sequential scikit-learn (baseline)") as t_seq:
        seq = GridSearchCV(pipe, grid, cv=cv, scoring=scoring, n_jobs=1).fit(X, y)
    with ctx.step("GridSearchCV through joblib's dask backend") as t_jl:
        # scatter: X and y go to the workers once, before the first fit, instead of with the
        # first batch of calls that needs them (joblib's automatic scattering)
        with get_task_stream(ctx.client) as tasks, \
                joblib.parallel_backend("dask", scatter=[X, y]):
            jl = GridSearchCV(pipe, grid, cv=cv, scoring=scoring, n_jobs=-1).fit(X, y)
        joblib_tasks = len(tasks.data)
        joblib_calls = calls_sent(tasks.data)
    with ctx.step("dask-ml GridSearchCV") as t_dm:
        dm = DaskGridSearchCV(pipe, grid, cv=cv, scoring=scoring).fit(X, y)
    fit_view = ctx.client.submit(how_a_fit_sees_the_cluster, pure=False).result()

    ref = seq.cv_results_["mean_test_score"]

    def diff(search):
        return float(np.max(np.abs(np.asarray(search.cv_results_["mean_test_score"]) - ref)))

    def plain(params):
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}

    return {
        "metric": "best mean CV neg_log_loss",
        "score": float(jl.best_score_),
        "baseline_score": float(seq.best_score_),
        "best_params": plain(seq.best_params_),
        "joblib_dask": {"best_params": plain(jl.best_params_), "best_score": float(jl.best_score_),
                        "max_cv_score_difference": diff(jl), "cluster_tasks": joblib_tasks,
                        "cluster_calls": sum(joblib_calls.values()),
                        "cluster_calls_by_function": joblib_calls,
                        "same_best_params": jl.best_params_ == seq.best_params_},
        "dask_ml": {"best_params": plain(dm.best_params_), "best_score": float(dm.best_score_),
                    "max_cv_score_difference": diff(dm),
                    "same_best_params": dm.best_params_ == seq.best_params_},
        "wall_s": {"baseline": t_seq.seconds, "joblib_dask": t_jl.seconds,
                   "dask_ml": t_dm.seconds},
        "speedup": {"joblib_dask": round(t_seq.seconds / t_jl.seconds, 3),
                    "dask_ml": round(t_seq.seconds / t_dm.seconds, 3)},
        "worker_fit_view": fit_view,
        "data": {"samples": n, "features": d, "candidates": len(ref), "folds": folds,
                 "fits": len(ref) * folds},
    }
