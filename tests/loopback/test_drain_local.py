"""Drain on signal (issue 23) with the real roles on loopback: a TLS scheduler and `hpcdask worker`
processes started by the CLI; a signal to one worker process hands its results to the other, and
a warning signal to the scheduler ends a client's work in order. The Slurm versions (jobscripts,
scancel, preemption) are in test_slurm_drain.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdask import connect

HPCDASK = [sys.executable, "-m", "hpcdask"]
pytestmark = pytest.mark.timeout(300)

# A client that persists 40 tasks, each appending one line to MARKS per execution, and then
# waits for a file (GO) before it gathers them: the test signals a worker in between.
PERSIST = r'''
import os, sys, time
import distributed
import numpy as np

marks, go, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = distributed.get_client()

def block(i):
    with open(marks, "a") as f:
        f.write(f"{i}\n")
    return np.full(size // 8, i, dtype="f8")

futs = client.map(block, range(40), pure=False)
distributed.wait(futs)
print("HELD", {w: len(k) for w, k in client.has_what().items()}, flush=True)
while not os.path.exists(go):
    time.sleep(0.1)
# Summed where they are (a login node's client reaches the workers only through the scheduler).
total = sum(client.gather(client.map(lambda x: float(x.sum()), futs)))
print(f"SUM {total:.0f} EXPECTED {sum(i * (size // 8) for i in range(40))}", flush=True)
'''


def start(args, log: Path, env=None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([*HPCDASK, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout=60) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise


def kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def wait_for(path: Path, text: str, proc: subprocess.Popen | None = None, timeout=120) -> str:
    deadline = time.time() + timeout
    while True:
        out = path.read_text() if path.exists() else ""
        if text in out:
            return out
        assert proc is None or proc.poll() is None, out
        assert time.time() < deadline, f"no {text!r} in {path}:\n{out}"
        time.sleep(0.1)


def scheduler(tmp: Path) -> tuple[subprocess.Popen, Path]:
    path = tmp / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp / "s.log")
    deadline = time.time() + 60
    while not path.exists():
        assert sched.poll() is None and time.time() < deadline, (tmp / "s.log").read_text()
        time.sleep(0.1)
    return sched, path


def worker(path: Path, log: Path, name: str, env=None) -> subprocess.Popen:
    return start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                  "--memory-limit", "600MiB", "--name", name], log, env)


def no_noise(*logs: Path) -> None:
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text and " - ERROR - " not in text, (log, text)


def run_persist(tmp: Path, path: Path, size: int) -> subprocess.Popen:
    """The PERSIST client; its output in tmp/client.out and client.err, its lines in marks.txt."""
    (tmp / "persist.py").write_text(PERSIST)
    with (tmp / "client.out").open("w") as out, (tmp / "client.err").open("w") as err:
        return subprocess.Popen([*HPCDASK, "client", "--scheduler-file", str(path), "--",
                                 "persist.py", str(tmp / "marks.txt"), str(tmp / "go"), str(size)],
                                cwd=tmp, stdout=out, stderr=err, start_new_session=True)


def held_by(out: str) -> dict:
    return eval(out.split("HELD ", 1)[1].splitlines()[0])  # noqa: S307 - our own dict


def sum_is_right(tmp: Path) -> bool:
    out = (tmp / "client.out").read_text()
    total, _, expected = out.split("SUM ", 1)[1].split()[:3]
    return total == expected


def lines(tmp: Path) -> int:
    return len((tmp / "marks.txt").read_text().splitlines())


def two_workers(tmp: Path, env=None):
    sched, path = scheduler(tmp)
    a = worker(path, tmp / "a.log", "a", env)
    b = worker(path, tmp / "b.log", "b", env)
    with connect.connect(path, check=False) as c:
        c.wait_for_workers(2, timeout=60)
    return sched, path, a, b


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signalled_worker_hands_its_results_over_and_nothing_is_recomputed(tmp_path, sig):
    sched, path, a, b = two_workers(tmp_path)
    client = run_persist(tmp_path, path, 1_000_000)
    try:
        held = held_by(wait_for(tmp_path / "client.out", "HELD", client))
        assert len(held) == 2 and all(held.values()), held  # both hold results
        os.killpg(a.pid, sig)  # as a batch system: every process of the step
        assert finish(a) == 0
        (tmp_path / "go").touch()
        assert finish(client, 120) == 0, (tmp_path / "client.err").read_text()
    finally:
        kill(client, a, b, sched)
    assert sum_is_right(tmp_path), (tmp_path / "client.out").read_text()
    assert lines(tmp_path) == 40  # nothing recomputed
    log = (tmp_path / "a.log").read_text()
    assert f"stopping ({sig.name})" in log and " drained in " in log, log
    assert "could not drain" not in log, log
    no_noise(tmp_path / "a.log", tmp_path / "b.log", tmp_path / "s.log")


def test_a_drained_workers_nanny_is_forgotten_not_taken_for_a_restarting_one(tmp_path):
    """A worker command that drained on SIGTERM leaves in order, its nanny with it: the scheduler
    neither waits for that nanny as a restarting one nor asks it to stop at its end (under Compose
    its container is gone by then); the other worker's nanny stays known."""
    def _guard_view(dask_scheduler):  # defined here: sent to the scheduler by value
        from hpcdask.guard import IdentityGuard

        g = next(p for p in dask_scheduler.plugins.values() if isinstance(p, IdentityGuard))
        return sorted(g.nannies), sorted(g.restarting)

    sched, path, a, b = two_workers(tmp_path)
    try:
        with connect.connect(path, check=False) as c:
            nanny = {info["name"]: info["nanny"]
                     for info in c.scheduler_info()["workers"].values()}
            assert sorted(c.run_on_scheduler(_guard_view)[0]) == sorted(nanny.values())
            os.killpg(a.pid, signal.SIGTERM)
            assert finish(a) == 0
            deadline = time.time() + 30
            while len(c.scheduler_info()["workers"]) != 1:
                assert time.time() < deadline, c.scheduler_info()["workers"]
                time.sleep(0.1)
            assert tuple(c.run_on_scheduler(_guard_view)) == ([nanny["b"]], [])
    finally:
        kill(a, b, sched)
    assert " drained in " in (tmp_path / "a.log").read_text()
    no_noise(tmp_path / "a.log", tmp_path / "b.log", tmp_path / "s.log")


