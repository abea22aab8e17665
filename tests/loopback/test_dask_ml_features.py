"""The dask-ml features hpcdask workloads use, on the pinned stack, with hpcdask.compat applied.

Each test compares with scikit-learn on the same data where that is meaningful; every
tolerance is stated next to its assertion with the reason.
"""

from __future__ import annotations

import dask.array as da
import joblib
import numpy as np
import pytest
import sklearn.cluster
import sklearn.decomposition
import sklearn.linear_model
import sklearn.model_selection
import sklearn.preprocessing
from distributed import Client, LocalCluster, get_task_stream
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.metrics import accuracy_score, adjusted_rand_score

from hpcdask import compat

# dask_ml.linear_model uses dask-glm 0.4.0, which sets the dask config key "fuse_ave_width"
# that current dask deprecates (FutureWarning). Third-party and harmless; filtered only there.
DASK_GLM_FUSE_WARNING = (
    "ignore:Dask configuration key 'fuse_ave_width' has been deprecated:FutureWarning"
)


@pytest.fixture(scope="module", autouse=True)
def patched():
    return compat.apply()


@pytest.fixture(scope="module")
def client():
    # dashboard_address=":0": with None, distributed still binds its HTTP routes to 8787 and
    # warns when that port is taken; a free port keeps the tests warning-free anywhere.
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as c, Client(c) as client:
        yield client


def _data(n=600, d=5, chunks=150, seed=0):
    """Numpy + dask versions of one noisy binary classification problem."""
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    y = (X @ rng.randn(d) + 0.8 * rng.randn(n) > 0).astype(int)
    return X, y, da.from_array(X, chunks=(chunks, d)), da.from_array(y, chunks=chunks)


def test_standard_scaler(client):
    from dask_ml.preprocessing import StandardScaler

    X, _, dX, _ = _data()
    X = X * [1.0, 10.0, 0.1, 5.0, 100.0] + [0.0, -3.0, 7.0, 1e3, 2.0]
    dX = da.from_array(X, chunks=(150, 5))
    ours = StandardScaler().fit(dX)
    ref = sklearn.preprocessing.StandardScaler().fit(X)
    # chunked vs one-pass sums: equal up to float64 rounding of a few hundred terms
    assert_allclose(ours.mean_, ref.mean_, rtol=1e-12)
    assert_allclose(ours.var_, ref.var_, rtol=1e-10)
    assert_allclose(ours.scale_, ref.scale_, rtol=1e-10)
    assert_allclose(ours.transform(dX).compute(), ref.transform(X), rtol=1e-9, atol=1e-12)


def test_incremental_sgdclassifier(client):
    from dask_ml.wrappers import Incremental
    from sklearn.linear_model import SGDClassifier

    X, y, dX, dy = _data()
    inc = Incremental(SGDClassifier(tol=None, random_state=0), shuffle_blocks=False)
    inc.fit(dX, dy, classes=[0, 1])
    ref = SGDClassifier(tol=None, random_state=0)
    for i in range(0, 600, 150):  # the same blocks, in the same order
        ref.partial_fit(X[i : i + 150], y[i : i + 150], classes=[0, 1])
    # identical sequence of partial_fit calls on identical blocks: bit-for-bit
    assert_array_equal(inc.estimator_.coef_, ref.coef_)
    assert_array_equal(inc.estimator_.intercept_, ref.intercept_)
    assert_array_equal(inc.predict(dX).compute(), ref.predict(X))
    assert inc.score(dX, dy) == pytest.approx(ref.score(X, y), abs=1e-12)


def test_parallel_post_fit(client):
    from dask_ml.wrappers import ParallelPostFit

    X, y, dX, _ = _data()
    ref = sklearn.linear_model.LogisticRegression().fit(X, y)
    ppf = ParallelPostFit(sklearn.linear_model.LogisticRegression()).fit(X, y)
    assert_array_equal(ppf.predict(dX).compute(), ref.predict(X))
    # row-wise dot products on blocks vs the whole matrix: BLAS may sum in another order
    assert_allclose(ppf.predict_proba(dX).compute(), ref.predict_proba(X), rtol=1e-12, atol=1e-15)


