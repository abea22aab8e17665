"""Tested fixes that let dask-ml 2025.1.0 run on the Dask pinned in the lock.

Wrap work on a client in :func:`session` (hpcdask does for ``hpcdask client`` and ``hpcdask
run``), or call :func:`apply` once per process before any dask-ml use (it is idempotent,
thread-safe and safe everywhere). ``apply(defer=True)``, what a user's script gets, leaves
dask-ml unimported (its import takes 2-4 s in the image) and applies the dask-ml patch the
moment the process imports ``dask_ml.metrics``: a script that never uses dask-ml never pays.  It decides from
installed versions (``importlib.metadata``, no dask-ml import when they do not
match) and, for the metric, from a graph-only probe; anything not needed is left
alone.  It returns the ids of the fixes that are active.

Patches (each one can be deleted on its own once upstream releases a fix):

``dask/dask-ml#1016`` -- incremental searches raise
    ``RuntimeError: Attempting to use an asynchronous Client in a synchronous
    context of `dask.compute```.
    Affects ``IncrementalSearchCV``, ``InverseDecaySearchCV``,
    ``SuccessiveHalvingSearchCV`` and ``HyperbandSearchCV`` (all run
    ``dask_ml.model_selection._incremental._fit``).
    Cause: ``BaseIncrementalSearchCV.fit`` runs the coroutine ``_fit`` through
    ``client.sync``, i.e. on the client's event-loop thread, where
    ``client.asynchronous`` is True.  ``_fit`` calls the top-level
    ``dask.persist(...)`` without a scheduler; since dask 2025.3.0
    ``dask.base.get_scheduler`` finds the default client and refuses it there
    (``_ensure_not_async``).  Passing the client's ``get`` explicitly makes
    ``dask.persist`` hand the collections to ``Client.persist``, which only
    submits the graph and returns futures (it never blocks on the loop) -- the
    behaviour ``dask.persist`` had before 2025.3.0.  Every other distributed call
    in ``_fit`` already awaits client methods, and ``dask.persist`` is the only
    top-level dask entry point it uses, so this is the whole fix.
    Fix: no patch. :func:`session` names the client as Dask's scheduler
    (``dask.config.set(scheduler=client.get)``) around the work done on it (the
    script of ``hpcdask client``, the workloads of ``hpcdask run``): ``dask.persist``
    then takes the client's ``get`` from the configuration instead of looking up
    the default client, and hands the collections to ``Client.persist``. For a
    script's own synchronous ``dask.compute`` calls that is what the default client
    did anyway. Outside hpcdask, do the same around ``fit``::

        with dask.config.set(scheduler=client.get):
            search.fit(X, y)

    Applied when dask-ml == 2025.1.0 and dask >= 2025.3.0.  Upstream (dask-ml
    main, May 2025) only skips its tests for this; drop this when a dask-ml
    release fixes it (the version check then turns it off by itself).

``dask/dask-ml#1012`` -- ``dask_ml.metrics.r2_score`` raises
    ``ValueError: cannot broadcast shape (nan,) to shape (nan,)``.
    The 2025.1.0 code assigns into a dask array through a boolean dask mask,
    whose shape is unknown; it fails for every input on the pinned dask.
    Patch: ``r2_score`` is replaced by a version computing the same value with
    ``da.where`` (the approach of the upstream fix, dask/dask-ml#1013, merged
    after 2025.1.0, unreleased), written so that a zero denominator is never
    divided by (no RuntimeWarning), and so that 1-D inputs with unknown chunk
    sizes (e.g. from ``DataFrame.to_dask_array()``) work.  Semantics are
    scikit-learn's ``r2_score(..., force_finite=True)`` with
    ``multioutput="uniform_average"``; ``sample_weight`` and other
    ``multioutput`` values are still refused as dask-ml 2025.1.0 does.  The
    replacement is bound wherever dask-ml holds the old function:
    ``dask_ml.metrics.regression``, ``dask_ml.metrics``, the ``"r2"`` entry of
    ``dask_ml.metrics.scorer.SCORERS`` / ``r2_scorer`` and any already imported
    ``dask_ml.*`` module (``dask_ml.linear_model.glm``, used by
    ``LinearRegression.score``); modules imported later take it from
    ``dask_ml.metrics``.  Its ``__module__`` is this module so that pickled
    scorers load the fixed function on workers too.
    Applied when dask-ml == 2025.1.0 and a graph-only probe of the original
    function raises.  Drop with the next dask-ml release.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from packaging.version import Version

from hpcdask.importhook import OnImport

__all__ = ["apply", "active", "session", "PATCHES"]

#: the only dask-ml release these patches are written for
DASK_ML_VERSION = Version("2025.1.0")
#: first dask release whose ``get_scheduler`` refuses an asynchronous client
DASK_ASYNC_REFUSAL = Version("2025.3.0")

INCREMENTAL_PERSIST = "dask/dask-ml#1016"
R2_SCORE = "dask/dask-ml#1012"

#: patch id -> one line for version reports
PATCHES = {
    INCREMENTAL_PERSIST: "dask.config scheduler=client.get around the work, so dask.persist "
    "uses the Client (Hyperband/Incremental/SuccessiveHalving/InverseDecay SearchCV)",
    R2_SCORE: "dask_ml.metrics.r2_score rewritten with da.where",
}

_lock = threading.Lock()


def _installed(dist: str) -> Version | None:
    try:
        return Version(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- #1016


def _incremental_persist_needed() -> bool:
    dask_version = _installed("dask")
    return dask_version is not None and dask_version >= DASK_ASYNC_REFUSAL


# --------------------------------------------------------------------------- #1012


def r2_score(
    y_true: Any,
    y_pred: Any,
    sample_weight: Any = None,
    multioutput: str | None = "uniform_average",
    compute: bool = True,
) -> Any:
    """``dask_ml.metrics.r2_score`` with dask/dask-ml#1012 fixed (see module docstring).

    Equals ``sklearn.metrics.r2_score(y_true, y_pred)`` (``force_finite=True``):
    1.0 where the residual sum of squares is 0, 0.0 where only the total sum of
    squares is 0, averaged uniformly over outputs.
    """
    import dask.array as da
    from dask_ml.metrics import regression

    regression._check_sample_weight(sample_weight)
    # 2025.1.0's _check_reg_targets reshapes 1-D inputs with reshape((-1, 1)), which
    # dask refuses for unknown chunk sizes; adding the axis by indexing works for both.
    if getattr(y_true, "ndim", None) == 1:
        y_true = y_true[:, None]
    if getattr(y_pred, "ndim", None) == 1:
        y_pred = y_pred[:, None]
    _, y_true, y_pred, _ = regression._check_reg_targets(y_true, y_pred, multioutput)

    numerator = ((y_true - y_pred) ** 2).sum(axis=0, dtype="f8")
    denominator = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0, dtype="f8")
    safe_denominator = da.where(denominator == 0, 1.0, denominator)
    score = da.where(
        numerator == 0,
        1.0,
        da.where(denominator == 0, 0.0, 1.0 - numerator / safe_denominator),
    )
    result = score.mean(axis=0)
    if compute:
        result = result.compute()
    return result


r2_score.hpcdask_compat = R2_SCORE  # type: ignore[attr-defined]


def _r2_score_is_broken(original: Any) -> bool:
    """Graph-only probe: building the 2025.1.0 graph already raises on broken stacks."""
    import dask.array as da

    y = da.arange(4.0, chunks=2)
    try:
        original(y, y + 1.0, compute=False)
    except ValueError:
        return True
    return False


def _apply_r2_score() -> bool:
    import importlib

    # by name, not as dask_ml.metrics: a deferred apply runs while dask_ml itself is still
    # importing, before Python sets the package's ``metrics`` attribute
    metrics = importlib.import_module("dask_ml.metrics")
    from dask_ml.metrics import regression, scorer

    original = regression.r2_score
    if getattr(original, "hpcdask_compat", None) != R2_SCORE:
        if not _r2_score_is_broken(original):
            return False
        for name, module in list(sys.modules.items()):
            if (name == "dask_ml" or name.startswith("dask_ml.")) and getattr(
                module, "r2_score", None
            ) is original:
                module.r2_score = r2_score
        metrics.r2_score = r2_score
        regression.r2_score = r2_score
    if scorer.SCORERS.get("r2", (None,))[0] is not r2_score:
        scorer.r2_scorer = (r2_score, {})
        scorer.SCORERS["r2"] = scorer.r2_scorer
    return True


# --------------------------------------------------------------------------- deferral

#: the module whose import completes a deferred apply(): it holds r2_score
_TRIGGER = "dask_ml.metrics"


_hook: OnImport | None = None


def _defer() -> tuple[str, ...]:
    """apply(defer=True): what needs no dask-ml import now, the dask-ml patch on its import."""
    global _hook
    if _TRIGGER in sys.modules or _installed("dask-ml") != DASK_ML_VERSION:
        return apply()  # already imported, or nothing to patch: no import to save
    with _lock:
        if _active is None and _hook is None:
            _hook = OnImport(_TRIGGER, _on_import)
            sys.meta_path.insert(0, _hook)
    return (INCREMENTAL_PERSIST,) if _incremental_persist_needed() else ()


def _unhook() -> None:
    global _hook
    if _hook is not None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_hook)
        _hook = None


# --------------------------------------------------------------------------- entry


_active: tuple[str, ...] | None = None


def apply(defer: bool = False) -> tuple[str, ...]:
    """Apply the patches this environment needs; return their ids (empty: none needed).

    Idempotent and thread-safe; after the first call it only returns the cached result.
    ``defer=True``: do not import dask-ml for it now; the dask-ml patch is applied when the
    process imports ``dask_ml.metrics`` (the ids returned are those in effect so far).
    """
    if _active is not None:
        return _active
    if defer:
        return _defer()
    with _lock:
        _unhook()  # this apply imports dask_ml.metrics itself
        return _apply_locked()


def _apply_locked() -> tuple[str, ...]:
    global _active
    if _active is not None:
        return _active
    active: list[str] = []
    if _installed("dask-ml") == DASK_ML_VERSION:
        if _incremental_persist_needed():
            active.append(INCREMENTAL_PERSIST)
        if _apply_r2_score():
            active.append(R2_SCORE)
    _active = tuple(active)
    return _active


def _on_import() -> None:
    """The deferred apply, run as ``dask_ml.metrics`` finishes executing. If an apply() is under
    way (this thread's own, whose import fired this, or another thread's), that one patches:
    waiting for its lock here would deadlock."""
    if not _lock.acquire(blocking=False):
        return
    try:
        _apply_locked()
    finally:
        _lock.release()


def active() -> tuple[str, ...]:
    """Ids of the patches applied in this process (empty before :func:`apply`)."""
    return _active or ()


@contextlib.contextmanager
def session(client: Any, defer: bool = False) -> Iterator[tuple[str, ...]]:
    """Work on ``client`` with every fix this environment needs (see the module docstring);
    ``defer``: as :func:`apply`'s."""
    import dask.config

    active = apply(defer)
    if INCREMENTAL_PERSIST not in active:
        yield active
        return
    with dask.config.set(scheduler=client.get):
        yield active
