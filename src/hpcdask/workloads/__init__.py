"""The workloads ``hpcdask run`` runs: one module each, listed here.

Each module has ``DESCRIPTION`` (one line: what it shows) and ``run(ctx) -> dict``, which
computes on the cluster *and* the single-machine baseline on the same data, and returns
the metrics to record (``score``, ``baseline_score``, ``metric``, ...).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from hpcdask.errors import BadInput
from hpcdask.workloads.runner import check_output, execute

__all__ = ["WORKLOADS", "resolve", "load", "describe", "execute", "check_output"]

# name -> module (under hpcdask.workloads)
WORKLOADS: dict[str, str] = {
    "pipeline": "pipeline",
    "smoke": "smoke",
    "incremental": "incremental",
    "hyperband": "hyperband",
    "gridsearch": "gridsearch",
    "predict": "predict",
    "kmeans": "kmeans",
    "etl": "etl",
    "xgboost": "xgboost",
    "collections": "collections",
}
ALIASES = {"default": "pipeline"}


def resolve(name: str) -> str:
    name = ALIASES.get(name, name)
    if name in WORKLOADS:
        return name
    close = difflib.get_close_matches(name, list(WORKLOADS), n=1, cutoff=0.5)
    hint = f"did you mean --workload {close[0]}?" if close else "see hpcdask run --list"
    raise BadInput(f"unknown workload '{name}'; {hint} (known: {', '.join(WORKLOADS)})")


def load(name: str) -> ModuleType:
    return importlib.import_module(f"hpcdask.workloads.{WORKLOADS[resolve(name)]}")


def describe() -> dict[str, str]:
    return {name: load(name).DESCRIPTION for name in WORKLOADS}
