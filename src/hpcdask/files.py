"""Files written whole or not at all, private folders, and the roles' node-local scratch."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import tempfile
from pathlib import Path

from hpcdask import config
from hpcdask.errors import BadInput


def user_name() -> str:
    """This process's user name, or ``uid N`` for a user without one: a container run as an
    arbitrary uid (docker compose's HPCDASK_UID) has no passwd entry, where getpass.getuser()
    raises KeyError."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    """Write ``data`` to a temp file beside ``path`` with ``mode``, then rename it into place."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def private_dir(folder: Path, what: str) -> Path:
    """Create ``folder`` (mode 0700) if needed, or check an existing one is private and writable."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create the {what} {folder} ({e.strerror}); pick a folder you can "
                       f"write on the shared filesystem, e.g. under $HOME") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"the {what} {folder} is not writable; pick a folder you can write on the "
                       f"shared filesystem, e.g. under $HOME")
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077:
        raise BadInput(f"the {what} {folder} has mode {mode:04o}, open to others; the cluster's "
                       f"credentials need a private folder: chmod 700 {folder}, or use a folder of "
                       f"its own, e.g. --scheduler-file ~/.hpcdask/clusters/NAME/scheduler.json")
    return folder


def local_directory(given: str | None) -> str:
    """Worker scratch: given, configured, $TMPDIR, else /tmp; must be writable (never the image)."""
    d = given or config.get("local-directory") or os.environ.get("TMPDIR") or "/tmp"
    p = Path(d).expanduser()
    if not p.is_dir():
        raise BadInput(f"local directory {p} does not exist; create it or pick another with "
                       f"--local-directory (e.g. $TMPDIR or /tmp)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise BadInput(f"local directory {p} is not writable (a read-only image?); pick another "
                       f"with --local-directory (e.g. $TMPDIR or /tmp)")
    return str(p)


@contextlib.contextmanager
def scratch(parent: str):
    """A private folder of this process's workers inside ``parent`` (node-local $TMPDIR or /tmp),
    removed whole when they end: distributed leaves its workspace's lock files behind, and
    ``parent`` may be shared with other jobs and users."""
    d = tempfile.mkdtemp(prefix="hpcdask-", dir=parent)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
