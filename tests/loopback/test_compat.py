"""hpcdask.compat on the pinned stack: the dask-ml 2025.1.0 bugs exist, apply() fixes them.

dask/dask-ml#1016: the incremental searches (Hyperband, Incremental, SuccessiveHalving,
InverseDecay) raise "Attempting to use an asynchronous Client in a synchronous context".
dask/dask-ml#1012: dask_ml.metrics.r2_score raises "cannot broadcast shape (nan,)".
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import sklearn.metrics
from distributed import Client, LocalCluster
from distributed.security import Security
from sklearn.linear_model import SGDClassifier

from hpcdask import compat

# dashboard_address=None still binds the scheduler's HTTP routes to 8787 (and warns when that
# port is taken, e.g. by a running hpcdask); ":0" picks a free port, so tests run anywhere.
DASHBOARD = ":0"

SRC = os.path.dirname(os.path.dirname(os.path.abspath(compat.__file__)))

# Hyperband configuration whose result was recorded on a stack without #1016:
# the same lock but dask==2025.2.0 and distributed==2025.2.0 (no patch; dask-ml, scikit-learn,
# numpy identical), LocalCluster(n_workers=2, threads_per_worker=1, processes=False).
# The parameter grid (26 points) is larger than any bracket's n_initial_parameters (<= 9), so
# scikit-learn's ParameterSampler samples without the "smaller than n_iter" UserWarning.
HYPERBAND_PARAMS = {"alpha": np.logspace(-5, 1, 13).tolist(), "penalty": ["l2", "l1"]}
KNOWN_GOOD_BEST_PARAMS = {"penalty": "l1", "alpha": 0.01}
KNOWN_GOOD_BEST_SCORE = 0.775
KNOWN_GOOD_SCORES = [  # every model's final validation accuracy (17 models), sorted
    0.5, 0.5125, 0.55, 0.5625, 0.5625, 0.5875, 0.5875, 0.6125, 0.6375,
    0.6375, 0.65, 0.6625, 0.6875, 0.6875, 0.7, 0.7625, 0.775,
]  # fmt: skip


def _classification():
    from dask_ml.datasets import make_classification

    return make_classification(
        n_samples=400, n_features=6, n_informative=3, chunks=100, random_state=0
    )


def _hyperband():
    from dask_ml.model_selection import HyperbandSearchCV

    return HyperbandSearchCV(
        SGDClassifier(tol=None, random_state=0), HYPERBAND_PARAMS, max_iter=9, random_state=0
    )


def _assert_known_good(search) -> None:
    assert search.best_params_ == KNOWN_GOOD_BEST_PARAMS
    assert search.best_score_ == pytest.approx(KNOWN_GOOD_BEST_SCORE, abs=1e-12)
    assert sorted(search.cv_results_["test_score"]) == pytest.approx(KNOWN_GOOD_SCORES, abs=1e-12)
    assert search.metadata_["n_models"] == 17
    assert search.metadata_["partial_fit_calls"] == 69


@pytest.fixture(scope="module", autouse=True)
def patched():
    return compat.apply()


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=DASHBOARD
    ) as c, Client(c) as client, compat.session(client):
        yield client


def _run(code: str, timeout: float = 240) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the bugs exist


def test_pinned_stack_has_both_bugs_without_apply():
    """In a fresh interpreter that never calls apply(), every affected call fails."""
    out = _run(
        """
        import json
        import dask.array as da
        import numpy as np
        from distributed import Client, LocalCluster
        from sklearn.linear_model import SGDClassifier
        from dask_ml.datasets import make_classification
        from dask_ml.metrics import r2_score
        from dask_ml.model_selection import (HyperbandSearchCV, IncrementalSearchCV,
            InverseDecaySearchCV, SuccessiveHalvingSearchCV)

        def outcome(f):
            try:
                f()
                return "ok"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

        grid = {"alpha": np.logspace(-5, 1, 20).tolist()}
        est = SGDClassifier(tol=None, random_state=0)
        searches = {
            "Hyperband": HyperbandSearchCV(est, grid, max_iter=3, random_state=0),
            "Incremental": IncrementalSearchCV(est, grid, n_initial_parameters=2, max_iter=2,
                                               decay_rate=None, random_state=0),
            "SuccessiveHalving": SuccessiveHalvingSearchCV(est, grid, n_initial_parameters=2,
                                                           n_initial_iter=1, max_iter=2,
                                                           random_state=0),
            "InverseDecay": InverseDecaySearchCV(est, grid, n_initial_parameters=2, max_iter=2,
                                                 random_state=0),
        }
        res = {}
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                          dashboard_address=":0") as c, Client(c):
            X, y = make_classification(n_samples=100, n_features=4, chunks=50, random_state=0)
            for name, s in searches.items():
                res[name] = outcome(lambda: s.fit(X, y, classes=[0, 1]))
        y = da.arange(8.0, chunks=4)
        res["r2_score"] = outcome(lambda: r2_score(y, y * 0.5))
        print(json.dumps(res))
        """
    )
    async_msg = "RuntimeError: Attempting to use an asynchronous Client in a synchronous context"
    for name in ("Hyperband", "Incremental", "SuccessiveHalving", "InverseDecay"):
        assert out[name].startswith(async_msg), (name, out[name])
    assert out["r2_score"].startswith("ValueError: cannot broadcast shape"), out["r2_score"]


# --------------------------------------------------------------------------- apply()


def test_apply_reports_both_patches_and_is_idempotent(patched):
    assert patched == (compat.INCREMENTAL_PERSIST, compat.R2_SCORE)
    assert compat.apply() == patched
    assert compat.active() == patched

    import dask_ml.linear_model.glm
    import dask_ml.metrics
    from dask_ml.metrics import regression, scorer
    for fn in (
        regression.r2_score,
        dask_ml.metrics.r2_score,
        dask_ml.linear_model.glm.r2_score,
        scorer.SCORERS["r2"][0],
        scorer.r2_scorer[0],
    ):
        assert fn is compat.r2_score
    assert compat._apply_r2_score()  # a second application from scratch changes nothing
    assert scorer.SCORERS["r2"][0] is compat.r2_score


def test_deferred_apply_imports_nothing_and_patches_when_dask_ml_is_imported():
    """apply(defer=True) (a user's script): no dask-ml import; #1016 is in effect at once (it
    needs none); #1012's patch lands when the script imports dask-ml, through whichever module
    first pulls in dask_ml.metrics, and the hook is gone after that."""
    out = _run(
        """
        import json, sys
        from hpcdask import compat
        res = {"deferred": list(compat.apply(defer=True)), "again": list(compat.apply(defer=True)),
               "imported": sorted(m for m in sys.modules if m.startswith(("dask_ml", "sklearn"))),
               "active before": list(compat.active())}
        from dask_ml.linear_model import LinearRegression  # pulls in dask_ml.metrics itself
        import dask_ml.linear_model.glm as glm
        import dask_ml.metrics
        from dask_ml.metrics import scorer
        res["patched"] = [f is compat.r2_score for f in (
            glm.r2_score, dask_ml.metrics.r2_score, scorer.SCORERS["r2"][0])]
        res["active after"] = list(compat.active())
        res["hooks left"] = sum(isinstance(f, compat.OnImport) for f in sys.meta_path)
        import inspect
        res["source readable"] = "def " in inspect.getsource(dask_ml.metrics.regression)
        import dask.array as da
        y = da.arange(4.0, chunks=2)
        res["r2"] = float(dask_ml.metrics.r2_score(y, y + 0.5))
        print(json.dumps(res))
        """
    )
    assert out["deferred"] == out["again"] == [compat.INCREMENTAL_PERSIST]
    assert out["imported"] == [] and out["active before"] == []
    assert out["patched"] == [True, True, True]
    assert out["active after"] == [compat.INCREMENTAL_PERSIST, compat.R2_SCORE]
    assert out["hooks left"] == 0 and out["source readable"]
    assert out["r2"] == pytest.approx(0.8)


def test_an_eager_apply_after_a_deferred_one_does_not_deadlock():
    """A script under `hpcdask client` (deferred) that calls a workload (session(): eager apply,
    which imports dask_ml.metrics itself while holding apply's lock): the import's own hook must
    leave the patching to that apply, not wait for its lock (this hung the client once)."""
    out = _run(
        """
        import json, sys
        from hpcdask import compat
        compat.apply(defer=True)
        active = compat.apply()
        import dask_ml.metrics
        print(json.dumps({"active": list(active), "patched":
                          dask_ml.metrics.r2_score is compat.r2_score,
                          "hooks left": sum(isinstance(f, compat.OnImport)
                                            for f in sys.meta_path)}))
        """,
        timeout=90,
    )
    assert out == {"active": [compat.INCREMENTAL_PERSIST, compat.R2_SCORE], "patched": True,
                   "hooks left": 0}


def test_deferred_apply_after_dask_ml_is_imported_applies_at_once():
    out = _run(
        """
        import json
        import dask_ml.metrics
        from hpcdask import compat
        active = compat.apply(defer=True)
        print(json.dumps({"active": list(active), "patched":
                          dask_ml.metrics.r2_score is compat.r2_score}))
        """
    )
    assert out == {"active": [compat.INCREMENTAL_PERSIST, compat.R2_SCORE], "patched": True}


def test_session_names_the_client_as_scheduler_only_inside(client):
    import dask
    import dask.base

    with compat.session(client) as active:
        assert compat.INCREMENTAL_PERSIST in active
        assert dask.base.get_scheduler() == client.get
    assert dask.config.get("scheduler", None) == client.get  # the fixture's own session


def test_apply_is_noop_when_versions_do_not_match():
    out = _run(
        """
        import json
        from packaging.version import Version
        from hpcdask import compat
        real = compat._installed
        res = {}
        compat._installed = lambda d: Version("2025.5.0") if d == "dask-ml" else real(d)
        res["other dask-ml"] = list(compat.apply())
        import sys
        res["dask_ml imported"] = "dask_ml" in sys.modules
        compat._active = None
        compat._installed = lambda d: Version("2025.2.0") if d == "dask" else real(d)
        res["old dask"] = list(compat.apply())
        from dask_ml.model_selection import _incremental
        res["dask in _incremental"] = type(_incremental.dask).__name__
        print(json.dumps(res))
        """
    )
    assert out == {
        "other dask-ml": [],
        "dask_ml imported": False,
        "old dask": [compat.R2_SCORE],
        "dask in _incremental": "module",  # never replaced
    }


# --------------------------------------------------------------------------- #1016


@pytest.mark.parametrize(
    "name", ["HyperbandSearchCV", "IncrementalSearchCV", "SuccessiveHalvingSearchCV",
             "InverseDecaySearchCV"]
)  # fmt: skip
def test_incremental_searches_fit(client, name):
    import dask_ml.model_selection as ms

    grid = {"alpha": np.logspace(-5, 1, 20).tolist()}
    est = SGDClassifier(tol=None, random_state=0)
    kwargs = {
        "HyperbandSearchCV": dict(max_iter=9),
        "IncrementalSearchCV": dict(n_initial_parameters=4, max_iter=5, decay_rate=None),
        "SuccessiveHalvingSearchCV": dict(n_initial_parameters=4, n_initial_iter=1, max_iter=5),
        "InverseDecaySearchCV": dict(n_initial_parameters=4, max_iter=5),
    }[name]
    X, y = _classification()
    search = getattr(ms, name)(est, grid, random_state=0, **kwargs).fit(X, y, classes=[0, 1])

    assert search.best_params_["alpha"] in grid["alpha"]
    # best_score_ is the best *surviving* model's last score, not the max over cv_results_
    assert search.best_score_ == search.cv_results_["test_score"][search.best_index_]
    assert 0.5 <= search.best_score_ <= 1.0
    pred = search.predict(X).compute()
    assert pred.shape == (400,) and set(np.unique(pred)) <= {0, 1}
    assert 0.0 <= search.score(X, y) <= 1.0


def test_hyperband_matches_known_good_stack(client):
    X, y = _classification()
    _assert_known_good(_hyperband().fit(X, y, classes=[0, 1]))


def test_hyperband_with_asynchronous_client():
    """`await search.fit(...)` with Client(asynchronous=True) runs _fit on the caller's loop."""

    async def main():
        async with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=DASHBOARD,
            asynchronous=True,
        ) as c, Client(c, asynchronous=True) as client:  # fmt: skip
            X, y = _classification()
            with compat.session(client):
                return await _hyperband().fit(X, y, classes=[0, 1])

    _assert_known_good(asyncio.run(main()))