def test_dask_ml_grid_search_cv(client):
    from dask_ml.model_selection import GridSearchCV

    X, y, _, _ = _data()
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    cv = sklearn.model_selection.KFold(3)
    ours = GridSearchCV(sklearn.linear_model.LogisticRegression(), grid, cv=cv).fit(X, y)
    ref = sklearn.model_selection.GridSearchCV(
        sklearn.linear_model.LogisticRegression(), grid, cv=cv
    ).fit(X, y)
    assert ours.best_params_ == ref.best_params_
    # same folds, same estimator, same data: the same fits, so equal scores
    assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"],
                    rtol=0, atol=1e-12)  # fmt: skip
    assert_allclose(ours.best_estimator_.coef_, ref.best_estimator_.coef_, rtol=1e-12)


def test_hyperband_search_cv(client):
    from dask_ml.model_selection import HyperbandSearchCV, train_test_split
    from sklearn.linear_model import SGDClassifier

    _, _, dX, dy = _data(n=800, chunks=200)
    X_train, X_test, y_train, y_test = train_test_split(dX, dy, test_size=0.25, random_state=0)
    grid = {"alpha": np.logspace(-5, 1, 20).tolist()}  # > any bracket size: no sampler warning
    with compat.session(client):  # dask/dask-ml#1016
        search = HyperbandSearchCV(SGDClassifier(tol=None, random_state=0), grid, max_iter=9,
                                   random_state=0).fit(X_train, y_train, classes=[0, 1])
    assert search.best_params_["alpha"] in grid["alpha"]
    assert search.metadata_["n_models"] == search.metadata["n_models"]
    # the search's dask-side scoring agrees with scikit-learn on its best estimator
    X_test, y_test = X_test.compute(), y_test.compute()
    expected = accuracy_score(y_test, search.best_estimator_.predict(X_test))
    assert search.score(X_test, y_test) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.7  # the problem is learnable: well above chance (0.5)


def test_kmeans(client):
    from dask_ml.cluster import KMeans

    centers = np.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    rng = np.random.RandomState(0)
    X = np.concatenate([c + rng.randn(200, 2) for c in centers])
    ours = KMeans(n_clusters=3, random_state=0).fit(da.from_array(X, chunks=(150, 2)))
    ref = sklearn.cluster.KMeans(n_clusters=3, random_state=0, n_init=10).fit(X)
    # well separated blobs: both find the same partition (labels up to renaming) ...
    assert adjusted_rand_score(ref.labels_, ours.labels_.compute()) == 1.0
    # ... so the centres are the same means, up to k-means' convergence tolerance (1e-4)
    order = lambda c: c[np.lexsort(c.T)]  # noqa: E731
    assert_allclose(order(ours.cluster_centers_), order(ref.cluster_centers_), atol=1e-6)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


@pytest.mark.filterwarnings(DASK_GLM_FUSE_WARNING)
def test_logistic_regression(client):
    from dask_ml.linear_model import LogisticRegression

    X, y, dX, dy = _data()
    # newton = unregularised maximum likelihood (dask-glm's newton ignores the penalty),
    # the same optimum as scikit-learn without penalty.
    ours = LogisticRegression(solver="newton", max_iter=100, tol=1e-10).fit(dX, dy)
    ref = sklearn.linear_model.LogisticRegression(penalty=None, tol=1e-10, max_iter=1000).fit(X, y)
    # two iterative solvers stopping near the same optimum: agree to ~1e-6 relative
    assert_allclose(ours.coef_, ref.coef_.ravel(), rtol=1e-5)
    assert ours.intercept_ == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)
    assert_allclose(ours.predict_proba(dX).compute()[:, 1], ref.predict_proba(X)[:, 1], atol=1e-6)
    assert_array_equal(ours.predict(dX).compute(), ref.predict(X))


