"""The scheduler file: how workers and clients on other nodes find the scheduler.

hpcdask writes it itself (not through ``Scheduler(scheduler_file=...)``) so that it is
written atomically with mode 0600, names its job and owner, and a stale one is refused.
Distributed's ``Client(scheduler_file=...)`` and ``dask worker --scheduler-file`` read it
unchanged: the extra ``hpcdask`` block is ignored by them.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hpcdask.errors import BadInput
from hpcdask.files import atomic_write, private_dir


def job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")


def prepare(path: Path) -> Path:
    """For a new scheduler: the folder exists and is private, and no earlier file is there."""
    path = Path(path).expanduser().absolute()
    private_dir(path.parent, what="scheduler file folder")
    if path.exists():
        info = _describe(path)
        raise BadInput(f"scheduler file {path} already exists{info}; if that scheduler has "
                       f"ended, delete the stale file: rm {path}")
    return path


def _describe(path: Path) -> str:
    try:
        meta = json.loads(path.read_text()).get("hpcdask", {})
    except (OSError, ValueError):
        return ""
    parts = [f"job {meta['job']}" if meta.get("job") else None,
             f"owner {meta['owner']}" if meta.get("owner") else None,
             f"host {meta['host']}" if meta.get("host") else None,
             f"written {meta['created']}" if meta.get("created") else None]
    parts = [p for p in parts if p]
    return f" ({', '.join(parts)})" if parts else ""


def write(path: Path, identity: dict[str, Any], tls: bool) -> None:
    """Write the scheduler's identity plus who and what it belongs to, atomically, mode 0600."""
    content = dict(identity)
    content["hpcdask"] = {
        "job": job_id(),
        "owner": getpass.getuser(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tls": tls,
    }
    atomic_write(path, json.dumps(content, indent=2, default=str) + "\n")


def read(path: Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        content = json.loads(path.read_text())
    except ValueError:
        raise BadInput(f"scheduler file {path} is not JSON; delete it and restart the "
                       f"scheduler: rm {path}") from None
    except PermissionError:
        raise BadInput(f"scheduler file {path} is not readable by you; use your own "
                       f"cluster's file") from None
    if not isinstance(content, dict) or not content.get("address"):
        raise BadInput(f"scheduler file {path} has no scheduler address; delete it and "
                       f"restart the scheduler: rm {path}")
    return content


def wait(path: Path, timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` seconds for the file to appear, then read it."""
    path = Path(path).expanduser()
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise BadInput(f"scheduler file {path} did not appear within {timeout:.0f}s; start "
                           f"the scheduler first (hpcdask scheduler --scheduler-file {path}) "
                           f"or raise HPCDASK_SCHEDULER_FILE_TIMEOUT")
        time.sleep(0.2)
    return read(path)


def stale_hint(path: Path) -> str:
    """The sentence to add when the scheduler named in ``path`` does not answer."""
    return (f"the scheduler in {path}{_describe(Path(path))} does not answer; if that job has "
            f"ended, delete the stale file: rm {path}")


def remove_if_ours(path: Path, scheduler_id: str) -> None:
    """Delete the file on shutdown, unless another scheduler has replaced it since."""
    try:
        if json.loads(Path(path).read_text()).get("id") == scheduler_id:
            Path(path).unlink()
    except (OSError, ValueError):
        pass
