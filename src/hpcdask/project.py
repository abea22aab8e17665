"""The user's own code on every role: the script's folder is ``sys.path[0]``, as with
``python analysis.py``, in the client and on every worker.

A helper module beside the script (``helpers.py``) is what the tutorials' users have; the
client imports it because its folder comes first on ``sys.path``, and the workers import it
from the same folder on the shared filesystem through a worker plugin that every worker,
also one that joins later, runs before its first task.

A node that cannot see that folder (a project in node-local ``/tmp``) cannot run a task that
uses those modules: distributed's worker would fail to unpickle the task in its stream from the
scheduler and hold it forever (the user's call hangs). So when the folder holds modules of the
user's, the client refuses at the start with one line naming the nodes and the fix, and a worker
that joins later without the folder leaves the cluster (one line) before it can take a task.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from hpcdask.errors import BadInput

logger = logging.getLogger("hpcdask.project")


def script_folder(script: Path) -> Path:
    """The folder ``python SCRIPT`` puts first on ``sys.path`` (symlinks resolved, as Python does)."""
    return Path(os.path.realpath(script)).parent


def put_first(folder: str) -> None:
    """``folder`` becomes ``sys.path[0]`` (once)."""
    while folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def modules_in(folder: Path, script: Path | None = None) -> list[str]:
    """The modules ``import`` finds in ``folder`` (``*.py`` and packages), the script aside."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    names = {p.stem for p in entries if p.suffix == ".py" and p.is_file()}
    names |= {p.name for p in entries if (p / "__init__.py").is_file()}
    if script is not None:
        names.discard(Path(script).stem)
    return sorted(n for n in names if n.isidentifier())


def sees(folder: str, modules: list[str]) -> tuple[bool, str]:
    """Run on a role: whether it sees ``modules`` in ``folder``, and its host name."""
    return set(modules) <= set(modules_in(Path(folder))), socket.gethostname()


def _not_shared(folder: str, modules: list[str], where: list[str]) -> str:
    shown = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
    return (f"{folder} holds your modules ({shown}) but {', '.join(where)} cannot see it; keep "
            "the project on the shared filesystem (your home or the cluster folder's "
            "filesystem, not node-local /tmp or $TMPDIR) so every node imports from it")


class ProjectPath(WorkerPlugin):
    """Puts the user's code folder first on a worker's ``sys.path`` before its first task; a
    worker that cannot see it, while it holds the user's modules, leaves the cluster."""

    def __init__(self, folder: str, modules: list[str] | None = None) -> None:
        self.folder = folder
        self.modules = list(modules or [])
        self.name = f"hpcdask-project-path-{folder}"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed's Worker
        if os.path.isdir(self.folder):
            put_first(self.folder)
        if not self.modules or sees(self.folder, self.modules)[0]:
            return
        logger.warning("hpcdask: worker %s leaves: %s", worker.address,
                       _not_shared(self.folder, self.modules, [socket.gethostname()]))
        # Its nanny too (a new worker process would not see the folder either), the way the
        # scheduler ends hpcdask's workers: the nanny stops its worker, then itself.
        worker.loop.add_callback(_leave, worker)


async def _leave(worker) -> None:  # noqa: ANN001 - distributed's Worker
    reason = "hpcdask-project-not-visible"
    if worker.nanny:
        await worker.rpc(worker.nanny).terminate(reply=False, reason=reason)
    else:
        await worker.close(reason=reason)


class SchedulerProjectPath(SchedulerPlugin):
    """The same on the scheduler, which unpickles the task graph (the user's functions in it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.name = f"hpcdask-project-path-{folder}"

    async def start(self, scheduler) -> None:  # noqa: ANN001 - distributed's Scheduler
        if os.path.isdir(self.folder):
            put_first(self.folder)


def share(client, folder: Path, script: Path | None = None) -> None:
    """The scheduler and every worker of ``client``'s cluster, present and future, import from
    ``folder`` too. Raises BadInput, naming the nodes, when ``folder`` holds modules of the
    user's and a role cannot see them (then no worker is told to leave)."""
    modules = modules_in(folder, script)
    client.register_plugin(SchedulerProjectPath(str(folder)))
    if modules:
        blind = []
        ok, host = client.run_on_scheduler(sees, str(folder), modules)
        if not ok:
            blind.append(f"the scheduler ({host})")
        hosts = sorted({h for ok, h in client.run(sees, str(folder), modules).values() if not ok})
        if hosts:
            blind.append(f"the workers on {', '.join(hosts)}")
        if blind:
            raise BadInput(_not_shared(str(folder), modules, blind))
    client.register_plugin(ProjectPath(str(folder), modules))