def test_make_classification(client):
    from dask_ml.datasets import make_classification

    X, y = make_classification(n_samples=1000, n_features=6, n_informative=3, chunks=250,
                               random_state=0)  # fmt: skip
    assert X.shape == (1000, 6) and X.chunks == ((250,) * 4, (6,)) and X.dtype == np.float64
    assert y.shape == (1000,) and y.chunks == ((250,) * 4,)
    X2, y2 = make_classification(n_samples=1000, n_features=6, n_informative=3, chunks=250,
                                 random_state=0)  # fmt: skip
    Xc, yc = da.compute(X, y)
    assert_array_equal(Xc, X2.compute())  # reproducible from random_state
    assert_array_equal(yc, y2.compute())
    assert set(np.unique(yc)) == {0, 1}
    # dask-ml draws its own data (not sklearn's generator), so no value comparison;
    # scikit-learn must find the signal: well above chance (0.5) out of sample.
    model = sklearn.linear_model.LogisticRegression().fit(Xc[:750], yc[:750])
    assert model.score(Xc[750:], yc[750:]) > 0.6


def test_train_test_split(client):
    from dask_ml.model_selection import train_test_split

    n = 1000
    ids = np.arange(n, dtype=float)
    dX = da.from_array(np.c_[ids, ids * 2.0], chunks=(250, 2))
    dy = da.from_array(ids, chunks=250)
    X_train, X_test, y_train, y_test = train_test_split(dX, dy, test_size=0.2, random_state=0)
    X_train, X_test, y_train, y_test = da.compute(X_train, X_test, y_train, y_test)
    assert len(X_test) == 200 and len(X_train) == 800  # 20 % of every block
    assert_array_equal(X_train[:, 0], y_train)  # rows stay paired with their targets
    assert_array_equal(X_test[:, 0], y_test)
    assert_array_equal(np.sort(np.r_[y_train, y_test]), ids)  # disjoint and complete
    assert not np.array_equal(np.sort(y_test), np.arange(800, 1000))  # shuffled
    # numpy input is handed to scikit-learn: exactly scikit-learn's split. Known limitation of
    # dask-ml 2025.1.0 with scikit-learn 1.7 (not patched by hpcdask.compat): its default
    # shuffle=None is passed on and refused, so workloads must give shuffle explicitly.
    with pytest.raises(ValueError, match="'shuffle' parameter"):
        train_test_split(ids, test_size=0.2, random_state=0)
    ours = train_test_split(ids, test_size=0.2, random_state=0, shuffle=True)
    ref = sklearn.model_selection.train_test_split(ids, test_size=0.2, random_state=0)
    for a, b in zip(ours, ref):
        assert_array_equal(a, b)


def test_joblib_dask_backend_grid_search(client):
    X, y, _, _ = _data()
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}

    def search():
        return sklearn.model_selection.GridSearchCV(
            sklearn.linear_model.LogisticRegression(), grid, cv=3, n_jobs=-1
        ).fit(X, y)

    ref = search()  # default (loky/threads) backend
    with get_task_stream(client) as tasks, joblib.parallel_backend("dask"):
        ours = search()
    assert len(tasks.data) >= 4 * 3  # the (params x folds) fits really ran on the cluster
    assert ours.best_params_ == ref.best_params_
    # same fits run elsewhere: identical results
    assert_allclose(ours.cv_results_["mean_test_score"], ref.cv_results_["mean_test_score"],
                    rtol=0, atol=1e-12)  # fmt: skip
    assert_allclose(ours.best_estimator_.coef_, ref.best_estimator_.coef_, rtol=1e-12)


def test_pca_randomized(client):
    from dask_ml.decomposition import PCA

    rng = np.random.RandomState(0)
    # rank-3 signal plus small noise: a clear spectral gap after 3 components
    X = rng.randn(1000, 3) @ (rng.randn(3, 8) * [[5.0], [3.0], [2.0]]) + 0.01 * rng.randn(1000, 8)
    ours = PCA(n_components=3, svd_solver="randomized", random_state=0).fit(
        da.from_array(X, chunks=(250, 8))
    )
    ref = sklearn.decomposition.PCA(n_components=3, svd_solver="full").fit(X)
    # randomized SVD with power iterations recovers a gapped spectrum to ~1e-8 relative
    assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-6)
    assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-6)
    # components agree up to sign
    assert_allclose(np.abs(np.sum(ours.components_ * ref.components_, axis=1)), 1.0, atol=1e-6)
    Z = ours.transform(da.from_array(X, chunks=(250, 8))).compute()
    assert_allclose(np.abs(Z), np.abs(ref.transform(X)), rtol=1e-5, atol=1e-6)