def test_a_worker_with_nowhere_to_drain_says_what_was_lost_and_it_is_recomputed(tmp_path):
    sched, path = scheduler(tmp_path)
    a = worker(path, tmp_path / "a.log", "a")
    client = b = None
    try:
        client = run_persist(tmp_path, path, 1_000_000)
        held = held_by(wait_for(tmp_path / "client.out", "HELD", client))
        assert list(held.values()) == [40], held
        os.killpg(a.pid, signal.SIGTERM)  # as a batch system: every process of the step
        assert finish(a) == 0
        b = worker(path, tmp_path / "b.log", "b")  # a new worker job
        (tmp_path / "go").touch()
        assert finish(client, 120) == 0, (tmp_path / "client.err").read_text()
    finally:
        kill(*(p for p in (client, a, b, sched) if p))
    assert sum_is_right(tmp_path), (tmp_path / "client.out").read_text()
    assert lines(tmp_path) == 80  # all 40 recomputed on the new worker
    log = (tmp_path / "a.log").read_text()
    said = [ln for ln in log.splitlines() if "could not drain" in ln]
    assert len(said) == 1, log
    assert "40 key(s), 38.15 MiB left (no other worker could take them)" in said[0], log
    no_noise(tmp_path / "a.log", tmp_path / "s.log")


def test_a_drain_that_times_out_says_so_in_one_line_and_exits(tmp_path):
    # 1 ms: no retirement (round trips, then 20 MB replicated) finishes in it.
    sched, path, a, b = two_workers(tmp_path, {"HPCDASK_DRAIN_TIMEOUT": "1ms"})
    client = run_persist(tmp_path, path, 1_000_000)
    try:
        held_by(wait_for(tmp_path / "client.out", "HELD", client))
        os.killpg(a.pid, signal.SIGTERM)  # as a batch system: every process of the step
        t0 = time.monotonic()
        assert finish(a) == 0
        took = time.monotonic() - t0
        (tmp_path / "go").touch()
        assert finish(client, 120) == 0, (tmp_path / "client.err").read_text()
    finally:
        kill(client, a, b, sched)
    assert sum_is_right(tmp_path)
    log = (tmp_path / "a.log").read_text()
    said = [ln for ln in log.splitlines() if "could not drain" in ln]
    assert len(said) == 1 and "(the drain timeout (0.001s) passed)" in said[0], log
    assert took < 25, took  # inside Slurm's default KillWait (30 s), with room for the close
    no_noise(tmp_path / "a.log", tmp_path / "s.log")


