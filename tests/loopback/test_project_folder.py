"""A project folder a node cannot see (issue 31 item 1): real roles on loopback, the "other
node" a worker whose mount namespace hides the folder (bubblewrap, a tmpfs over it), as a
compute node does not see a project kept in the login node's /tmp.

Without hpcdask's check the user's call hangs: the worker fails to unpickle the task in its
stream from the scheduler and holds it forever. Here: the client refuses at the start with one
line naming the module, the node and the fix (exit 2, nothing written); a worker that joins later
without the folder leaves before it takes a task; a folder holding only the script is no
reason to refuse.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_roles import HPCDASK, start, stop, wait_workers

pytestmark = pytest.mark.timeout(300)

MYMOD = "def f(x):\n    return x + 1\n"
MAIN = """\
import sys, time
from pathlib import Path
import dask.bag as db
import distributed
import mymod
client = distributed.get_client()
print("READY", flush=True)
go = Path(sys.argv[1]) if len(sys.argv) > 1 else None
while go is not None and not go.exists():
    time.sleep(0.1)
print("RESULT", db.from_sequence(range(4), npartitions=2).map(mymod.f).compute(), flush=True)
print("WORKERS", len(client.scheduler_info()["workers"]), flush=True)
"""


@pytest.fixture
def scheduler(tmp_path):
    d = tmp_path / "cluster"
    path = d / "scheduler.json"
    proc = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                  "--dashboard", "off"], tmp_path / "scheduler.log")
    deadline = time.time() + 60
    try:
        while not path.exists():
            assert proc.poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.time() < deadline, "no scheduler file"
            time.sleep(0.1)
        yield path
    finally:
        stop(proc)


def _worker(path: Path, log: Path, hide: Path | None = None) -> subprocess.Popen:
    args = ["worker", "--scheduler-file", str(path), "--interface", "lo", "--nworkers", "1",
            "--nthreads", "1", "--memory-limit", "1GiB"]
    if hide is None:
        return start(args, log)
    bwrap = shutil.which("bwrap")
    assert bwrap, "bwrap is missing: apt-get install bubblewrap (tests/setup-host.sh)"
    with log.open("w") as out:
        return subprocess.Popen([bwrap, "--dev-bind", "/", "/", "--tmpfs", str(hide),
                                 "--die-with-parent", *HPCDASK, *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _project(tmp_path: Path, helper: bool = True) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "main.py").write_text(MAIN if helper else MAIN.replace("import mymod\n", "").replace(
        "map(mymod.f)", "map(abs)"))
    if helper:
        (proj / "mymod.py").write_text(MYMOD)
    return proj


def _argv(path: Path, *args: str) -> list[str]:
    return [*HPCDASK, "client", "main.py", "--scheduler-file", str(path), *args]


def _client(path: Path, proj: Path) -> subprocess.CompletedProcess:
    # Killed at the timeout: without the check, this client hung.
    return subprocess.run(_argv(path), cwd=proj, capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_project_a_worker_cannot_see_is_one_line_exit_2_nothing_written(scheduler, tmp_path):
    proj = _project(tmp_path)
    blind = _worker(scheduler, tmp_path / "blind.log", hide=proj)
    try:
        wait_workers(scheduler, 1)
        client = _client(scheduler, proj)
        out, err = client.stdout, client.stderr
        assert client.returncode == 2, out + err
        assert err.splitlines() == [
            f"hpcdask: error: {proj} holds your modules (mymod) but the workers on "
            f"{_hostname()} cannot see it; keep the project on the shared filesystem (your home "
            "or the cluster folder's filesystem, not node-local /tmp or $TMPDIR) so every node "
            "imports from it"], err
        assert sorted(p.name for p in proj.rglob("*") if not p.is_dir()) == ["main.py", "mymod.py"]
        assert not (proj / "hpcdask-output" / "main").exists()  # its claimed folder: gone
        # Refused before the worker was told anything: it stays in the cluster.
        assert blind.poll() is None, (tmp_path / "blind.log").read_text()
    finally:
        stop(blind)


def test_a_later_worker_that_cannot_see_it_leaves_and_the_result_is_right(scheduler, tmp_path):
    proj = _project(tmp_path)
    go = tmp_path / "go"
    seeing = _worker(scheduler, tmp_path / "worker.log")
    blind = client = None
    try:
        wait_workers(scheduler, 1)
        client = subprocess.Popen(_argv(scheduler, str(go)), cwd=proj, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert client.stdout.readline().strip() == "READY", client.stderr.read()
        blind = _worker(scheduler, tmp_path / "blind.log", hide=proj)
        code = blind.wait(timeout=120)
        log = (tmp_path / "blind.log").read_text()
        leaves = [ln for ln in log.splitlines() if "hpcdask: worker " in ln and " leaves: " in ln]
        assert len(leaves) == 1 and f"{proj} holds your modules (mymod)" in leaves[0], log
        assert "Traceback" not in log, log
        assert code == 0, log
        go.touch()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, out + err
        assert "RESULT [1, 2, 3, 4]" in out and "WORKERS 1" in out, out + err
    finally:
        for proc in (client, blind, seeing):
            if proc is not None:
                stop(proc)
        if client is not None:
            client.stdout.close()
            client.stderr.close()


def test_a_folder_holding_only_the_script_is_no_reason_to_refuse(scheduler, tmp_path):
    proj = _project(tmp_path, helper=False)
    blind = _worker(scheduler, tmp_path / "blind.log", hide=proj)
    try:
        wait_workers(scheduler, 1)
        client = _client(scheduler, proj)
        assert client.returncode == 0 and "RESULT [0, 1, 2, 3]" in client.stdout, client.stderr
    finally:
        stop(blind)


def _hostname() -> str:
    import socket
    return socket.gethostname()
