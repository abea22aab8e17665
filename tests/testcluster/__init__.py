"""The test cluster: a strict batch cluster on this one machine, and the image runner its users get.

- ``bin/apptainer``: the bubblewrap stand-in for Apptainer (runs a SIF or a sandbox as Apptainer
  does, unprivileged), first on every cluster user's PATH;
- ``cluster.sh``: the machines (network namespaces, hostnames, node-local /tmp, users), their
  login node and the verbs (up, down, env, login, node, status, deps); the batch system is the
  part that varies: ``BATCH=slurm`` (default) sources ``slurm.sh`` (munged, slurmctld, one slurmd
  per node, config rendered from ``slurm/``);
- ``cluster.py``: the running cluster from Python (no pytest): the tests' fixtures and the bench use it;
- ``fixtures.py``: the pytest fixtures (``image``, ``sif``, ``slurm_cluster``, ``udir``, ``job_env``);
- ``ciguard.py``: in CI a required test that skips fails; ``nobody.py``: run the checkout as nobody;
- ``tests/``: the test cluster's own tests (the runner against Apptainer's behaviour, the CI guard).

Importable as ``testcluster``: pytest puts ``tests/`` on ``sys.path`` (pyproject.toml), the
Makefile writes a ``.pth`` for the bench's venv.
"""
