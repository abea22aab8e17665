"""The client role: ``hpcdask client SCRIPT`` (and rank 1 of ``hpcdask mpi``).

A user's script runs as ``__main__`` (as ``python SCRIPT`` would), with a Client of the cluster
already connected and checked (``distributed.get_client()`` returns it), its folder importable
on the scheduler and every worker too, and provenance.json written beside its output.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path

from hpcdask import batch, config, memory, project, provenance, signals
from hpcdask.connect import READY_HINT, connect


def output_folder(name: str) -> Path:
    """Default output: a new folder hpcdask-output/NAME (-jobID inside a batch job), or NAME-2,
    NAME-3, ... when an earlier run has it (provenance.run_folder): reruns never collide."""
    job = batch.job_id()
    return provenance.run_folder(
        Path(config.get("output")) / f"{name}{f'-job{job}' if job else ''}")


def run_script(script: Path, args, scheduler_file: Path, output: Path | None, tls: bool,
               wait_workers: int = 0, wait_timeout: float = 300.0,
               wait_hint: str = READY_HINT) -> None:
    """SCRIPT as ``__main__`` with a connected, identity-checked Client, provenance.json
    written: ``hpcdask client``'s body, also the client rank of ``hpcdask mpi``."""
    claimed = output is None
    output = output or output_folder(script.stem)
    try:
        _run(script, args, scheduler_file, output, tls, wait_workers, wait_timeout, wait_hint)
    except BaseException:
        if claimed:  # a run that ended before it began (refused, not shared) leaves no folder
            with contextlib.suppress(OSError):
                output.rmdir()
        raise


def _run(script, args, scheduler_file, output, tls, wait_workers, wait_timeout,
         wait_hint) -> None:
    from hpcdask import compat

    # Not dask-ml's import (2-4 s in the image) before the script's first line: the patch it
    # needs comes when the script imports dask-ml, if it ever does.
    compat.apply(defer=True)
    folder = project.script_folder(script)
    project.put_first(str(folder))  # as `python SCRIPT`: its helper modules import
    with provenance.Recorder(output, provenance.command_line(), folder) as record, \
            signals.terminate_cleanly(), connect(scheduler_file, tls=tls, wait_workers=wait_workers,
                                                 wait_timeout=wait_timeout,
                                                 wait_hint=wait_hint) as c:
        project.share(c, folder, script)  # and on every worker, from the shared filesystem
        record.cluster(c)  # after: a project no node can import from leaves nothing written
        sys.argv = [str(script), *args]
        with c.as_current(), compat.session(c, defer=True):  # dask-ml works in the script too
            try:
                runpy.run_path(str(script), run_name="__main__")
            except Exception as e:
                hint = memory.killed_hint(e)
                if hint:
                    _after_traceback(hint)
                raise


def _after_traceback(line: str) -> None:
    """Print LINE on stderr right after the traceback Python prints as this process ends."""
    previous = sys.excepthook

    def hook(*exc) -> None:
        previous(*exc)
        print(line, file=sys.stderr)

    sys.excepthook = hook
