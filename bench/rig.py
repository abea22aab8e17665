"""The strict Slurm test cluster (tests/cluster/cluster.sh) as the bench uses it.

The handle is the tests' own ``tests/cluster/fixtures.py: SlurmCluster``: every user command runs
as ``hpcuser`` on the login node (or a compute node) with a login shell's environment. The
cluster instance is the one ``HPCDASK_CLUSTER_INSTANCE`` names, as for the tests. What a run
leaves behind (jobs, files in node-local tmp, processes in the cluster's namespaces) is read
here too.
"""

from __future__ import annotations

import os
import pwd
import re
import sys
import types
from pathlib import Path

from common import REPO

TESTS = REPO / "tests"


class _Anything:
    def __getattr__(self, name):
        return self

    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else self


def _import_fixtures():
    """tests/cluster/fixtures.py (and the test helpers the bench reuses) decorate with pytest;
    the bench runs in the product venv, which has no pytest, and calls only their plain
    functions, so pytest's decorators become no-ops here when pytest is absent."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pytest")
        shim.fixture = _Anything()
        shim.mark = _Anything()
        sys.modules["pytest"] = shim
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from cluster import fixtures

    return fixtures


def connect(image: str):
    """(SlurmCluster handle, started): the running cluster, brought up with IMAGE if down."""
    fx = _import_fixtures()
    was_up = fx._cluster_sh("status", check=False).returncode == 0
    if not was_up:
        fx._cluster_sh("up", image=Path(image))
    return fx.SlurmCluster(fx._exports("env")), not was_up


def down() -> None:
    _import_fixtures()._cluster_sh("down", check=False)


def host_slurm_binds(cluster, mnt: Path) -> tuple[list[str], str]:
    """The host's Slurm commands laid out for the image (binds, submit prefix): the tests' helper."""
    from integration.test_slurm_cluster_helper import host_slurm_in_image

    return host_slurm_in_image(cluster, mnt)


def _netns_inodes(cluster) -> set[int]:
    names = [cluster.login_ns, *(cluster.netns(n) for n in cluster.nodes)]
    return {os.stat(f"/run/netns/{n}").st_ino for n in names if os.path.exists(f"/run/netns/{n}")}


def user_processes(cluster, user: str = "hpcuser") -> list[str]:
    """USER's processes in this cluster's network namespaces (other instances' are not ours)."""
    uid, inodes, found = pwd.getpwnam(user).pw_uid, _netns_inodes(cluster), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if p.stat().st_uid == uid and os.stat(p / "ns" / "net").st_ino in inodes:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{p.name} {cmd.strip()[:120]}")
        except OSError:
            pass
    return found


def user_jobs(cluster) -> list[str]:
    """hpcuser's jobs still pending, running or completing: 'id state name'."""
    out = cluster.run(["squeue", "-h", "-u", cluster.USER, "-t", "PD,R,CG", "-o", "%i %T %j"],
                      check=False).stdout
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def epilog_records(cluster, job_ids) -> list[str]:
    """Files the Epilog found left in these jobs' node-local $TMPDIR."""
    return sorted(k for k in cluster.leftovers() if any(re.search(rf"-job-{j}\.", k)
                                                         for j in job_ids))
