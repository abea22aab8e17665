"""The running Slurm test cluster as a library: ``cluster.sh`` driven from Python, and a handle
(:class:`SlurmCluster`) that runs every user command as ``hpcuser`` on the login node or a compute
node. The tests' fixtures (``testcluster.fixtures``) and the bench (``bench/rig.py``) both use it;
it needs no pytest.

There is no slurmdbd (so no ``sacct``): a job's state and exit code come from ``scontrol show job``
(finished jobs stay there for MinJobAge=600 s) and, failing that, from the ``jobcomp/filetxt`` log.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
RUNNER_BIN = HERE / "bin"
REPO = HERE.parents[1]

# States after which a job does not change any more.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class ClusterError(RuntimeError):
    """A cluster command failed; the message holds its output."""


@dataclass
class JobResult:
    """A batch job as submitted, and (when finished) how it ended."""

    job_id: str
    state: str
    exit_code: int | None  # the batch script's exit status (ExitCode=N:S -> N)
    signal: int | None  # the signal that ended it (ExitCode=N:S -> S)
    stdout_path: Path
    stderr_path: Path
    info: dict[str, str] = field(default_factory=dict)  # every Key=Value of the job record

    @property
    def stdout(self) -> str:
        return _read(self.stdout_path)

    @property
    def stderr(self) -> str:
        return _read(self.stderr_path)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def __str__(self) -> str:
        return (
            f"job {self.job_id}: {self.state} exit={self.exit_code}:{self.signal}\n"
            f"--- stdout ({self.stdout_path})\n{self.stdout}\n"
            f"--- stderr ({self.stderr_path})\n{self.stderr}"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _parse_record(text: str) -> dict[str, str]:
    """Key=Value pairs of one `scontrol -o` or jobcomp line (values have no spaces we need)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _split_exit(value: str | None) -> tuple[int | None, int | None]:
    if not value or ":" not in value:
        return None, None
    code, sig = value.split(":", 1)
    return int(code), int(sig)