def test_hyperband_over_tls_with_worker_processes():
    """Remote-scheduler shape: TLS comms, worker in its own process (pickled tasks)."""
    sec = Security.temporary()
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, protocol="tls",
        host="127.0.0.1", security=sec, dashboard_address=DASHBOARD,
    ) as c, Client(c.scheduler_address, security=sec) as client:  # fmt: skip
        assert client.scheduler.address.startswith("tls://")
        X, y = _classification()
        with compat.session(client):
            _assert_known_good(_hyperband().fit(X, y, classes=[0, 1]))


def test_without_client_fails_clearly():
    out = _run(
        """
        import json
        from hpcdask import compat
        compat.apply()
        from dask_ml.datasets import make_classification
        from dask_ml.model_selection import HyperbandSearchCV
        from sklearn.linear_model import SGDClassifier
        res = {}
        X, y = make_classification(n_samples=40, n_features=2, chunks=20, random_state=0)
        try:
            HyperbandSearchCV(SGDClassifier(), {"alpha": [0.1, 1.0]}, max_iter=3).fit(X, y)
        except Exception as exc:
            res["fit"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(res))
        """
    )
    assert out["fit"].startswith("ValueError: No clients found"), out  # dask-ml's own check


# --------------------------------------------------------------------------- #1012

