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

from hpcdask.errors import BadInput

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


def check_user_config() -> None:
    """Fail with one line when a user's Dask YAML config does not parse."""
    for path in dask.config.paths:
        p = Path(path)
        files = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else []
        for f in files:
            try:
                with open(f) as fh:
                    yaml.safe_load(fh)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{f}:{mark.line + 1}" if mark else str(f)
                raise BadInput(
                    f"config file {where} is not valid YAML ({getattr(e, 'problem', e)}); "
                    f"fix it or move it away: mv {f} {f}.bak"
                ) from None
            except OSError:
                continue


reconfigure()