class SlurmCluster:
    """Handle on the running test cluster.

    Every user-facing command runs as the ordinary user ``hpcuser`` on the login node (its own
    network, hostname and /tmp; eth0 only), with the environment a login shell gets there
    (``cluster.sh userenv``) plus what the test adds: never as root, never with the test runner's
    environment. :meth:`node` runs a command on a compute node; :meth:`as_root` is for inspection.
    """

    USER = "hpcuser"
    OTHER_USER = "otheruser"

    def __init__(self, exports: Mapping[str, str]) -> None:
        self.exports = dict(exports)
        self.conf = Path(self.exports["SLURM_CONF"])
        self.state_dir = Path(self.exports["HPCDASK_CLUSTER_STATE"])
        self.login_ns = self.exports["HPCDASK_CLUSTER_LOGIN"]
        self.prefix = self.login_ns[: -len("login")]
        #: the checkout as every node and the login node see it (read-only)
        self.src = self.state_dir / "src"
        self.user_env = {u: userenv(u) for u in (self.USER, self.OTHER_USER)}
        self.home = Path(self.user_env[self.USER]["HOME"])
        self.workdir = self.mkdtemp("pytest-")
        self.nodes: list[str] = self.run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()
        self.nodes = sorted(set(self.nodes), key=lambda n: (len(n), n))
        #: each node's ib0 (fabric) address; eth_addresses: its eth0 address (as is the login node's)
        self.addresses = {n: self._addr(self.netns(n), "ib0") for n in self.nodes}
        self.eth_addresses = {n: self._addr(self.netns(n), "eth0") for n in self.nodes}
        self.login_address = self._addr(self.login_ns, "eth0")

    @staticmethod
    def _addr(ns: str, ifname: str) -> str:
        out = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", ifname],
                             capture_output=True, text=True, check=True).stdout
        return re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out).group(1)

    # --- files of the user ------------------------------------------------------------------

    def mkdtemp(self, prefix: str = "tmp-", user: str | None = None) -> Path:
        """A new private folder under the user's home (the shared filesystem), owned by the user."""
        user = user or self.USER
        home = Path(self.user_env[user]["HOME"])
        parent = home if user != self.USER or not hasattr(self, "workdir") else self.workdir
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        shutil.chown(path, user, user)
        return path

    def give(self, path: Path, user: str | None = None) -> Path:
        """Hand PATH (made by the test, as root) over to the user."""
        user = user or self.USER
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            shutil.chown(p, user, user)
        return path

    # --- commands ---------------------------------------------------------------------------

    def _argv(self, where: str, user: str | None, cmd: Sequence[str], env: Mapping[str, str] | None,
              cwd: Path | str | None) -> list[str]:
        ns = self.login_ns if where == "login" else self.netns(where)
        holder = (self.state_dir / "run" / f"holder-{where}.pid").read_text().strip()
        argv = ["nsenter", "-t", holder, "--net", "--uts", "--mount", "--wd=/", "--"]
        assert ns  # the holder sits in that network namespace
        if user is None:
            return [*argv, *cmd]
        full = {**self.user_env[user], **(env or {})}
        wd = str(cwd or (self.workdir if user == self.USER else full["HOME"]))
        return [*argv, "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                "--reset-env", "--", "env", "-i", *[f"{k}={v}" for k, v in full.items()],
                "bash", "-c", 'cd "$1" && shift && exec "$@"', "sh", wd, *cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
        cwd: Path | str | None = None,
        user: str | None = USER,
        where: str = "login",
    ) -> subprocess.CompletedProcess[str]:
        """Run CMD as USER (default hpcuser; None: root) on the login node (or node WHERE)."""
        proc = subprocess.run(
            self._argv(where, user, cmd, env, cwd), env=self._root_env(user, env),
            check=False, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{shlex.join(cmd)} (as {user or 'root'} on {where}) exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
            )
        return proc

    def popen(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path | str | None = None, user: str | None = USER, where: str = "login",
              **kwargs) -> subprocess.Popen:
        """Start CMD like :meth:`run`, in the background."""
        return subprocess.Popen(self._argv(where, user, cmd, env, cwd),
                                env=self._root_env(user, env), **kwargs)

    def _root_env(self, user: str | None, env: Mapping[str, str] | None) -> dict[str, str] | None:
        """Root's commands get this process's environment plus the cluster's exports."""
        return None if user else {**os.environ, **self.exports, **(env or {})}

    def node(self, node: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
        """Run CMD on compute node NODE (as root unless user= is given)."""
        kwargs.setdefault("user", None)
        return self.run(cmd, where=node, **kwargs)

    def srun(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """``srun ARGS`` from the login node; keyword arguments as for :meth:`run`."""
        return self.run(["srun", *args], **kwargs)

    def netns(self, node: str) -> str:
        """The network namespace (under /run/netns) that holds NODE (or ``login``)."""
        return f"{self.prefix}{node}"

    def leftovers(self) -> dict[str, str]:
        """What jobs left in their node-local $TMPDIR (the Epilog's records), by file name.

        The bubblewrap runner's own .sif mount points (``rootfs-*``, test infrastructure: a real
        Apptainer mounts elsewhere) are not counted: Slurm's SIGKILL at KillWait can leave them."""
        out = {}
        for p in sorted((self.state_dir / "leftovers").glob("*.txt")):
            lines = [ln for ln in p.read_text().splitlines()
                     if not re.search(r"/rootfs-[^/]+(/root)?$", ln)]
            if lines:
                out[p.name] = "\n".join(lines) + "\n"
        return out

    def node_tmp(self, node: str) -> Path:
        """NODE's own /tmp, as the host sees it."""
        return self.state_dir / "nodes" / node / "tmp"

    def user_files_in_node_tmp(self, user: str | None = None) -> list[str]:
        """Files USER owns in any node's (or the login node's) /tmp and /var/tmp."""
        uid = pwd.getpwnam(user or self.USER).pw_uid
        found = []
        for d in sorted((self.state_dir / "nodes").glob("*/*tmp")):
            for p in d.rglob("*"):
                try:
                    if p.lstat().st_uid == uid:
                        found.append(str(p))
                except OSError:
                    pass
        return found

    def cluster_sh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``tests/testcluster/cluster.sh COMMAND`` (up, down, status, env), with this image."""
        return cluster_sh(command, check=check,
                           image=Path(self.user_env[self.USER]["HPCDASK_IMAGE"]))

    # --- batch jobs -------------------------------------------------------------------------

    def sbatch(
        self,
        script: str | os.PathLike[str],
        *args: str,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 300,
        workdir: Path | str | None = None,
    ) -> JobResult:
        """Submit a batch job and (by default) wait for it to end.

        ``script`` is a path, or the script's text (anything with a newline). ``args`` go to sbatch
        before the script (e.g. ``"-N3", "--time=00:05:00"``). Output goes to ``slurm-<job>.out`` and
        ``.err`` in ``workdir`` (a fresh folder in hpcuser's home unless given) unless ``args``
        name ``-o``/``-e`` themselves. ``env`` is added to the submitting environment, which the job
        inherits (sbatch's ``--export=ALL``); it is submitted by hpcuser from the login node. On ``timeout`` the job is cancelled and TimeoutError
        raised with its outputs.
        """
        wd = Path(workdir) if workdir else self.mkdtemp("job-")
        if isinstance(script, str) and "\n" in script:
            path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=wd)[1])
            path.write_text(script)
            path.chmod(0o755)
            self.give(path)
        else:
            path = Path(script)
        opts = list(args)
        flat = " ".join(opts)
        if not re.search(r"(^|\s)(-o|--output)(\s|=)", flat):
            opts.append(f"--output={wd}/slurm-%j.out")
        if not re.search(r"(^|\s)(-e|--error)(\s|=)", flat):
            opts.append(f"--error={wd}/slurm-%j.err")
        out = self.run(["sbatch", "--parsable", *opts, str(path)], env=env, cwd=wd).stdout
        job_id = out.strip().split(";")[0]
        if not wait:
            return self.job(job_id, workdir=wd)
        return self.wait(job_id, timeout=timeout, workdir=wd)

    def job(self, job_id: str, *, workdir: Path | str | None = None) -> JobResult:
        """The job as the controller (or, once forgotten there, the jobcomp log) knows it."""
        proc = self.run(["scontrol", "-o", "show", "job", job_id], check=False, user=None)
        info = _parse_record(proc.stdout) if proc.returncode == 0 else {}
        if not info:
            info = self._jobcomp(job_id)
        if not info:
            raise ClusterError(f"job {job_id} unknown to scontrol and {self.state_dir}/jobcomp.txt")
        state = info.get("JobState", "UNKNOWN")
        code, sig = _split_exit(info.get("ExitCode"))
        wd = Path(workdir or info.get("WorkDir") or self.workdir)
        out = info.get("StdOut") or str(wd / f"slurm-{job_id}.out")
        err = info.get("StdErr") or str(wd / f"slurm-{job_id}.err")
        return JobResult(job_id, state, code, sig, Path(out), Path(err), info)

    def wait(
        self, job_id: str, *, timeout: float = 300, workdir: Path | str | None = None
    ) -> JobResult:
        """Poll until the job is in a final state; cancel it and raise TimeoutError after timeout.
        Every 0.2-0.5 s (a scontrol call costs 9 ms): the time a job took, not the poll's period."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            res = self.job(job_id, workdir=workdir)
            if res.finished:
                # The jobcomp record is written as the job ends: prefer it for the exit code.
                comp = self._jobcomp(job_id)
                if comp.get("ExitCode"):
                    res.exit_code, res.signal = _split_exit(comp["ExitCode"])
                return res
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False, user=None)
                raise TimeoutError(f"job {job_id} not finished after {timeout} s\n{res}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _jobcomp(self, job_id: str) -> dict[str, str]:
        try:
            lines = (self.state_dir / "jobcomp.txt").read_text().splitlines()
        except FileNotFoundError:
            return {}
        for line in reversed(lines):
            if line.startswith(f"JobId={job_id} "):
                return _parse_record(line)
        return {}


def cluster_sh(command: str, *, check: bool = True,
                image: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"HPCDASK_IMAGE": str(image)} if image else {})}
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), command],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and proc.returncode != 0:
        raise ClusterError(
            f"cluster.sh {command} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
        )
    return proc


