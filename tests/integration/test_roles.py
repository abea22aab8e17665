"""The roles as real processes: a TLS scheduler and workers started by the CLI on loopback,
what they accept and refuse, what they listen on, and how they end."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from distributed import Client
from distributed.security import Security

from hpcdask import launch, security

HPCDASK = [sys.executable, "-m", "hpcdask"]
pytestmark = pytest.mark.timeout(300)


def start(args, log: Path, env=None) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([*HPCDASK, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env or os.environ.copy(), start_new_session=True)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def wait_workers(path: Path, n: int, timeout=60) -> None:
    with launch.connect(path, check=False) as c:
        c.wait_for_workers(n, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("roles") / "cluster"
    path = d / "scheduler.json"
    logs = d.parent
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo"], logs / "scheduler.log")
    deadline = time.time() + 60
    while not path.exists():
        assert sched.poll() is None, (logs / "scheduler.log").read_text()
        assert time.time() < deadline, "no scheduler file"
        time.sleep(0.1)
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo",
                    "--nworkers", "2", "--nthreads", "1", "--memory-limit", "1GiB"],
                   logs / "worker.log")
    try:
        wait_workers(path, 2)
        yield {"path": path, "dir": d, "scheduler": sched, "worker": worker, "logs": logs}
    finally:
        stop(sched)
        stop(worker)


@pytest.fixture(scope="module")
def other_toolz(tmp_path_factory):
    """A folder holding another release of one small package (toolz), to put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("toolz")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), "toolz==1.0.0"], check=True)
    return target


def test_cluster_client_runs_work(cluster):
    with launch.connect(cluster["path"]) as c:
        assert c.submit(sum, [1, 2, 3]).result() == 6
        assert c.scheduler.address.startswith("tls://127.0.0.1:")
        assert len(c.scheduler_info()["workers"]) == 2


def test_versions_all_identical(cluster):
    proc = subprocess.run([*HPCDASK, "versions", "--scheduler-file", str(cluster["path"])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "all 4 roles identical" in proc.stdout


def _refused(address: str, sec: Security) -> bool:
    try:
        with Client(address, security=sec, timeout=5) as c:
            c.submit(sum, [1]).result(timeout=5)
    except (OSError, TimeoutError):
        return True
    return False


def test_plain_tcp_client_is_refused(cluster):
    address = json.loads(cluster["path"].read_text())["address"]
    assert _refused(address.replace("tls://", "tcp://"), Security())


def test_client_with_another_cas_certificate_is_refused(cluster, tmp_path):
    foreign = security.create(tmp_path / "foreign", "x").security()
    address = json.loads(cluster["path"].read_text())["address"]
    assert _refused(address, foreign)


def _tls_session_stays_open(address: str, ctx: ssl.SSLContext) -> bool:
    host, port = address[len("tls://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                return tls.recv(1) != b""  # the server's first message, or EOF when it refuses
        except TimeoutError:
            return True  # still open, waiting for us
        except (ssl.SSLError, ConnectionResetError):
            return False


def test_client_without_certificate_is_refused(cluster):
    """Distributed cannot even build a TLS client without a certificate, so speak TLS directly:
    trust the cluster's CA and show no certificate; the same with the cluster's certificate is
    the control that proves the probe can tell the difference."""
    creds = security.load(cluster["dir"])
    address = json.loads(cluster["path"].read_text())["address"]
    ctx = ssl.create_default_context(cafile=str(creds.ca))
    ctx.check_hostname = False
    assert not _tls_session_stays_open(address, ctx)
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    assert _tls_session_stays_open(address, ctx)


def test_credentials_and_scheduler_file_are_private(cluster):
    d = cluster["dir"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("ca.pem", "cluster.pem", "cluster.key", "scheduler.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name


def test_nothing_listens_on_all_interfaces(cluster):
    pids = set()
    for proc in (cluster["scheduler"], cluster["worker"]):
        p = psutil.Process(proc.pid)
        pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 5  # scheduler + dashboard + 2 nannies + 2 workers (+ their http)
    assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening


def test_worker_from_a_different_environment_is_refused(cluster, other_toolz, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(other_toolz))
    proc = subprocess.run([*HPCDASK, "worker", "--scheduler-file", str(cluster["path"]),
                           "--interface", "lo"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "toolz" in proc.stderr and "1.0.0" in proc.stderr
    assert "hpcdask: refused:" in proc.stderr and "Traceback" not in proc.stderr
    with launch.connect(cluster["path"]) as c:
        assert len(c.scheduler_info()["workers"]) == 2  # it never joined


def test_plain_dask_worker_from_a_different_environment_is_removed(cluster, other_toolz, tmp_path):
    """A worker started without hpcdask's own check is still removed by the scheduler's guard."""
    d = cluster["dir"]
    address = json.loads(cluster["path"].read_text())["address"]
    env = dict(os.environ, PYTHONPATH=str(other_toolz))
    log = tmp_path / "foreign.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
             "--host", "127.0.0.1", "--nthreads", "1", "--tls-ca-file", str(d / "ca.pem"),
             "--tls-cert", str(d / "cluster.pem"), "--tls-key", str(d / "cluster.key")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        assert proc.wait(60) is not None
    finally:
        stop(proc, signal.SIGKILL)
    sched_log = (cluster["logs"] / "scheduler.log").read_text()
    assert "refused worker" in sched_log and "toolz" in sched_log
    with launch.connect(cluster["path"]) as c:
        assert len(c.scheduler_info()["workers"]) == 2


def test_versions_names_a_mismatched_client(cluster, other_toolz):
    env = dict(os.environ, PYTHONPATH=str(other_toolz))
    proc = subprocess.run([*HPCDASK, "versions", "--scheduler-file", str(cluster["path"])],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "MISMATCH: toolz" in proc.stderr and "client" in proc.stderr


def test_scheduler_sigterm_ends_everything_cleanly(tmp_path):
    path = tmp_path / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                    "--memory-limit", "512MiB"], tmp_path / "w.log")
    try:
        wait_workers(path, 1)
        assert stop(sched) == 0
        assert worker.wait(30) == 0
    finally:
        stop(sched, signal.SIGKILL)
        stop(worker, signal.SIGKILL)
    assert not path.exists(), "the scheduler removes its own file on an orderly stop"
    # ... and the credentials it made; no role logs an ERROR or a traceback.
    assert list(path.parent.iterdir()) == []
    for log in ("s.log", "w.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and " - ERROR - " not in text, (log, text)


def test_killed_scheduler_workers_end_within_bounded_time(tmp_path):
    path = tmp_path / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    env = dict(os.environ, HPCDASK_CONNECT_TIMEOUT="10s")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                    "--memory-limit", "512MiB"], tmp_path / "w.log", env=env)
    try:
        wait_workers(path, 1)
        stop(sched, signal.SIGKILL)
        t0 = time.time()
        code = worker.wait(90)
        assert time.time() - t0 < 90
        assert code is not None
    finally:
        stop(worker, signal.SIGKILL)
