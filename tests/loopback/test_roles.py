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
from distributed.scheduler import KilledWorker
from distributed.security import Security

from hpcdask import connect, security

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
    with connect.connect(path, check=False) as c:
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


def _pip_target(factory, name: str, spec: str) -> Path:
    """A folder holding ``spec`` alone (pip --target), to put on PYTHONPATH."""
    target = factory.mktemp(name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), spec], check=True)
    return target


@pytest.fixture(scope="module")
def other_toolz(tmp_path_factory):
    """Another release of one small package (toolz)."""
    return _pip_target(tmp_path_factory, "toolz", "toolz==1.0.0")


@pytest.fixture(scope="module")
def other_threadpoolctl(tmp_path_factory):
    """Another release of a package distributed does not report (only the full identity shows it)."""
    return _pip_target(tmp_path_factory, "threadpoolctl", "threadpoolctl==3.5.0")


@pytest.fixture(scope="module")
def extra_termcolor(tmp_path_factory):
    """A package the lock lacks (termcolor): the lock plus one package."""
    return _pip_target(tmp_path_factory, "termcolor", "termcolor")


def test_cluster_client_runs_work(cluster):
    with connect.connect(cluster["path"]) as c:
        assert c.submit(sum, [1, 2, 3]).result() == 6
        assert c.scheduler.address.startswith("tls://127.0.0.1:")
        assert len(connect.cluster_info(c)["workers"]) == 2


def test_roles_comms_send_large_frames_unsplit(cluster):
    """hpcdask.yaml's distributed.comm.shard reaches the live comms of the scheduler and of
    every worker process (started by the nanny), so a 400 MB array is not split into 64 MiB
    shards that the receiver copies together again."""
    from dask.utils import parse_bytes

    def worker_shard(dask_worker):
        return dask_worker.batched_stream.comm.max_shard_size

    def scheduler_shards(dask_scheduler):
        return sorted({bs.comm.max_shard_size for bs in dask_scheduler.stream_comms.values()})

    with connect.connect(cluster["path"], check=False) as c:
        assert set(c.run(worker_shard).values()) == {parse_bytes("1GiB")}
        assert c.run_on_scheduler(scheduler_shards) == [parse_bytes("1GiB")]


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
    assert stat.S_IMODE((d / "tls").stat().st_mode) == 0o700  # the set's own folder
    for name in ("tls/ca.pem", "tls/cluster.pem", "tls/cluster.key", "scheduler.json"):
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
    with connect.connect(cluster["path"]) as c:
        assert len(connect.cluster_info(c)["workers"]) == 2  # it never joined