rng = np.random.RandomState(0)
_A = rng.randn(200, 3)
_B = _A + 0.5 * rng.randn(200, 3)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        pytest.param(_A[:, 0], _B[:, 0], id="1d"),
        pytest.param(_A, _B, id="2d-multioutput"),
        pytest.param(_A[:, 0], _A[:, 0], id="perfect"),
        pytest.param(np.full(200, 3.0), _B[:, 0], id="constant-true"),
        pytest.param(np.full(200, 3.0), np.full(200, 3.0), id="constant-perfect"),
        pytest.param(
            np.c_[np.full(200, 3.0), _A[:, 1]], np.c_[_B[:, 0], _B[:, 1]], id="mixed-columns"
        ),
    ],
)
def test_r2_score_matches_sklearn(y_true, y_pred):
    from dask_ml.metrics import r2_score

    expected = sklearn.metrics.r2_score(y_true, y_pred)
    chunks = (50,) + y_true.shape[1:]
    got = r2_score(da.from_array(y_true, chunks=chunks), da.from_array(y_pred, chunks=chunks))
    # same sums in a different (chunked) order: equal to float64 rounding
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    lazy = r2_score(da.from_array(y_true, chunks=chunks), da.from_array(y_pred, chunks=chunks),
                    compute=False)  # fmt: skip
    assert isinstance(lazy, da.Array) and lazy.compute() == pytest.approx(expected, rel=1e-12)


