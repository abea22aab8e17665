"""The identity of a role, and the refusal of any role that differs from the scheduler's.

Distributed's own check (``distributed.versions``) compares a handful of packages and only
warns. hpcdask compares the whole environment: the Python version, every installed
distribution and its version, and the image's lock label, and refuses on any difference.
"""

from __future__ import annotations

import asyncio
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

from distributed.diagnostics.plugin import SchedulerPlugin

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


def image_label() -> str:
    """``lock:<sha256[:16]>``, plus ``sif:<ID>`` when the role knows the SIF it runs from."""
    info = image_info()
    label = f"lock:{info['lock_sha256'][:16]}" if info else "none (bare venv)"
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


def _flat(ident: Mapping[str, Any]) -> dict[str, str]:
    flat = {"python": ident.get("python", "?"), "image": ident.get("image", "?")}
    flat.update(ident.get("packages", {}))
    return flat


def differences(reference: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]
                ) -> list[tuple[str, str, dict[str, str]]]:
    """Rows (item, reference value, {role: value}) for every item any role has differently."""
    ref = _flat(reference)
    flats = {role: _flat(ident) for role, ident in others.items()}
    items = sorted(set(ref).union(*[set(f) for f in flats.values()]),
                   key=lambda k: (k not in ("python", "image"), k))
    rows = []
    for item in items:
        values = {role: f.get(item, "-") for role, f in flats.items()}
        if any(v != ref.get(item, "-") for v in values.values()):
            rows.append((item, ref.get(item, "-"), values))
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


# --- refusal on the scheduler ----------------------------------------------------------------

class IdentityGuard(SchedulerPlugin):
    """Scheduler plugin: answers ``hpcdask_identity`` and removes any worker that differs.

    hpcdask workers check themselves before joining (and exit with the table); this guard
    also catches a worker started some other way (``dask worker``) from another environment.
    """

    name = "hpcdask-identity-guard"

    def __init__(self) -> None:
        self.identity = identity()
        self.refused: dict[str, str] = {}

    async def start(self, scheduler) -> None:
        scheduler.handlers["hpcdask_identity"] = self._handler

    def _handler(self, comm=None) -> dict[str, Any]:
        return self.identity

    def add_worker(self, scheduler, worker: str) -> None:
        # The worker answers no RPC until its registration (this hook) returns, so the fast
        # check uses what it sent (distributed's package set) and the full one runs after.
        ws = scheduler.workers.get(worker)
        sent = getattr(ws, "versions", None) or {}
        mine = version_module_versions()
        diff = {k: (mine["packages"].get(k), v) for k, v in sent.get("packages", {}).items()
                if mine["packages"].get(k) != v}
        if sent.get("host", {}).get("python") != mine["host"]["python"]:
            diff["python"] = (mine["host"]["python"], sent.get("host", {}).get("python"))
        if diff:
            why = "; ".join(f"{k} {a} != {b}" for k, (a, b) in sorted(diff.items()))
            self._refuse(scheduler, worker, why)
        else:
            asyncio.ensure_future(self._vet(scheduler, worker))

    async def _vet(self, scheduler, worker: str) -> None:
        from distributed.protocol.serialize import Serialized, deserialize
        from distributed.protocol.pickle import dumps

        await asyncio.sleep(0)  # let the registration reply go out first
        try:
            resp = await asyncio.wait_for(
                scheduler.broadcast(msg={"op": "run", "function": dumps(identity),
                                         "args": dumps(()), "kwargs": dumps({})},
                                    workers=[worker]),
                timeout=30)
            result = resp[worker]
            if result.get("status") != "OK":
                raise RuntimeError(result.get("exception_text") or "no identity")
            theirs = result["result"]  # the scheduler does not deserialize what it relays
            if isinstance(theirs, Serialized):
                theirs = deserialize(theirs.header, theirs.frames)
            rows = differences(self.identity, {worker: theirs})
            why = summary(rows) if rows else None
        except Exception as e:  # noqa: BLE001 - any failure to prove identity is a refusal
            if worker not in scheduler.workers:
                return  # it left on its own
            why = f"could not report its identity ({type(e).__name__}: {e}); is it an hpcdask worker?"
        if why:
            self._refuse(scheduler, worker, why)

    def _refuse(self, scheduler, worker: str, why: str) -> None:
        self.refused[worker] = why
        logger.error("hpcdask: refused worker %s: %s", worker, why)

        async def remove() -> None:
            for _ in range(100):  # until its registration has completed
                if worker in scheduler.workers and worker in scheduler.stream_comms:
                    break
                await asyncio.sleep(0.05)
            await scheduler.remove_worker(worker, stimulus_id="hpcdask-identity-mismatch",
                                          close=True)

        asyncio.ensure_future(remove())


def version_module_versions() -> dict[str, Any]:
    from distributed.versions import get_versions

    return get_versions()