def test_plain_dask_worker_from_a_different_environment_is_removed(cluster, other_toolz, tmp_path):
    """A worker started without hpcdask's own check is still removed by the scheduler's guard."""
    d = cluster["dir"]
    address = json.loads(cluster["path"].read_text())["address"]
    env = dict(os.environ, PYTHONPATH=str(other_toolz))
    log = tmp_path / "foreign.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
             "--host", "127.0.0.1", "--nthreads", "1", "--tls-ca-file", str(d / "tls" / "ca.pem"),
             "--tls-cert", str(d / "tls" / "cluster.pem"), "--tls-key", str(d / "tls" / "cluster.key")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        assert proc.wait(60) is not None
    finally:
        stop(proc, signal.SIGKILL)
    sched_log = (cluster["logs"] / "scheduler.log").read_text()
    assert "refused worker" in sched_log and "toolz" in sched_log
    with connect.connect(cluster["path"]) as c:
        assert len(connect.cluster_info(c)["workers"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_dask_worker(cluster, env, log: Path, port: int) -> subprocess.Popen:
    d = cluster["dir"]
    address = json.loads(cluster["path"].read_text())["address"]
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
             "--host", "127.0.0.1", "--worker-port", str(port), "--nthreads", "2",
             "--no-dashboard", "--tls-ca-file", str(d / "tls" / "ca.pem"),
             "--tls-cert", str(d / "tls" / "cluster.pem"), "--tls-key", str(d / "tls" / "cluster.key")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.parametrize("foreign", ["other_toolz", "other_threadpoolctl"])
def test_mismatched_worker_runs_no_task(cluster, foreign, request, tmp_path):
    """A plain ``dask worker`` from another environment joins while a long map runs: every
    task leaves a mark named by the process that ran it, and none is the foreign worker's.
    toolz is among what distributed reports at registration; threadpoolctl only shows in the
    full identity, proven after registration while the worker is held out of scheduling."""
    package = foreign.removeprefix("other_")
    env = dict(os.environ, PYTHONPATH=str(request.getfixturevalue(foreign)))
    marks = tmp_path / "marks"
    marks.mkdir()

    def work(i):
        import os
        import time
        from pathlib import Path
        Path(marks, f"{os.getpid()}-{i}").touch()
        time.sleep(0.05)
        return i * i

    port = _free_port()
    log = cluster["logs"] / "scheduler.log"
    n = 300  # ~7.5 s on the cluster's two single-threaded workers
    with connect.connect(cluster["path"]) as c:
        futures = c.map(work, range(n))
        proc = _plain_dask_worker(cluster, env, tmp_path / "foreign.log", port)
        try:
            deadline = time.time() + 60
            while f"refused worker tls://127.0.0.1:{port}" not in log.read_text():
                assert time.time() < deadline, (tmp_path / "foreign.log").read_text()
                time.sleep(0.05)
            done_at_refusal = sum(f.done() for f in futures)
            assert c.gather(futures) == [i * i for i in range(n)]
            assert proc.wait(60) is not None  # removed, it ends
        finally:
            stop(proc, signal.SIGKILL)
        assert done_at_refusal < n, "the foreign worker joined after the map ended: no test"
        assert len(connect.cluster_info(c)["workers"]) == 2
    ran = {p.name.split("-")[0] for p in marks.iterdir()}
    assert len(list(marks.iterdir())) >= n
    assert str(proc.pid) not in ran, f"the foreign worker ran tasks: {sorted(ran)}"
    text = log.read_text()
    line = next(x for x in text.splitlines() if f"refused worker tls://127.0.0.1:{port}" in x)
    assert package in line
    table_head = text[text.index(line):].splitlines()[1]
    assert table_head.split()[:2] == ["package", "scheduler"], text[text.index(line):][:500]


_PLAIN_CLIENT = """
import sys
from distributed import Client
from distributed.security import Security
d = sys.argv[2] + "/tls"
sec = Security(require_encryption=True, tls_ca_file=d + "/ca.pem", tls_client_cert=d + "/cluster.pem",
               tls_client_key=d + "/cluster.key")
with Client(sys.argv[1], security=sec, timeout=20) as c:
    print("result", c.submit(sum, [1, 2, 3]).result())
"""


def _plain_client(cluster, env) -> subprocess.CompletedProcess:
    address = json.loads(cluster["path"].read_text())["address"]
    return subprocess.run([sys.executable, "-c", _PLAIN_CLIENT, address, str(cluster["dir"])],
                          capture_output=True, text=True, env=env, timeout=120)


def test_plain_client_from_another_environment_is_refused(cluster, other_toolz):
    proc = _plain_client(cluster, dict(os.environ, PYTHONPATH=str(other_toolz)))
    assert proc.returncode != 0 and "result" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert "refused by the scheduler" in last and "toolz 1.2.0 != 1.0.0" in last, proc.stderr
    assert "refused client" in (cluster["logs"] / "scheduler.log").read_text()


def test_plain_identical_client_works(cluster):
    proc = _plain_client(cluster, os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "result 6" in proc.stdout


# A user's script that never imports hpcdask: distributed's Client(scheduler_file=...) with the
# cluster's credentials, one task whose side effect (a file) shows whether it ran.
_PLAIN_FILE_CLIENT = """
import sys
from distributed import Client
from distributed.security import Security
assert "hpcdask" not in sys.modules, "not a plain client"
path, mark = sys.argv[1], sys.argv[2]
d = path.rsplit("/", 1)[0] + "/tls"
sec = Security(require_encryption=True, tls_ca_file=d + "/ca.pem", tls_client_cert=d + "/cluster.pem",
               tls_client_key=d + "/cluster.key")
def touch(p):
    open(p, "w").close()
    return 6
with Client(scheduler_file=path, security=sec, timeout=20) as c:
    print("result", c.submit(touch, mark).result())
"""


def _plain_file_client(cluster, env, mark: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PLAIN_FILE_CLIENT, str(cluster["path"]),
                           str(mark)], capture_output=True, text=True, env=env, timeout=120)


def test_plain_client_from_the_same_venv_proves_itself_and_runs(cluster, tmp_path):
    """Client(scheduler_file=...) in the lock's venv, hpcdask never imported: the venv's Dask
    configuration runs hpcdask's proof, and its task runs."""
    proc = _plain_file_client(cluster, os.environ.copy(), tmp_path / "ran")
    assert proc.returncode == 0, proc.stderr
    assert "result 6" in proc.stdout and (tmp_path / "ran").exists()


@pytest.mark.parametrize("foreign, difference", [
    ("extra_termcolor", r"termcolor - != \S+ \(client "),  # the lock + one package
    ("other_threadpoolctl", r"threadpoolctl \S+ != 3\.5\.0 \(client "),  # not one of distributed's
    (None, r"this client has not proven its identity .*hpcdask\.proof"),  # no proof at all
])
def test_plain_client_that_does_not_prove_the_clusters_identity_runs_no_task(
        cluster, foreign, difference, request, tmp_path):
    """...before any of its tasks runs (the task would leave a file); one line says why."""
    import re

    if foreign:
        env = dict(os.environ, PYTHONPATH=str(request.getfixturevalue(foreign)))
    else:  # a client from an environment without hpcdask's client preload
        env = dict(os.environ, DASK_DISTRIBUTED__CLIENT__PRELOAD="[]")
    mark = tmp_path / "ran"
    proc = _plain_file_client(cluster, env, mark)
    assert proc.returncode != 0 and "result" not in proc.stdout, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("PermissionError: hpcdask: refused by the scheduler: "), proc.stderr
    assert re.search(difference, last), last
    time.sleep(1)  # a task that had been scheduled would have run by now
    assert not mark.exists(), "a task of an unproven client ran"
    assert "refused a graph of 1 key(s) from client" in (cluster["logs"] / "scheduler.log").read_text()


def test_versions_names_a_mismatched_client(cluster, other_toolz):
    env = dict(os.environ, PYTHONPATH=str(other_toolz))
    proc = subprocess.run([*HPCDASK, "versions", "--scheduler-file", str(cluster["path"])],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "MISMATCH: toolz" in proc.stderr and "client" in proc.stderr


def test_scheduler_sigterm_ends_everything_cleanly(tmp_path):
    """...and the cluster's folder goes with it; its certificates ended with the job anyway."""
    from cryptography import x509

    path = tmp_path / "c" / "scheduler.json"
    job_end = int(time.time()) + 600
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off", "--job-end", str(job_end)], tmp_path / "s.log")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                    "--memory-limit", "512MiB"], tmp_path / "w.log")
    try:
        wait_workers(path, 1)
        cert = x509.load_pem_x509_certificate((path.parent / "tls" / "cluster.pem").read_bytes())
        assert cert.not_valid_after_utc.timestamp() == job_end + 3600  # + credentials-margin
        assert stop(sched) == 0
        assert worker.wait(30) == 0
    finally:
        stop(sched, signal.SIGKILL)
        stop(worker, signal.SIGKILL)
    assert not path.exists(), "the scheduler removes its own file on an orderly stop"
    # ... and the credentials and the folder it made; no role logs an ERROR or a traceback.
    assert not path.parent.exists()
    for log in ("s.log", "w.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and " - ERROR - " not in text, (log, text)


def test_the_published_scheduler_file_always_has_an_address(tmp_path):
    """A reader doing what the tutorials do, ``json.load(open(SCHEDULER_FILE))["address"]``,
    every 10 ms across repeated scheduler starts and stops on the same file, never finds the
    file without an address (the claim lives beside it until the file is published whole)."""
    import threading

    path = tmp_path / "c" / "scheduler.json"
    seen, bad, stop_reading = [], [], threading.Event()

    def read() -> None:
        while not stop_reading.is_set():
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:
                pass
            else:
                try:
                    seen.append(json.loads(text)["address"])
                except (ValueError, KeyError) as e:
                    bad.append(f"{type(e).__name__}: {text[:200]!r}")
            time.sleep(0.01)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for i in range(4):
            sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                           "--dashboard", "off"], tmp_path / f"s{i}.log")
            before = len(seen)
            try:
                deadline = time.time() + 60
                while len(seen) == before:
                    assert sched.poll() is None, (tmp_path / f"s{i}.log").read_text()
                    assert time.time() < deadline, "no address published"
                    time.sleep(0.01)
            finally:
                assert stop(sched) == 0
            assert not path.exists()
    finally:
        stop_reading.set()
        reader.join(5)
    assert len(set(seen)) >= 2  # schedulers each read at their published address
    assert not bad, f"{len(bad)} reads without an address, e.g. {bad[0]}"


_HOG = """
import distributed
c = distributed.get_client()
limit = max(w["memory_limit"] for w in c.scheduler_info()["workers"].values())
def hog(n):
    import numpy as np
    return int(np.ones(n, dtype="uint8").sum())
c.submit(hog, 3 * limit, key="hog-3x").result()
"""


def test_a_task_killed_for_memory_gets_one_line_and_the_cluster_stops_cleanly(tmp_path):
    """KilledWorker (distributed's message, the user's traceback) is followed by one hpcdask
    line naming the task, the workers' memory limit and the fix. Then the cluster stops at
    once: no nanny restarts its worker into removed credentials (no traceback in any log)."""
    path = tmp_path / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                    "--nworkers", "2", "--memory-limit", "256MiB"], tmp_path / "w.log")
    (tmp_path / "hog.py").write_text(_HOG)
    try:
        client = subprocess.run([*HPCDASK, "client", str(tmp_path / "hog.py"), "--scheduler-file",
                                 str(path), "--wait-workers", "2"], capture_output=True,
                                text=True, timeout=240, cwd=tmp_path)
        assert stop(sched) == 0
        assert worker.wait(30) == 0
    finally:
        stop(sched, signal.SIGKILL)
        stop(worker, signal.SIGKILL)
    assert client.returncode == 1, client.stderr
    assert client.stderr.count("Traceback (most recent call last)") == 1, client.stderr
    lines = client.stderr.strip().splitlines()
    assert lines[-2].startswith("distributed.scheduler.KilledWorker: "), client.stderr
    assert lines[-1].startswith("hpcdask: task 'hog-3x' was running on each of the 4 workers "
                                "that died (a memory limit of 256.00 MiB each)"), lines[-1]
    assert "--mem" in lines[-1] and "fewer workers per node" in lines[-1], lines[-1]
    assert "smaller chunks" in lines[-1], lines[-1]
    for log in ("s.log", "w.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and "FileNotFoundError" not in text, (log, text)
    assert not path.parent.exists()
    _killed_at_once((tmp_path / "w.log").read_text(), 4)


def _killed_at_once(log: str, n: int) -> None:
    """The nanny SIGKILLed the worker at the memory budget, ``n`` times: not distributed's
    SIGTERM, which hpcdask's worker process only goes quiet at, and SIGKILL a monitor interval
    later while the task went on allocating (Slurm's OverMemoryKill then took the whole step)."""
    assert log.count("memory budget") == n, log
    assert log.count("killing it; the nanny restarts it") == n, log
    assert "slow to accept SIGTERM" not in log, log


def test_a_dask_worker_with_hpcdask_preloads_is_killed_at_its_memory_budget(tmp_path):
    """dask-jobqueue's worker jobs (``slurm_cluster()``) run plain ``dask worker`` with
    hpcdask.shutdown as preload and nanny preload: its nanny kills a worker over budget at once
    too."""
    path = tmp_path / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    worker = None
    try:
        deadline = time.time() + 60
        while not path.exists():
            assert sched.poll() is None and time.time() < deadline, (tmp_path / "s.log").read_text()
            time.sleep(0.1)
        d = path.parent
        address = json.loads(path.read_text())["address"]
        with (tmp_path / "w.log").open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nanny",
                 "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit", "256MiB",
                 "--no-dashboard", "--preload", "hpcdask.shutdown", "--preload-nanny",
                 "hpcdask.shutdown", "--tls-ca-file", str(d / "tls" / "ca.pem"),
                 "--tls-cert", str(d / "tls" / "cluster.pem"),
                 "--tls-key", str(d / "tls" / "cluster.key")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_workers(path, 1)
        def hog(n: int) -> int:  # defined here: sent by value (workers cannot import tests)
            import numpy as np

            return int(np.ones(n, dtype="uint8").sum())

        with connect.connect(path, check=False) as c, pytest.raises(KilledWorker):
            c.submit(hog, 3 * 256 * 2**20, key="hog-3x").result(timeout=180)
    finally:
        stop(sched)
        if worker is not None:
            stop(worker)
    _killed_at_once((tmp_path / "w.log").read_text(), 4)


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


_HYPERBAND_SCRIPT = """
import json
import sys
before = sorted(m for m in sys.modules if m.split(".")[0] in ("dask_ml", "sklearn"))
import numpy as np
import dask.array as da
from dask_ml.metrics import r2_score
from dask_ml.datasets import make_classification
from dask_ml.model_selection import HyperbandSearchCV
from sklearn.linear_model import SGDClassifier

X, y = make_classification(n_samples=400, n_features=6, n_informative=3, chunks=100,
                           random_state=0)
grid = {"alpha": np.logspace(-5, 1, 13).tolist(), "penalty": ["l2", "l1"]}
search = HyperbandSearchCV(SGDClassifier(tol=None, random_state=0), grid, max_iter=9,
                           random_state=0).fit(X, y, classes=[0, 1])
y_true = da.from_array(np.array([1.0, 2.0, 3.0, 4.0]), chunks=2)
print(json.dumps({"best": search.best_params_, "score": search.best_score_, "before": before,
                  "r2": float(r2_score(y_true, y_true + 0.5)), "r2_from": r2_score.__module__}))
"""


def test_hyperband_in_a_client_script(cluster, tmp_path):
    """dask/dask-ml#1016 and #1012 are fixed for user scripts under `hpcdask client` (the
    all-in-one job's path) too: the same best parameters as on the stack without the bug
    (tests/loopback/test_compat), and dask-ml's r2_score works. hpcdask itself imported neither
    dask-ml nor scikit-learn before the script's first line (the fix comes on import)."""
    script = tmp_path / "search.py"
    script.write_text(_HYPERBAND_SCRIPT)
    proc = subprocess.run([*HPCDASK, "client", str(script), "--scheduler-file", str(cluster["path"])],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["best"] == {"penalty": "l1", "alpha": 0.01}
    assert out["score"] == pytest.approx(0.775, abs=1e-12)
    assert out["before"] == []
    assert out["r2_from"] == "hpcdask.compat" and out["r2"] == pytest.approx(0.8)  # 1 - 1/5


def test_a_helper_module_beside_the_script_imports_in_the_client_and_the_workers(cluster, tmp_path):
    """issue 31: as with `python analysis.py`, the script's folder is sys.path[0] in the client,
    and the workers import its helper module from the same folder (run from elsewhere)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helpers.py").write_text("import os\ndef square(x):\n    return x * x\n"
                                     "def where():\n    return os.path.realpath(__file__)\n")
    (proj / "analysis.py").write_text(
        "import json, sys\nimport dask.bag as db\nimport distributed\nimport helpers\n"
        "c = distributed.get_client()\n"
        "total = sum(db.from_sequence(range(10), npartitions=5).map(helpers.square).compute())\n"
        "print(json.dumps({'path0': sys.path[0], 'file': __file__, 'total': total,\n"
        "                  'where': sorted(set(c.run(helpers.where).values()))}))\n")
    proc = subprocess.run([*HPCDASK, "client", "proj/analysis.py", "--scheduler-file",
                           str(cluster["path"])], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["path0"] == os.path.realpath(proj)
    assert out["file"] == "proj/analysis.py"
    assert out["total"] == 285
    assert out["where"] == [os.path.realpath(proj / "helpers.py")]


def _listening(*procs: subprocess.Popen) -> set[tuple[str, int]]:
    pids = set()
    for proc in procs:
        p = psutil.Process(proc.pid)
        pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _port(address: str) -> tuple[str, int]:
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def test_dashboard_off_means_no_http_listener(tmp_path):
    """--dashboard off: the only listeners are the TLS comm ports of scheduler, nanny, worker
    (distributed would otherwise still serve its info/JSON/Prometheus routes)."""
    path = tmp_path / "c" / "scheduler.json"
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo", "--nthreads", "1",
                    "--memory-limit", "512MiB", "--dashboard", "off"], tmp_path / "w.log")
    try:
        wait_workers(path, 1)
        with connect.connect(path) as c:
            info = connect.cluster_info(c)
            ((addr, ws),) = info["workers"].items()
            comms = {_port(info["address"]), _port(addr), _port(ws["nanny"])}
        assert _listening(sched, worker) == comms
        assert "http://" not in (tmp_path / "s.log").read_text()
    finally:
        stop(worker)
        stop(sched)


def test_taken_dashboard_port_falls_back_with_the_right_tunnel(tmp_path):
    import urllib.request

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        path = tmp_path / "c" / "scheduler.json"
        env = dict(os.environ, HPCDASK_DASHBOARD_PORT=str(busy))
        sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo"],
                      tmp_path / "s.log", env=env)
        try:
            deadline = time.time() + 60
            while "ssh -N -L" not in (tmp_path / "s.log").read_text():
                assert sched.poll() is None, (tmp_path / "s.log").read_text()
                assert time.time() < deadline
                time.sleep(0.1)
            log = (tmp_path / "s.log").read_text()
            port = int(log.split("ssh -N -L ", 1)[1].split(":", 1)[0])
            assert port != busy
            assert f"ssh -N -L {port}:127.0.0.1:{port} " in log
            assert ("127.0.0.1", port) in _listening(sched)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                assert r.read() == b"ok"
            assert "Traceback" not in log and "already in use" not in log
        finally:
            assert stop(sched) == 0


_COUNT_SCRIPT = """
import distributed
from hpcdask.connect import cluster_info
print("WORKERS", len(cluster_info(distributed.get_client())["workers"]))
"""


def test_a_client_started_before_its_cluster_waits_for_every_worker(tmp_path):
    """The all-in-one job's order: the client starts first, waits for the scheduler's file, then
    for N workers (--wait-workers), and only then checks identities and runs the script. Asking
    for more workers than come ends in one line and exit 1 at --wait-timeout."""
    path = tmp_path / "c" / "scheduler.json"
    script = tmp_path / "count.py"
    script.write_text(_COUNT_SCRIPT)
    client = start(["client", str(script), "--scheduler-file", str(path), "--wait-workers", "2"],
                   tmp_path / "client.log")
    time.sleep(1)
    assert client.poll() is None, (tmp_path / "client.log").read_text()
    sched = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                   "--dashboard", "off"], tmp_path / "s.log")
    workers = []
    try:
        for i in range(2):  # one at a time: the client must not start on the first
            workers.append(start(["worker", "--scheduler-file", str(path), "--interface", "lo",
                                  "--nthreads", "1", "--memory-limit", "512MiB"],
                                 tmp_path / f"w{i}.log"))
            if i == 0:
                wait_workers(path, 1)
                time.sleep(2)
                assert client.poll() is None, (tmp_path / "client.log").read_text()
        assert client.wait(120) == 0, (tmp_path / "client.log").read_text()
        out = (tmp_path / "client.log").read_text()
        assert "WORKERS 2" in out and "hpcdask: 2 worker(s) ready after" in out, out

        late = subprocess.run([*HPCDASK, "client", str(script), "--scheduler-file", str(path),
                               "--wait-workers", "3", "--wait-timeout", "3s"],
                              capture_output=True, text=True, timeout=120)
        assert late.returncode == 1, late
        assert late.stderr.strip().splitlines() == [
            "hpcdask: error: only 2 of 3 worker(s) joined within 3s; see the worker output for "
            "why, or wait longer (--wait-timeout; HPCDASK_READY_TIMEOUT in the jobscripts)"]
        assert "WORKERS" not in late.stdout
    finally:
        stop(client, signal.SIGKILL)
        stop(sched)
        for w in workers:
            stop(w)
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert "Traceback" not in text and " - ERROR - " not in text, (log.name, text)
