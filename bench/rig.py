"""The strict Slurm test cluster (tests/testcluster/cluster.sh) as the bench uses it.

The handle is the test-cluster package's ``testcluster.cluster.SlurmCluster`` (tests/testcluster,
importable in the bench's venv through the .pth ``make bench`` writes): every user command runs
as ``hpcuser`` on the login node (or a compute node) with a login shell's environment. The
cluster instance is the one ``HPCDASK_CLUSTER_INSTANCE`` names, as for the tests. What a run
leaves behind (jobs, files in node-local tmp, processes in the cluster's namespaces) is read
here too.
"""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

from testcluster.cluster import (  # noqa: F401  (FINAL_STATES: for peers.py)
    FINAL_STATES, SlurmCluster, cluster_sh, exports, host_slurm_in_image)


def connect(image: str):
    """(SlurmCluster handle, started): the running cluster, brought up with IMAGE if down."""
    was_up = cluster_sh("status", check=False).returncode == 0
    if not was_up:
        cluster_sh("up", image=Path(image))
    return SlurmCluster(exports("env")), not was_up


def down() -> None:
    cluster_sh("down", check=False)


def host_slurm_binds(cluster, mnt: Path) -> tuple[list[str], str]:
    """The host's Slurm commands laid out for the image (binds, submit prefix): the test cluster's helper."""
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
