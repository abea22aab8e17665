"""The scheduler file: how workers and clients on other nodes find the scheduler.

hpcdask writes it itself (not through ``Scheduler(scheduler_file=...)``) so that it is claimed
exclusively before anything else is written (a claim file beside it: two schedulers never share a
file or its folder's credentials), published whole by a rename with mode 0600 (its path never
holds a file without an address, which the tutorials' ``json.load(...)["address"]`` and
distributed's own readers would fail on), names its job and owner, and a stale one is refused.
Distributed's ``Client(scheduler_file=...)`` and ``dask worker --scheduler-file`` read it
unchanged: the extra ``hpcdask`` block is ignored by them.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hpcdask import batch
from hpcdask.errors import BadInput
from hpcdask.files import atomic_write, private_dir, user_name


def claim_path(path: Path) -> Path:
    """Where the claim on ``path`` lives: beside it, hidden (``.scheduler.json.claim``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.claim")


def claim(path: Path, tls: bool) -> tuple[Path, str]:
    """For a new scheduler: a private folder, and the claim on ``path`` created exclusively.

    The claim is a file of its own beside ``path`` (:func:`claim_path`) holding the stamp (job,
    owner, host, pid, ...): a second scheduler given the same file is refused instead of
    overwriting the first one's file and credentials, and ``path`` itself appears only when
    :func:`write` publishes it whole, so a reader there never finds a file without an address.
    Returns the absolute path and the claim's token, which :func:`write` keeps and
    :func:`remove_if_ours` checks.
    """
    path = Path(path).expanduser().absolute()
    private_dir(path.parent, what="scheduler file folder")
    token = uuid.uuid4().hex
    data = json.dumps({"hpcdask": _stamp(token, tls)}, indent=2) + "\n"
    where = claim_path(path)
    # Written whole beside it, then hard-linked into place: link() creates the name only if it
    # does not exist (atomically, NFS and Lustre included), so a second scheduler finds the first
    # one's complete stamp.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        try:
            os.link(tmp, where)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: create it exclusively, then write
            with os.fdopen(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(data)
    except FileExistsError:
        raise BadInput(f"scheduler file {path} is claimed{_describe(where)}; another scheduler "
                       f"uses it: give this one its own file, or, if that scheduler has ended, "
                       f"delete the stale claim: rm {where} {path}") from None
    finally:
        os.unlink(tmp)
    if path.exists():  # published by a scheduler that left no claim (killed, or an older hpcdask)
        where.unlink()
        raise BadInput(f"scheduler file {path} already exists{_describe(path)}; another "
                       f"scheduler uses it: give this one its own file, or, if that scheduler "
                       f"has ended, delete the stale file: rm {path}")
    return path, token


def _describe(path: Path) -> str:
    try:
        meta = json.loads(path.read_text()).get("hpcdask", {})
    except (OSError, ValueError, AttributeError):
        return ""
    parts = [f"job {meta['job']}" if meta.get("job") else None,
             f"owner {meta['owner']}" if meta.get("owner") else None,
             f"host {meta['host']}" if meta.get("host") else None,
             f"written {meta['created']}" if meta.get("created") else None]
    parts = [p for p in parts if p]
    return f" ({', '.join(parts)})" if parts else ""


def _stamp(token: str, tls: bool) -> dict[str, Any]:
    return {
        "job": batch.job_id(),
        "owner": user_name(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tls": tls,
        "claim": token,
    }


def write(path: Path, identity: dict[str, Any], token: str, tls: bool,
          dashboard_host: str | None = None) -> None:
    """Publish the scheduler's identity and stamp at ``path``, whole (a rename), mode 0600;
    ``dashboard_host``: the address its dashboard listens on (127.0.0.1: this node's loopback)."""
    content = dict(identity)
    content["hpcdask"] = _stamp(token, tls)
    if dashboard_host:
        content["hpcdask"]["dashboard_host"] = dashboard_host
    atomic_write(path, json.dumps(content, indent=2, default=str) + "\n")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise BadInput(f"scheduler file {path} is not JSON; delete it and restart the "
                       f"scheduler: rm {path}") from None
    except PermissionError:
        raise BadInput(f"scheduler file {path} is not readable by you; use your own "
                       f"cluster's file") from None


def read(path: Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    content = _load(path)
    if not isinstance(content, dict) or not content.get("address"):
        raise BadInput(f"scheduler file {path} has no scheduler address; delete it and "
                       f"restart the scheduler: rm {path}")
    return content


def wait(path: Path, timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` seconds for the file to appear with an address, then read it."""
    path = Path(path).expanduser()
    deadline = time.monotonic() + timeout
    while True:
        content = None
        if _exists(path):  # a folder you may not enter fails now
            try:
                content = json.loads(path.read_text())
            except FileNotFoundError:  # removed since: its scheduler ended
                content = None
            except ValueError:  # not (yet) a whole JSON file: the one-line error at the end
                content = _load(path) if time.monotonic() > deadline else {}
            except PermissionError:
                _load(path)  # its one-line error, now
        if isinstance(content, dict) and content.get("address"):
            return content
        if time.monotonic() > deadline:
            claimed = claim_path(path)
            if content is None and claimed.exists():
                raise BadInput(f"the scheduler claimed {path}{_describe(claimed)} but published "
                               f"no address within {timeout:.0f}s; if it has died, delete the "
                               f"stale claim: rm {claimed}")
            if content is None:
                raise BadInput(f"scheduler file {path} did not appear within {timeout:.0f}s; "
                               f"start the scheduler first (hpcdask scheduler --scheduler-file "
                               f"{path}) or raise HPCDASK_SCHEDULER_FILE_TIMEOUT")
            raise BadInput(f"the scheduler claimed {path}{_describe(path)} but published no "
                           f"address within {timeout:.0f}s; if it has died, delete the stale "
                           f"file: rm {path}")
        time.sleep(0.2)


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a folder you may not enter is an error now, not a long wait."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except PermissionError:
        raise BadInput(f"scheduler file {path} is not readable by you (a folder on its way "
                       f"is another user's or private); use your own cluster's file") from None
    return True


def stale_hint(path: Path) -> str:
    """The sentence to add when the scheduler named in ``path`` does not answer."""
    return (f"the scheduler in {path}{_describe(Path(path))} does not answer; if that job has "
            f"ended, delete the stale file: rm {path}")


def _is_ours(path: Path, token: str) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("hpcdask", {}).get("claim") == token
    except (OSError, ValueError, AttributeError):
        return False


def remove_if_ours(path: Path, token: str) -> bool:
    """Unpublish the file on shutdown unless it is not this scheduler's; True if the claim is
    this scheduler's (then its credentials are its own to remove, before :func:`release`)."""
    if _is_ours(path, token):
        Path(path).unlink(missing_ok=True)
    return _is_ours(claim_path(path), token)


def release(path: Path, token: str) -> None:
    """Give up the claim (last: the folder is free for another scheduler once it is gone)."""
    if _is_ours(claim_path(path), token):
        claim_path(path).unlink(missing_ok=True)
