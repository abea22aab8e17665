"""The identity of a role (one function, used by every check and report), and its tables.

Distributed's own check (``distributed.versions``) compares a handful of packages and only
warns. hpcdask compares the whole environment: the Python version, every installed
distribution and its version, and the image's lock label, and refuses on any difference.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import socket
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from hpcdask import sif

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_INFO = "/opt/hpcdask/image.json"
# Installers, not the runtime: the image and a venv may carry different ones harmlessly.
IGNORED = frozenset({"pip"})
KEY_PACKAGES = ("dask", "distributed", "dask-ml", "scikit-learn", "pandas", "numpy", "xgboost-cpu")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def installed() -> dict[str, str]:
    """Every distribution importable here, name -> version (the first on sys.path wins)."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in out:
            out[canonical(name)] = dist.version
    return {k: v for k, v in sorted(out.items()) if k not in IGNORED}


def image_info() -> dict[str, Any] | None:
    """What the image says of itself (``/opt/hpcdask/image.json``); None in a bare venv."""
    path = Path(os.environ.get("HPCDASK_IMAGE_INFO", DEFAULT_IMAGE_INFO))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


KEY_DEBIAN = ("python3.11", "libc6", "libssl3", "libmpich12", "graphviz")


def debian_packages() -> dict[str, str]:
    """The image's Debian packages as its debian.lock pins them (beside image.json); {} elsewhere."""
    path = Path(os.environ.get("HPCDASK_IMAGE_INFO", DEFAULT_IMAGE_INFO)).with_name("debian.lock")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pins = (ln.strip().split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))
    return {p[0]: p[1] for p in pins if len(p) == 2}


def image_label() -> str:
    """``lock:<sha256[:16]>``, ``user:<sha256[:16]>`` of the project's hpcdask.lock in an image
    ``hpcdask image build`` made, plus ``sif:<ID>`` when the role knows the SIF it runs from."""
    info = image_info()
    label = f"lock:{info['lock_sha256'][:16]}" if info else "none (bare venv)"
    user = (info or {}).get("project", {}).get("lock_sha256")
    label = f"{label} user:{user[:16]}" if user else label
    sif_id = sif.image_id() if info else None
    return f"{label} sif:{sif_id}" if sif_id else label


def identity() -> dict[str, Any]:
    """What must be equal on every role: Python, packages, image lock label (and SIF ID)."""
    return {"python": platform.python_version(), "image": image_label(), "packages": installed()}


def report() -> dict[str, Any]:
    """identity() plus where this role runs (host, container), for metrics and tables."""
    return {
        **identity(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "container": os.environ.get("APPTAINER_CONTAINER")
        or ("podman/docker" if Path("/run/.containerenv").exists() or Path("/.dockerenv").exists()
            else None),
        "apptainer_name": os.environ.get("APPTAINER_NAME"),
    }


# Compared only between roles that both know them: a role started by hand with
# `apptainer exec IMAGE ...` cannot see its .sif (only the jobscripts and slurm_cluster() bind it
# in), and its lock and packages still have to match.
KNOWN_BY_SOME = frozenset({"sif"})


def _flat(ident: Mapping[str, Any]) -> dict[str, str]:
    lock, _, sif_id = str(ident.get("image", "?")).partition(" sif:")
    flat = {"python": ident.get("python", "?"), "image": lock}
    if sif_id:
        flat["sif"] = sif_id
    flat.update(ident.get("packages", {}))
    return flat


def from_distributed(sent: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an identity that distributed's ``get_versions()`` carries (what every worker
    and client sends the scheduler when it registers): Python and about ten packages."""
    python = str(sent.get("host", {}).get("python", "?"))
    packages = {canonical(k): "-" if v is None else str(v)
                for k, v in sent.get("packages", {}).items() if k != "python"}
    return {"python": ".".join(python.split(".")[:3]), "packages": packages}


def _given(ident: Mapping[str, Any]) -> set[str]:
    return {k for k in ("python", "image") if k in ident} | set(ident.get("packages", {}))


def differences(reference: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]],
                only_theirs: bool = False) -> list[tuple[str, str, dict[str, str]]]:
    """Rows (item, reference value, {role: value}) for every item any role has differently.

    ``only_theirs``: compare only the items the others report (a partial identity such as
    :func:`from_distributed`'s)."""
    ref = _flat(reference)
    flats = {role: _flat(ident) for role, ident in others.items()}
    if only_theirs:
        flats = {role: {k: v for k, v in f.items() if k in _given(others[role])}
                 for role, f in flats.items()}
        names = set().union(*[set(f) for f in flats.values()])
    else:
        names = set(ref).union(*[set(f) for f in flats.values()])
    items = sorted(names, key=lambda k: (k not in ("python", "image", "sif"), k))
    rows = []
    for item in items:
        values = {role: f.get(item, "-") for role, f in flats.items()}
        mine = ref.get(item, "-")
        differ = [v != mine for v in values.values()
                  if item not in KNOWN_BY_SOME or "-" not in (v, mine)]
        if any(differ):
            rows.append((item, mine, values))
    return rows


def table(rows: list[tuple[str, str, dict[str, str]]], ref_name: str = "scheduler") -> str:
    """A plain-text table of the rows of :func:`differences`."""
    roles = list(dict.fromkeys(r for _, _, values in rows for r in values))
    header = ["package", ref_name, *roles]
    body = [[item, ref, *[values.get(r, "") for r in roles]] for item, ref, values in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [header, *body])


def summary(rows: list[tuple[str, str, dict[str, str]]]) -> str:
    """One line naming what differs, e.g. ``scikit-learn 1.7.2 != 1.6.1 (worker node2)``."""
    parts = []
    for item, ref, values in rows[:5]:
        for role, value in values.items():
            if value != ref:
                parts.append(f"{item} {ref} != {value} ({role})")
                break
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return "; ".join(parts) + more


# --- the lock -------------------------------------------------------------------------------

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def lock_differences(lock: Path, have: Mapping[str, str] | None = None,
                     extra_ok: frozenset[str] = frozenset({"hpcdask"})) -> list[str]:
    """Lines naming each package that is missing, at another version, or not in the lock."""
    pins, have = read_lock(lock), dict(installed() if have is None else have)
    out = []
    for name, version in sorted(pins.items()):
        if name in IGNORED:
            continue
        if name not in have:
            out.append(f"{name}: locked {version}, not installed")
        elif have[name] != version:
            out.append(f"{name}: locked {version}, installed {have[name]}")
    for name in sorted(set(have) - set(pins) - extra_ok):
        out.append(f"{name}: installed {have[name]}, not in the lock")
    return out
