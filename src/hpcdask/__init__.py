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
