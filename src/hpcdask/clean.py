"""Per-cluster folders left behind (a job killed before its cleanup, a crashed login-node
script): find them and remove them, never another user's and never a live cluster's.

A folder is live when its scheduler answers at the address in its scheduler file, or when
the process that made it (its ``scheduler.json`` or ``owner.json`` stamp) still runs on this
host. A folder made on another host whose scheduler does not answer is stale once its
certificate has expired; before that hpcdask cannot tell, and says so.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from hpcdask import config, security
from hpcdask.errors import BadInput
from hpcdask.files import atomic_write, user_name

STAMP = "owner.json"
SCHEDULER_FILES = ("scheduler.json", "scheduler-*.json")
FRESH = 600  # seconds: a folder changed this recently may belong to a cluster starting up


def stamp(folder: Path, **extra: Any) -> None:
    """Say who made ``folder`` (this process on this host), for :func:`survey`."""
    info = {"uid": os.getuid(), "owner": user_name(), "host": socket.gethostname(),
            "pid": os.getpid(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    atomic_write(Path(folder) / STAMP, json.dumps(info, indent=2) + "\n")


def unstamp(folder: Path) -> None:
    """The cluster has ended: remove its stamp, and the folder when nothing else is in it."""
    (Path(folder) / STAMP).unlink(missing_ok=True)
    try:
        Path(folder).rmdir()
    except OSError:
        pass


@dataclass(frozen=True)
class Folder:
    path: Path
    state: str  # stale, live, unknown, foreign
    why: str


def _read(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _answers(address: str, timeout: float = 2.0) -> bool:
    try:
        host, port = address.split("://", 1)[-1].rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _expired(folder: Path) -> bool | None:
    creds = security.current(folder)
    if creds is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    except (OSError, ValueError):
        return True
    return cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc)


def judge(folder: Path, now: float | None = None) -> Folder:
    """Whether ``folder`` is stale, live, another user's, or cannot be told."""
    st = folder.lstat()
    if st.st_uid != os.getuid():
        return Folder(folder, "foreign", f"belongs to uid {st.st_uid}, not you")
    sched = next((p for pattern in SCHEDULER_FILES for p in sorted(folder.glob(pattern))), None)
    info = _read(sched) if sched else {}
    # A scheduler killed before it published its file left only its claim (schedfile.claim_path).
    claim = next(iter(sorted(folder.glob(".scheduler*.json.claim"))), None)
    meta = (info.get("hpcdask", {}) if info else
            _read(claim).get("hpcdask", {}) if claim else _read(folder / STAMP))
    address = info.get("address")
    if address and _answers(address):
        return Folder(folder, "live", f"its scheduler answers at {address}")
    host, pid = meta.get("host"), meta.get("pid")
    if host == socket.gethostname() and pid:
        if _pid_alive(pid):
            return Folder(folder, "live", f"its process {pid} still runs on this host")
        return Folder(folder, "stale", f"its process {pid} on this host has ended")
    newest = max([st.st_mtime, *(p.lstat().st_mtime for p in folder.iterdir())])
    if (time.time() if now is None else now) - newest < FRESH:
        return Folder(folder, "unknown", "changed in the last 10 minutes (a cluster starting?)")
    expired = _expired(folder)
    if expired:
        return Folder(folder, "stale", "its certificate has expired")
    if expired is None and not address:
        return Folder(folder, "stale", "no scheduler file and no credentials")
    where = f" (made on {host})" if host else ""
    return Folder(folder, "unknown", f"its scheduler does not answer from here{where}, but its "
                                     f"credentials are valid: run hpcdask clean on that host, or "
                                     f"again once the job has ended")


def survey(shared_dir: Path) -> list[Folder]:
    """Every per-cluster folder in ``shared_dir``, judged."""
    shared_dir = Path(shared_dir).expanduser()
    if not shared_dir.is_dir():
        return []
    return [judge(p) for p in sorted(shared_dir.iterdir()) if p.is_dir() and not p.is_symlink()]


def remove(folder: Folder) -> None:
    if folder.state != "stale":
        raise ValueError(f"{folder.path} is {folder.state}")
    shutil.rmtree(folder.path)


def run(folders: tuple[Path, ...] = (), dry_run: bool = False) -> Iterator[str]:
    """``hpcdask clean``: judge the FOLDERS given (refusing any that is not stale) or every
    folder in hpcdask.shared-dir, remove the stale ones; one line per folder."""
    if folders:
        found = []
        for f in folders:
            if not f.is_dir():
                raise BadInput(f"{f} is not a folder; give a cluster folder, e.g. "
                               f"{config.get('shared-dir')}/JOBID")
            found.append(judge(f.expanduser().absolute()))
        refused = [f for f in found if f.state != "stale"]
        if refused:
            f = refused[0]
            raise BadInput(f"refusing to remove {f.path}: {f.state}, {f.why}")
    else:
        found = survey(Path(config.get("shared-dir")).expanduser())
    for f in found:
        if f.state != "stale":
            yield f"kept {f.path}: {f.state}: {f.why}"
        elif dry_run:
            yield f"stale {f.path}: {f.why} (not removed: --dry-run)"
        else:
            remove(f)
            yield f"removed {f.path}: {f.why}"
    if not found:
        yield "no cluster folders"
