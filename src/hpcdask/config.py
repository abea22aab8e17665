"""hpcdask's settings: the defaults in ``hpcdask.yaml`` merged into ``dask.config``.

Every setting lives under the ``hpcdask`` namespace, so the usual Dask overrides work
(``~/.config/dask/*.yaml``, ``DASK_HPCDASK__INTERFACE=eth0``). The jobscripts' short
environment variables (``HPCDASK_INTERFACE=eth0``) are read here too, on top of both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml


_DEFAULTS_FILE = Path(__file__).with_name("hpcdask.yaml")
# Environment variables with this prefix that are not settings (not config keys).
_NOT_SETTINGS = {"HPCDASK_IMAGE_INFO", "HPCDASK_TEST_RUNNER"}


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


def reconfigure() -> None:
    """(Re)load hpcdask's defaults, then the short ``HPCDASK_*`` environment overrides."""
    defaults = _load_defaults()
    dask.config.update_defaults(defaults)
    short = _short_env(defaults)
    if short:
        dask.config.update(dask.config.config, short, priority="new")


def get(key: str, override: Any = None) -> Any:
    """``override`` when given, else the configured ``hpcdask.<key>``."""
    if override is not None:
        return override
    return dask.config.get(f"hpcdask.{key}")


reconfigure()
