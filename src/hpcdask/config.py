"""hpcdask's settings: the defaults in ``hpcdask.yaml`` merged into ``dask.config``.

Every setting lives under the ``hpcdask`` namespace, so the usual Dask overrides work
(``~/.config/dask/*.yaml``, ``DASK_HPCDASK__INTERFACE=eth0``); the few Dask settings hpcdask
changes (``distributed.comm.shard``) are defaults too, so a user's own setting still wins. The jobscripts' short
environment variables (``HPCDASK_INTERFACE=eth0``) are read here too, on top of both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import distributed  # noqa: F401  (its defaults first: hpcdask.yaml's changes to them must win)
import yaml


_DEFAULTS_FILE = Path(__file__).with_name("hpcdask.yaml")
# Environment variables with this prefix that are not settings (not config keys).
_NOT_SETTINGS = {"HPCDASK_IMAGE_INFO", "HPCDASK_TEST_RUNNER", "HPCDASK_WORKER_MARKS"}


def _load_defaults() -> dict[str, Any]:
    with open(_DEFAULTS_FILE) as f:
        return yaml.safe_load(f)


def _short_env(defaults: dict[str, Any]) -> dict[str, Any]:
    keys = {k.replace("-", "_").upper(): k for k in defaults["hpcdask"]}
    out: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("HPCDASK_") or name in _NOT_SETTINGS:
            continue
        key = keys.get(name[len("HPCDASK_"):])
        if key is not None:
            out[key] = yaml.safe_load(value) if value != "" else None
    return {"hpcdask": out} if out else {}


def _apply_comm_shard() -> None:
    """distributed reads ``distributed.comm.shard`` once, when ``distributed.comm.tcp`` is
    imported (a class attribute): set it on the classes of this process, and in the environment
    for the processes it starts (a nanny's worker, LocalCluster's workers) to read at import."""
    from dask.utils import parse_bytes
    from distributed.comm.tcp import C_INT_MAX, TCP, TLS

    shard = dask.config.get("distributed.comm.shard")
    os.environ.setdefault("DASK_DISTRIBUTED__COMM__SHARD", str(shard))
    TCP.max_shard_size = parse_bytes(shard)
    TLS.max_shard_size = min(C_INT_MAX, TCP.max_shard_size)


def reconfigure() -> None:
    """(Re)load hpcdask's defaults, then the short ``HPCDASK_*`` environment overrides."""
    defaults = _load_defaults()
    dask.config.update_defaults(defaults)
    short = _short_env(defaults)
    if short:
        dask.config.update(dask.config.config, short, priority="new")
    _apply_comm_shard()


def get(key: str, override: Any = None) -> Any:
    """``override`` when given, else the configured ``hpcdask.<key>``."""
    if override is not None:
        return override
    return dask.config.get(f"hpcdask.{key}")


reconfigure()