def exports(command: str = "env", *args: str) -> dict[str, str]:
    proc = subprocess.run(["bash", str(CLUSTER_SH), command, *args], check=True,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    out = {}
    for line in proc.stdout.splitlines():
        if command == "env" and line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
        elif command == "userenv" and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def cluster_env() -> dict[str, str]:
    """os.environ plus what ``cluster.sh env`` exports (for root on the host: SLURM_CONF, PATH, ...)."""
    return {**os.environ, **exports("env")}


def userenv(user: str) -> dict[str, str]:
    """The environment USER's login shell gets on the cluster (``cluster.sh userenv``)."""
    return exports("userenv", user)


# The host's Slurm commands inside the image (the image has none), as a site would bind them.
SLURM_LIBS = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm")


def host_slurm_in_image(slurm_cluster, mnt: Path) -> tuple[list[str], str]:
    """Lay out the host's Slurm for the image under MNT (bound at /mnt): the binds and prefix."""
    assert SLURM_LIBS.is_dir(), f"{SLURM_LIBS} missing: the host's Slurm is not Debian's slurm-wlm"
    conf = slurm_cluster.conf.read_text()
    m = re.search(r"^AuthInfo=.*socket=([^,\s]+)", conf, re.MULTILINE)
    assert m, f"no munge socket in {slurm_cluster.conf} (AuthInfo=socket=...)"
    munge = Path(m.group(1)).parent
    host = mnt / "host"
    for d in (host / "usr", host / "munge", mnt / "cluster"):
        d.mkdir(parents=True)
    # The cluster's slurm.conf as seen from inside the image: plugins and munge socket under /mnt.
    conf = re.sub(r"^PluginDir=.*\n", "", conf, flags=re.MULTILINE)
    conf = re.sub(r"^AuthInfo=.*$", "AuthInfo=socket=/mnt/host/munge/" + Path(m.group(1)).name,
                  conf, flags=re.MULTILINE)
    (host / "slurm.conf").write_text(
        f"PluginDir=/mnt/host/usr/lib/x86_64-linux-gnu/slurm-wlm\n{conf}")
    binds = [f"{mnt}:/mnt", "/usr:/mnt/host/usr:ro", f"{munge}:/mnt/host/munge",
             f"{slurm_cluster.src / 'tests' / 'testcluster'}:/mnt/cluster:ro"]
    return binds, "/mnt/cluster/jobqueue_slurm.sh"