def test_r2_score_unknown_chunks_and_numpy():
    from dask_ml.metrics import r2_score

    expected = sklearn.metrics.r2_score(_A[:, 0], _B[:, 0])
    ddf = dd.from_pandas(pd.DataFrame({"t": _A[:, 0], "p": _B[:, 0]}), npartitions=4)
    t, p = ddf["t"].to_dask_array(), ddf["p"].to_dask_array()  # chunk sizes unknown
    assert np.isnan(t.shape[0])
    assert r2_score(t, p) == pytest.approx(expected, rel=1e-12)
    assert r2_score(_A[:, 0], _B[:, 0]) == pytest.approx(expected, rel=1e-12)


def test_r2_score_refusals_unchanged():
    from dask_ml.metrics import r2_score

    y = da.ones(4, chunks=2)
    with pytest.raises(ValueError, match="sample_weight"):
        r2_score(y, y, sample_weight=np.ones(4))
    with pytest.raises(NotImplementedError, match="multioutput"):
        r2_score(y, y, multioutput="raw_values")


@pytest.mark.filterwarnings(
    # dask-glm 0.4.0 (used by dask_ml.linear_model) sets the deprecated dask config key
    # "fuse_ave_width"; third-party, harmless here.
    "ignore:Dask configuration key 'fuse_ave_width' has been deprecated:FutureWarning"
)
def test_r2_reaches_linear_regression_score_and_scorer(client):
    from dask_ml.linear_model import LinearRegression
    from dask_ml.metrics import get_scorer

    X = da.from_array(_A, chunks=50)
    y = da.from_array(_A @ [1.0, -2.0, 0.5] + 0.3 * _B[:, 0], chunks=50)
    model = LinearRegression(solver="newton").fit(X, y)
    expected = sklearn.metrics.r2_score(y.compute(), model.predict(X).compute())
    assert model.score(X, y) == pytest.approx(expected, rel=1e-12)
    assert get_scorer("r2")(model, X, y) == pytest.approx(expected, rel=1e-12)
