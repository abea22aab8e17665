"""What every bench section shares: logging, Skip, child processes, paths, paired ratios."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stats

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = Path(sys.prefix)
HPCDASK = VENV / "bin" / "hpcdask"
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"bench [{time.perf_counter() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A section (or part) cannot run here; the message says why."""


def ok(xs):
    return [x for x in xs if x == x]  # drop NaN (a failed repetition)


def pair(a_runs, b_runs, key):
    """Paired ratios a[i][key] / b[i][key] over the repetitions where both succeeded."""
    pairs = [(x[key], y[key]) for x, y in zip(a_runs, b_runs)
             if x.get(key) == x.get(key) and y.get(key) == y.get(key)
             and x.get(key) is not None and y.get(key) is not None]
    return stats.paired_ratios([p[0] for p in pairs], [p[1] for p in pairs])


def env_clean() -> dict[str, str]:
    """This environment without hpcdask/Dask settings, so every variant runs the defaults."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("HPCDASK_", "DASK_")) or k == "HPCDASK_TEST_CACHE"}


def spawn(cmd, logfile: Path, env=None, netns: str | None = None, cwd=None) -> subprocess.Popen:
    """A child in its own session (so it and its children stop together), output to logfile."""
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    f = open(logfile, "ab")
    try:
        return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env or env_clean(), cwd=cwd)
    finally:
        f.close()


def stop(procs, timeout: float = 20) -> None:
    """SIGTERM each child's process group (ours: start_new_session), SIGKILL what is left."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        # leftovers of a group whose leader is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in lines[-n:])


def wait_file(path: Path, procs, timeout: float, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what} exited {p.returncode} before writing {path.name}: "
                                   f"{tail(logfile)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} wrote no {path.name} within {timeout}s: {tail(logfile)}")
        time.sleep(0.02)


def private_dir(parent: Path, prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    d.chmod(0o700)
    return d


def pickle_by_value(*modules) -> None:
    """Functions of these bench modules reach the scheduler and workers by value (cloudpickle):
    the roles run without the bench's folder on their path."""
    import cloudpickle

    for m in modules:
        cloudpickle.register_pickle_by_value(m)