LONG_CLIENT = """
import time, distributed
c = distributed.get_client()
print("STARTED", flush=True)
for _ in range(3000):
    c.submit(time.sleep, 0.1, pure=False).result()
"""


def test_a_warned_scheduler_ends_the_clients_work_in_one_line(tmp_path):
    sched, path = scheduler(tmp_path)
    a = worker(path, tmp_path / "a.log", "a")
    with connect.connect(path, check=False) as c:
        c.wait_for_workers(1, timeout=60)
    (tmp_path / "long.py").write_text(LONG_CLIENT)
    with (tmp_path / "client.out").open("w") as out, (tmp_path / "client.err").open("w") as err:
        client = subprocess.Popen([*HPCDASK, "client", "--scheduler-file", str(path),
                                   "--output", str(tmp_path / "out"), "--", "long.py"],
                                  cwd=tmp_path, stdout=out, stderr=err, start_new_session=True)
    try:
        wait_for(tmp_path / "client.out", "STARTED", client)
        sched.send_signal(signal.SIGUSR1)
        rc = finish(client, 60)
        assert finish(sched, 60) == 0
        assert finish(a, 60) == 0
    finally:
        kill(client, a, sched)
    err = (tmp_path / "client.err").read_text()
    assert rc == 143, err
    ours = [ln for ln in err.splitlines() if ln.strip()]
    assert len(ours) == 1, err
    assert ours[0].startswith("hpcdask: the cluster is ending: its scheduler's job got SIGUSR1"), err
    assert not path.exists()
    no_noise(tmp_path / "a.log", tmp_path / "s.log")


def _running(stat: Path) -> bool:
    try:
        return stat.read_text().split(") ")[-1].split()[0] != "Z"
    except OSError:  # gone
        return False


@pytest.mark.parametrize("warning", ["USR2", "USR1"])
def test_a_jobqueue_worker_stops_on_its_warning_signal_and_outlives_the_other(tmp_path, warning):
    """dask-jobqueue's worker command (``dask worker --preload-nanny hpcdask.shutdown``, as
    hpcdask.cluster writes it): the batch system's warning signal (HPCDASK_WARNING_SIGNAL; Grid
    Engine's -notify sends USR2 before qdel's SIGKILL) stops the nanny as SIGTERM does, exit 0, no
    traceback, its worker gone; the other signal changes nothing. Without the preload's handlers
    either signal kills the nanny at once (exit -USR*) and leaves its worker process behind, and
    a resource tracker that does not ignore them dies, is relaunched and prints a traceback."""
    other = {"USR1": "USR2", "USR2": "USR1"}[warning]
    sfile = tmp_path / "scheduler.json"
    env = {**os.environ, "HPCDASK_WARNING_SIGNAL": warning}
    with (tmp_path / "scheduler.log").open("w") as out:
        sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                                  "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(sfile)], stdout=out,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wlog = tmp_path / "worker.log"
    worker = None
    try:
        with wlog.open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sfile),
                 "--nthreads", "1", "--no-dashboard", "--preload", "hpcdask.shutdown",
                 "--preload-nanny", "hpcdask.shutdown", "--local-directory", str(tmp_path)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while "Registered to" not in wlog.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, wlog.read_text()
            time.sleep(0.2)
        children = [p for p in Path("/proc").glob("[0-9]*/stat")
                    if p.read_text().split(") ")[-1].split()[1] == str(worker.pid)]
        assert children, "the nanny started no worker process"
        # As a batch system does: to every process of the job (the nanny, its worker process,
        # multiprocessing's resource tracker).
        os.killpg(worker.pid, getattr(signal, f"SIG{other}"))
        time.sleep(3)
        assert worker.poll() is None, wlog.read_text()  # the other signal: nothing
        assert all(_running(p) for p in children), wlog.read_text()
        os.killpg(worker.pid, getattr(signal, f"SIG{warning}"))
        assert finish(worker, 60) == 0, wlog.read_text()
        log = wlog.read_text()
        assert "Traceback" not in log and " - ERROR - " not in log, log
        deadline = time.monotonic() + 20  # its worker process ends with it
        while left := [p.parent.name for p in children if _running(p)]:
            assert time.monotonic() < deadline, (left, log)
            time.sleep(0.2)
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        os.killpg(sched.pid, signal.SIGTERM)
        sched.wait(30)
