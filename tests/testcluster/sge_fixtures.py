"""The session's Grid Engine test cluster (``BATCH=sge tests/testcluster/cluster.sh``) as a fixture.

It shares the Slurm cluster's core (machines, users, image, mounts; ``fixtures.SlurmCluster``'s
commands as hpcuser on the login node) and differs in the batch system: jobs are submitted with
``qsub`` and end in ``qacct``'s record (accounting is flushed at once on the test cluster).
The Grid Engine cluster has names and subnets of its own (hpcs*), so it runs beside the same
instance's Slurm cluster in one session. Like ``slurm_cluster`` it fails loudly, never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from testcluster.cluster import CLUSTER_SH, ClusterError, JobResult, SlurmCluster

SGE = {"HPCDASK_CLUSTER_BATCH": "sge"}


def _sge_sh(*args: str, check: bool = True, image: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SGE, **({"HPCDASK_IMAGE": str(image)} if image else {})}
    proc = subprocess.run(["bash", str(CLUSTER_SH), *args], check=False, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    if check and proc.returncode != 0:
        raise ClusterError(f"BATCH=sge cluster.sh {' '.join(args)} exited {proc.returncode}\n"
                           f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    return proc


def _pairs(text: str, sep: str = "=") -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            line = line[len("export "):]
        key, eq, value = line.partition(sep)
        if eq:
            out[key] = value.strip().strip("'")
    return out


class GridEngineCluster(SlurmCluster):
    """Handle on the running Grid Engine test cluster: :meth:`run` and friends as for Slurm;
    :meth:`qsub`, :meth:`job` and :meth:`wait` speak Grid Engine."""

    def __init__(self, exports: Mapping[str, str]) -> None:
        self.exports = dict(exports)
        self.state_dir = Path(self.exports["HPCDASK_CLUSTER_STATE"])
        self.login_ns = self.exports["HPCDASK_CLUSTER_LOGIN"]
        self.prefix = self.login_ns[: -len("login")]
        self.src = self.state_dir / "src"
        self.user_env = {u: _pairs(_sge_sh("userenv", u).stdout) for u in (self.USER, self.OTHER_USER)}
        self.home = Path(self.user_env[self.USER]["HOME"])
        self.workdir = self.mkdtemp("pytest-")
        hosts = self.run(["qhost"]).stdout.splitlines()[3:]
        self.nodes = sorted((h.split()[0] for h in hosts if re.match(r"node\d+ ", h)),
                            key=lambda n: (len(n), n))
        self.addresses = {n: self._addr(self.netns(n), "ib0") for n in self.nodes}
        self.eth_addresses = {n: self._addr(self.netns(n), "eth0") for n in self.nodes}
        self.login_address = self._addr(self.login_ns, "eth0")

    def cluster_sh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sge_sh(command, check=check, image=Path(self.user_env[self.USER]["HPCDASK_IMAGE"]))

    def admin(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """CMD as root on the master (the qmaster host is the admin host), e.g. ``qconf -sc``."""
        holder = (self.state_dir / "run" / "holder-master.pid").read_text().strip()
        env = [f"{k}={self.user_env[self.USER][k]}" for k in
               ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT")]
        proc = subprocess.run(["nsenter", "-t", holder, "--net", "--uts", "--mount", "env", *env,
                               *cmd], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} on the master exited {proc.returncode}\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def client_in_image(self, mnt: Path) -> tuple[list[str], str, dict[str, str]]:
        """Grid Engine's clients inside the image (which has none), as a site binds them: the
        host's /usr read-only at MNT/host/usr, links to the host libraries qsub needs (not its
        libc) in MNT/host/gelibs, the cell at its own path. The binds for ``apptainer exec``
        (MNT at /mnt), the submit prefix (tests/testcluster/jobqueue_sge.sh) and the environment."""
        libs = mnt / "host" / "gelibs"
        for d in (mnt / "host" / "usr", libs, mnt / "cluster"):
            d.mkdir(parents=True)
        self.give(mnt)  # before the links: chown follows them
        glibc = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "libresolv.so", "librt.so")
        for cmd in ("qsub", "qdel", "qstat"):
            out = subprocess.run(["ldd", f"/usr/lib/gridengine/{cmd}"], capture_output=True,
                                 text=True, check=True).stdout
            for name, path in re.findall(r"^\s*(\S+) => (/\S+)", out, re.M):
                if not name.startswith(glibc) and not (libs / name).is_symlink():
                    real = Path(path).resolve()  # /lib is /usr/lib (merged /usr)
                    (libs / name).symlink_to(Path("/mnt/host") / real.relative_to("/"))
        assert (libs / "libmunge.so.2").is_symlink(), sorted(p.name for p in libs.iterdir())
        env = {k: self.user_env[self.USER][k] for k in
               ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT")}
        cell = Path(env["SGE_ROOT"]).parent  # the root's links and the cell, read-only
        binds = [f"{mnt}:/mnt", "/usr:/mnt/host/usr:ro", f"{cell}:{cell}:ro",
                 f"{self.src / 'tests' / 'testcluster'}:/mnt/cluster:ro"]
        return binds, "/mnt/cluster/jobqueue_sge.sh", env

    def qsub(self, *args: str, env: Mapping[str, str] | None = None, wait: bool = True,
             timeout: float = 300, workdir: Path | str | None = None,
             user: str | None = None) -> JobResult:
        """``qsub -terse -o WORKDIR -j y ARGS`` as hpcuser from the login node (ARGS end with the
        script or, with ``-b y``, the command). Array jobs: the ID is the job's, without tasks."""
        wd = Path(workdir) if workdir else self.mkdtemp("job-")
        out = self.run(["qsub", "-terse", "-o", str(wd), "-j", "y", *args], env=env, cwd=wd,
                       user=user or self.USER).stdout
        job_id = out.strip().split(".")[0]
        return self.wait(job_id, timeout=timeout, workdir=wd) if wait else self.job(job_id, workdir=wd)

    def job(self, job_id: str, *, workdir: Path | str | None = None, task: int | None = None) -> JobResult:
        """The job (or array TASK) as qstat (pending/running) or qacct (finished) knows it."""
        wd = Path(workdir or self.workdir)
        out = list(wd.glob(f"*.o{job_id}" + (f".{task}" if task else "")))
        path = out[0] if out else wd / f"job.o{job_id}"
        live = self.run(["qstat", "-j", job_id], check=False, user=None)
        if live.returncode == 0:
            return JobResult(job_id, "RUNNING", None, None, path, wd / "none", _pairs(live.stdout, ":"))
        acct = self.run(["qacct", "-j", job_id, *(["-t", str(task)] if task else [])], check=False, user=None)
        if acct.returncode != 0:
            return JobResult(job_id, "UNKNOWN", None, None, path, wd / "none", {})
        # One record per task: the worst exit status is the array's.
        recs = [dict(re.findall(r"^(\w+)\s+(.*?)\s*$", r, re.M)) for r in acct.stdout.split("=" * 10) if r.strip()]
        recs = [r for r in recs if "exit_status" in r]
        code = max(int(r["exit_status"].split()[0]) for r in recs)  # e.g. "137  (Killed)"
        failed = [r["failed"] for r in recs if not r["failed"].startswith("0")]
        state = "FAILED" if failed or code else "COMPLETED"
        return JobResult(job_id, state, code, None, path, wd / "none",
                         {**recs[-1], "failed": "; ".join(failed), "tasks": str(len(recs))})

    def wait(self, job_id: str, *, timeout: float = 300, workdir: Path | str | None = None) -> JobResult:
        deadline = time.monotonic() + timeout
        while True:
            res = self.job(job_id, workdir=workdir)
            if res.state in ("COMPLETED", "FAILED"):
                return res
            if time.monotonic() > deadline:
                self.run(["qdel", job_id], check=False, user=None)
                raise TimeoutError(f"job {job_id} not finished after {timeout} s\n{res}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def sge_cluster(sif: Path) -> Iterator[GridEngineCluster]:
    """The running Grid Engine test cluster (started once per session, stopped at its end)."""
    was_up = _sge_sh("status", check=False).returncode == 0
    try:
        up = _sge_sh("up", image=sif)
    except (ClusterError, subprocess.TimeoutExpired, OSError) as exc:
        _sge_sh("down", check=False)
        pytest.fail(f"the Grid Engine test cluster did not start:\n{exc}", pytrace=False)
    print(up.stderr, end="")
    try:
        cluster = GridEngineCluster(_pairs(_sge_sh("env").stdout))
        yield cluster
    finally:
        if "cluster" in locals():
            shutil.rmtree(cluster.workdir, ignore_errors=True)
        if not was_up and os.environ.get("HPCDASK_CLUSTER_KEEP") != "1":
            _sge_sh("down", check=False)


@pytest.fixture
def sge_udir(sge_cluster) -> Path:
    """A new folder of hpcuser's in its home: a job's working directory."""
    return sge_cluster.mkdtemp("t-")


@pytest.fixture
def sge_env(sge_cluster, sif) -> dict[str, str]:
    """The image and a private shared folder for the cluster folders (checked empty after)."""
    return {"HPCDASK_IMAGE": str(sif), "HPCDASK_SHARED_DIR": str(sge_cluster.mkdtemp("clusters-"))}
