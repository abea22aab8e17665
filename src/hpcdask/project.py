"""The user's own code on every role: the script's folder is ``sys.path[0]``, as with
``python analysis.py``, in the client and on every worker.

A helper module beside the script (``helpers.py``) is what the tutorials' users have; the
client imports it because its folder comes first on ``sys.path``, and the workers import it
from the same folder on the shared filesystem through a worker plugin that every worker,
also one that joins later, runs before its first task.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

logger = logging.getLogger("hpcdask.project")


def script_folder(script: Path) -> Path:
    """The folder ``python SCRIPT`` puts first on ``sys.path`` (symlinks resolved, as Python does)."""
    return Path(os.path.realpath(script)).parent


def put_first(folder: str) -> None:
    """``folder`` becomes ``sys.path[0]`` (once)."""
    while folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


class ProjectPath(WorkerPlugin):
    """Puts the user's code folder first on a worker's ``sys.path`` before its first task."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.name = f"hpcdask-project-path-{folder}"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed's Worker
        if not os.path.isdir(self.folder):
            # One line, and the import error of the task itself names the module.
            logger.warning("hpcdask: the code folder %s is not visible on worker %s; put your "
                           "project on the shared filesystem (/home or the cluster folder's "
                           "filesystem) so every node sees it", self.folder, worker.address)
            return
        put_first(self.folder)


class SchedulerProjectPath(SchedulerPlugin):
    """The same on the scheduler, which unpickles the task graph (the user's functions in it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.name = f"hpcdask-project-path-{folder}"

    async def start(self, scheduler) -> None:  # noqa: ANN001 - distributed's Scheduler
        if os.path.isdir(self.folder):
            put_first(self.folder)


def share(client, folder: Path) -> None:
    """The scheduler and every worker of ``client``'s cluster, present and future, import from
    ``folder`` too."""
    client.register_plugin(SchedulerProjectPath(str(folder)))
    client.register_plugin(ProjectPath(str(folder)))
