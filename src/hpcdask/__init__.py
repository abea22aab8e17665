"""hpcdask: containerised, reproducible Dask on HPC clusters.

One image built from one lock for the scheduler, the workers and the client; TLS with
per-cluster credentials; jobscripts for Slurm and PBS; dask-ml workloads checked against
single-machine scikit-learn.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hpcdask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"


def client(scheduler_file=None):
    """A Client of the cluster in ``scheduler_file`` (default: ``HPCDASK_SCHEDULER_FILE``, which
    ``hpcdask jupyter`` gives its notebooks): TLS with the cluster's credentials, every role's
    identity checked. It becomes the default client, so ``distributed.get_client()`` returns it.
    The workers import the user's modules from the current folder (a notebook's) too."""
    import os
    from pathlib import Path

    from hpcdask import config, connect, project
    from hpcdask.errors import BadInput

    path = scheduler_file or config.get("scheduler-file")
    if not path:
        raise BadInput("no cluster named: pass hpcdask.client('/path/to/scheduler.json') or set "
                       "HPCDASK_SCHEDULER_FILE (hpcdask jupyter sets it for its notebooks)")
    c = connect.connect(Path(path))
    project.share(c, Path(os.getcwd()))
    return c
