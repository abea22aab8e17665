"""Unit tests of the core modules: config, sizing, credentials, scheduler file, identity."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from hpcdask import batch, config, memory, schedfile, security, versions
from hpcdask.errors import BadInput

from testcluster.nobody import run_as_nobody

GiB = 2**30


def test_every_default_has_a_comment():
    text = (Path(config.__file__).with_name("hpcdask.yaml")).read_text().splitlines()
    keys = [ln for ln in text if ln.startswith("  ") and ":" in ln]
    assert len(keys) >= 15
    assert all("#" in ln for ln in keys), [ln for ln in keys if "#" not in ln]


def test_short_env_overrides_config():
    code = ("import dask.config, hpcdask.config as c; "
            "print(c.get('interface'), c.get('nworkers'), dask.config.get('hpcdask.memory-preset'))")
    env = dict(os.environ, HPCDASK_INTERFACE="eth7", HPCDASK_NWORKERS="3",
               DASK_HPCDASK__MEMORY_PRESET="no-local-storage")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["eth7", "3", "no-local-storage"]


def test_dask_settings_hpcdask_changes_are_defaults_a_user_still_overrides():
    code = ("import hpcdask.config, dask.config; "
            "print(dask.config.get('distributed.comm.shard'))")
    env = {k: v for k, v in os.environ.items() if k != "DASK_DISTRIBUTED__COMM__SHARD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == ["1GiB"]
    env = dict(os.environ, DASK_DISTRIBUTED__COMM__SHARD="16MiB")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == ["16MiB"]


def test_defaults_without_env():
    assert config.get("interface") == "ib0"
    assert config.get("tls") is True
    assert config.get("dashboard") == "loopback"
    assert config.get("interface", "eth0") == "eth0"


def test_allocation_from_slurm_mem_per_node():
    a = batch.allocation({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "8",
                           "SLURM_MEM_PER_NODE": "4096"})
    assert (a.cpus, a.memory, a.source) == (8, 4 * GiB, "slurm")


def test_allocation_from_slurm_mem_per_cpu():
    a = batch.allocation({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "4",
                           "SLURM_MEM_PER_CPU": "512"})
    assert a.memory == 2 * GiB and a.cpus == 4


def test_allocation_from_pbs():
    a = batch.allocation({"PBS_JOBID": "9.gadi", "NCPUS": "6", "PBS_VMEM": str(3 * GiB)})
    assert (a.cpus, a.memory, a.source) == (6, 3 * GiB, "pbs")


def test_pbs_workers_leave_the_same_headroom_as_slurms():
    """The PBS jobscripts export this node's share of PBS_VMEM (the job's total); the workers'
    limits then leave the nannies' and the batch node's headroom, as under Slurm."""
    mib = 2**20
    env = {"PBS_JOBID": "9.gadi", "NCPUS": "2", "PBS_VMEM": str(8000 * mib),
           "HPCDASK_NODE_MEMORY": str(2000 * mib)}
    a = batch.allocation(env)
    assert (a.memory, a.source) == (2000 * mib, "pbs")
    assert memory.worker_sizing(1, None, "auto", a, nanny=160 * mib,
                                batch_reserve=768 * mib) == (2, 1840 * mib)


def test_worker_sizing_splits_the_allocation():
    alloc = batch.Allocation(cpus=8, memory=16 * GiB, source="slurm")
    assert memory.worker_sizing(2, None, "auto", alloc) == (4, 8 * GiB)
    assert memory.worker_sizing(4, 1, "1GiB", alloc) == (1, GiB)
    assert memory.worker_sizing(16, None, "auto", alloc) == (1, GiB)


def test_worker_sizing_leaves_headroom_for_nannies_and_the_batch_nodes_roles(monkeypatch):
    mib = 2**20
    # A compute node: the allocation less one nanny per worker, split between the workers.
    alloc = batch.Allocation(cpus=2, memory=4000 * mib, source="slurm")
    assert memory.worker_sizing(2, None, "auto", alloc, nanny=160 * mib,
                                batch_reserve=768 * mib) == (1, (4000 - 320) * mib // 2)
    # The batch node keeps the scheduler's and the client's share too (at most half).
    node1 = batch.Allocation(cpus=2, memory=4000 * mib, source="slurm", batch_node=True)
    assert memory.worker_sizing(1, None, "auto", node1, nanny=160 * mib,
                                batch_reserve=768 * mib) == (2, (4000 - 160 - 768) * mib)
    # The node's warm server (hpcdask.warm) once per node, whatever the number of workers.
    assert memory.worker_sizing(2, None, "auto", alloc, **memory.reserves(server=True)) == (
        1, (4000 - 2 * 160 - 192) * mib // 2)
    small = batch.Allocation(cpus=1, memory=1000 * mib, source="slurm", batch_node=True)
    assert memory.worker_sizing(1, None, "auto", small, nanny=160 * mib,
                                batch_reserve=768 * mib)[1] == (1000 - 160 - 500) * mib
    # Too little left: one line naming the fix.
    with pytest.raises(BadInput, match=r"leaves 0 MiB per worker .* \(sbatch --mem\)"):
        memory.worker_sizing(4, None, "auto", small, nanny=160 * mib, batch_reserve=768 * mib)
    # The batch node is the host the jobscript named.
    monkeypatch.setattr(batch.socket, "gethostname", lambda: "node1")
    env = {"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "1", "SLURM_MEM_PER_NODE": "1000"}
    assert batch.allocation({**env, "HPCDASK_BATCH_HOST": "node1"}).batch_node is True
    assert batch.allocation({**env, "HPCDASK_BATCH_HOST": "node2"}).batch_node is False
    assert batch.allocation(env).batch_node is False


def test_a_job_without_mem_is_capped_by_what_the_node_allows(monkeypatch):
    monkeypatch.setattr(batch, "node_memory", lambda: 3 * GiB)
    a = batch.allocation({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "2"})
    assert a.memory == 3 * GiB
    a = batch.allocation({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "2",
                           "SLURM_MEM_PER_NODE": "8192"})
    assert a.memory == 3 * GiB


def test_node_memory_is_distributeds_cgroup_aware_limit():
    from distributed.system import MEMORY_LIMIT

    assert 0 < batch.node_memory() <= MEMORY_LIMIT


def test_no_local_storage_preset_is_seed_003_policy():
    p = memory.preset("no-local-storage")
    assert p["distributed.worker.memory.spill"] is False
    assert p["distributed.worker.memory.target"] is False
    assert p["distributed.worker.memory.pause"] == 0.80
    assert p["distributed.worker.memory.terminate"] == 0.95


def test_lifetime_leaves_margin_and_stagger():
    life = memory.lifetime(job_end=10_000, margin=120, stagger=30, now=6_400)
    assert 3_600 - 150 <= life <= 3_600 - 120
    assert memory.lifetime(None, 120, 30) is None
    with pytest.raises(BadInput, match="less than the retirement margin"):
        memory.lifetime(job_end=100, margin=120, stagger=0, now=0)


@pytest.mark.parametrize(("env", "fix"), [
    ({"SLURM_JOB_ID": "7"}, "sbatch --time"), ({"PBS_JOBID": "7.pbs"}, "qsub -l walltime=..."),
    ({"JOB_ID": "7", "SGE_ROOT": "/sge"}, "qsub -l h_rt=...")])
def test_too_little_time_names_the_batch_systems_own_option(monkeypatch, env, fix):
    for name in ("SLURM_JOB_ID", "SLURM_CPUS_ON_NODE", "PBS_JOBID", "JOB_ID", "SGE_ROOT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BadInput) as err:
        memory.lifetime(job_end=100, margin=120, stagger=0, now=0)
    assert f"ask for more time ({fix})" in str(err.value)


def test_credentials_are_private_and_verify(tmp_path):
    creds = security.create(tmp_path / "cluster", "42")
    assert stat.S_IMODE(creds.folder.stat().st_mode) == 0o700
    for f in (creds.ca, creds.cert, creds.key):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    assert cert.issuer == ca.subject and cert.subject != ca.subject
    cert.verify_directly_issued_by(ca)
    assert not list(creds.folder.glob("*ca*.key")), "the CA key must never be written"
    sec = security.load(creds.folder).security()
    assert sec.require_encryption and sec.tls_ca_file == str(creds.ca)


def test_each_cluster_gets_its_own_ca(tmp_path):
    a = security.create(tmp_path / "a", "1")
    b = security.create(tmp_path / "b", "2")
    ca_b = x509.load_pem_x509_certificate(b.ca.read_bytes())
    cert_a = x509.load_pem_x509_certificate(a.cert.read_bytes())
    with pytest.raises(Exception):
        cert_a.verify_directly_issued_by(ca_b)


def test_a_scheduler_file_behind_a_closed_folder_fails_at_once(tmp_path):
    closed = tmp_path / "theirs"
    closed.mkdir(mode=0o700)
    if os.geteuid() == 0:  # root enters any folder: check as an ordinary user
        proc = run_as_nobody(
            [sys.executable, "-c", "from hpcdask import schedfile; schedfile.wait("
             f"__import__('pathlib').Path('{closed}/s.json'), 300)"],
            dict(os.environ), capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "is not readable by you" in proc.stderr
    else:
        closed.chmod(0)
        with pytest.raises(BadInput, match="is not readable by you"):
            schedfile.wait(closed / "s.json", 300)


def test_a_reader_never_fails_on_a_claim_being_written(tmp_path, monkeypatch):
    """Seen once in a full run: a worker read the scheduler's claim between its O_EXCL create and
    its write, and exited "is not JSON". The claim is now linked into place whole, and a reader
    that meets a file not (yet) JSON keeps waiting; only at its timeout does it say so."""
    import threading

    d = tmp_path / "job"
    d.mkdir(mode=0o700)
    path = d / "scheduler.json"
    path.write_text("")  # a half-made file, as a reader could once see
    got = {}
    reader = threading.Thread(target=lambda: got.update(schedfile.wait(path, 30)))
    reader.start()
    time.sleep(0.5)
    path.unlink()
    path, token = schedfile.claim(path, tls=True)
    assert [p.name for p in d.iterdir()] == [".scheduler.json.claim"]  # no temporary left
    schedfile.write(path, {"address": "tls://10.0.0.1:8786"}, token, tls=True)
    reader.join(30)
    assert got["address"] == "tls://10.0.0.1:8786"
    path.write_text("{not json")
    with pytest.raises(BadInput, match="is not JSON"):
        schedfile.wait(path, 0.3)


def test_a_claim_on_a_filesystem_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(schedfile.os, "link", no_links)
    path, token = schedfile.claim(tmp_path / "job" / "scheduler.json", tls=True)
    claimed = schedfile.claim_path(path)
    assert json.loads(claimed.read_text())["hpcdask"]["claim"] == token
    assert stat.S_IMODE(claimed.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [claimed.name]
    with pytest.raises(BadInput, match="is claimed .*another scheduler uses it"):
        schedfile.claim(path, tls=True)


def test_scheduler_file_is_claimed_exclusively_then_published_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    path, token = schedfile.claim(tmp_path / "job" / "scheduler-777.json", tls=True)
    # The claim is beside the file (mode 0600, stamped); the file itself is not there yet, so a
    # reader at its path never finds one without an address.
    claimed = schedfile.claim_path(path)
    assert stat.S_IMODE(claimed.stat().st_mode) == 0o600
    assert json.loads(claimed.read_text())["hpcdask"]["job"] == "777"
    assert not path.exists()
    with pytest.raises(BadInput, match="claimed .*job 777.* published no address within 0s; .* rm "):
        schedfile.wait(path, 0)
    # A second scheduler given the same file is refused, naming the first one's job.
    with pytest.raises(BadInput, match="is claimed .*job 777.*another scheduler uses it"):
        schedfile.claim(path, tls=True)
    schedfile.write(path, {"address": "tls://10.0.0.1:8786", "id": "Scheduler-x"}, token, tls=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = schedfile.wait(path, 0)
    assert content["address"] == "tls://10.0.0.1:8786"
    assert content["hpcdask"]["job"] == "777" and content["hpcdask"]["tls"] is True
    assert content["hpcdask"]["owner"]
    assert sorted(p.name for p in path.parent.iterdir()) == [claimed.name, path.name]  # no temp
    with pytest.raises(BadInput, match="is claimed .*another scheduler uses it"):
        schedfile.claim(path, tls=True)
    assert schedfile.remove_if_ours(path, "another-token") is False
    assert path.exists()
    assert schedfile.remove_if_ours(path, token) is True
    assert not path.exists() and claimed.exists()  # held until its credentials are gone
    schedfile.release(path, token)
    assert list(path.parent.iterdir()) == []
    schedfile.claim(path, tls=True)  # free again


def test_a_published_file_without_a_claim_is_refused_as_stale(tmp_path):
    d = tmp_path / "job"
    d.mkdir(mode=0o700)
    (d / "scheduler.json").write_text('{"address": "tls://10.0.0.1:8786"}')
    with pytest.raises(BadInput, match="already exists.* rm .*scheduler.json"):
        schedfile.claim(d / "scheduler.json", tls=True)
    assert [p.name for p in d.iterdir()] == ["scheduler.json"]  # the refused claim is gone


def test_identity_covers_python_image_and_every_package():
    ident = versions.identity()
    assert ident["python"].count(".") == 2
    for name in ("dask", "distributed", "dask-ml", "scikit-learn", "numpy", "pandas"):
        assert name in ident["packages"]
    assert "pip" not in ident["packages"]


def test_differences_name_the_package_and_role():
    ref = {"python": "3.11.2", "image": "lock:abc", "packages": {"dask": "1", "scikit-learn": "1.7.2"}}
    other = {"python": "3.11.2", "image": "lock:abc", "packages": {"dask": "1", "scikit-learn": "1.6.1"}}
    rows = versions.differences(ref, {"worker a": ref, "worker b": other})
    assert rows == [("scikit-learn", "1.7.2", {"worker a": "1.7.2", "worker b": "1.6.1"})]
    assert versions.summary(rows) == "scikit-learn 1.7.2 != 1.6.1 (worker b)"
    table = versions.table(rows)
    assert "scikit-learn" in table and "1.6.1" in table and "worker b" in table.splitlines()[0]
    assert versions.differences(ref, {"worker a": ref}) == []


def test_differences_see_missing_packages_and_images():
    ref = {"python": "3.11.2", "image": "lock:abc", "packages": {"dask": "1"}}
    other = {"python": "3.11.7", "image": "none (bare venv)", "packages": {"dask": "1", "extra": "2"}}
    items = [r[0] for r in versions.differences(ref, {"client": other})]
    assert items == ["image", "python", "extra"]


def test_lock_differences(tmp_path):
    lock = tmp_path / "req.lock"
    lock.write_text("dask==1.0 \\\n    --hash=sha256:00\nnumpy==2.0\n# comment\npip==1\n")
    assert versions.read_lock(lock) == {"dask": "1.0", "numpy": "2.0", "pip": "1"}
    assert versions.lock_differences(lock, {"dask": "1.0", "numpy": "2.0"}) == []
    assert versions.lock_differences(lock, {"dask": "1.1", "numpy": "2.0", "toolz": "1"}) == [
        "dask: locked 1.0, installed 1.1", "toolz: installed 1, not in the lock"]
    assert versions.lock_differences(lock, {"dask": "1.0"}) == ["numpy: locked 2.0, not installed"]


def test_certificates_end_with_the_job(tmp_path):
    now = 1_800_000_000.0
    assert security.not_after(now + 3600, 600, now=now).timestamp() == now + 4200
    assert security.not_after(None, 600, now=now).timestamp() == now + 30 * 86400
    end = security.not_after(time.time() + 3600, 600)
    creds = security.create(tmp_path / "c", "1", end)
    cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
    assert cert.not_valid_after_utc == ca.not_valid_after_utc == end.replace(microsecond=0)


def test_credentials_are_replaced_as_one_set(tmp_path):
    """A reader loading while the set is replaced again and again always gets a matching
    CA, certificate and key (each set is its own folder; the tls link switches in one rename)."""
    import threading

    from cryptography.hazmat.primitives import serialization

    folder = tmp_path / "c"
    security.create(folder, "0")
    stop = threading.Event()
    seen, bad = [], []

    def read():
        while not stop.is_set():
            try:
                creds = security.load(folder)
                ca = x509.load_pem_x509_certificate(creds.ca.read_bytes())
                cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
                key = serialization.load_pem_private_key(creds.key.read_bytes(), None)
            except (BadInput, FileNotFoundError):
                continue  # an old set removed under the reader: it reads again, never mixes
            seen.append(creds.generation)
            try:
                cert.verify_directly_issued_by(ca)
                assert cert.public_key().public_numbers() == key.public_key().public_numbers()
            except Exception as e:  # noqa: BLE001
                bad.append(f"{creds.generation}: {e!r}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 60):
            security.create(folder, str(i))
    finally:
        stop.set()
        reader.join()
    assert not bad, bad[:3]
    assert len(set(seen)) > 5  # the reader really crossed many replacements
    assert len(list(folder.glob(".tls-*"))) == 1  # earlier sets are gone
    security.remove(security.current(folder))
    assert sorted(p.name for p in folder.iterdir()) == []


def test_the_sif_id_is_compared_between_roles_that_both_know_it():
    """A role started by hand (`apptainer exec IMAGE hpcdask client ...`) cannot see its .sif: it
    is held to the lock and packages; two roles that know their SIF IDs must have the same."""
    def ident(image: str) -> dict:
        return {"python": "3.11.2", "image": image, "packages": {"dask": "2026.8.0"}}

    sched = ident("lock:abc sif:11")
    assert versions.differences(sched, {"client": ident("lock:abc")}) == []
    rows = versions.differences(sched, {"worker": ident("lock:abc sif:22")})
    assert rows == [("sif", "11", {"worker": "22"})]
    assert versions.summary(rows) == "sif 11 != 22 (worker)"
    rows = versions.differences(sched, {"client": ident("lock:abd")})
    assert rows == [("image", "lock:abc", {"client": "lock:abd"})]


def test_cluster_info_always_lists_every_worker_despite_the_clients_own_refresh():
    """distributed's Client.scheduler_info(n_workers=-1) returns an attribute its periodic
    refresh (without workers) can overwrite in between: under load it reported "0 workers"
    (seen in CI's compose test; here, with a 1 ms refresh, ~10 % of 2000 calls). hpcdask
    reads the workers through connect.cluster_info, which fetches them every time."""
    import dask
    from distributed import Client, LocalCluster

    from hpcdask.connect import cluster_info

    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                         dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        counts = [len(cluster_info(client)["workers"]) for _ in range(2000)]
    assert counts == [2] * 2000


def test_a_closed_connection_logged_at_info_keeps_its_line_but_no_traceback(caplog):
    """distributed logs "Batched Comm Closed" / "Lost connection to" at INFO with a traceback;
    at a time limit some role always sees a peer go first. hpcdask roles keep the line only;
    anything at WARNING or above keeps its traceback."""
    import logging

    from distributed.comm.core import CommClosedError

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    shutdown.calm_closed_connections()  # once, however often it is called
    batched = logging.getLogger("distributed.batched")
    assert sum(isinstance(f, shutdown.NoClosedConnectionTraceback) for f in batched.filters) == 1

    def log(logger, level, exc):
        try:
            raise exc
        except Exception:
            logging.getLogger(logger).log(level, "Batched Comm Closed %r", "<TLS ...>",
                                          exc_info=True)

    with caplog.at_level(logging.DEBUG):
        log("distributed.batched", logging.INFO, CommClosedError("in <TLS (closed)>"))
        log("distributed.core", logging.INFO, ConnectionResetError("reset"))
        log("distributed.batched", logging.ERROR, CommClosedError("real trouble"))
        log("distributed.batched", logging.INFO, ValueError("not a closed connection"))
    text = caplog.text
    assert text.count("Batched Comm Closed") == 4
    assert "in <TLS (closed)>" not in text and "reset" not in text
    assert "real trouble" in text and "not a closed connection" in text


def test_a_tls_handshake_failing_on_a_stopping_listener_is_one_info_line(caplog):
    """distributed's comm/tcp.py, when a TLS handshake fails (the peer gave up) while its
    listener stops, reads the stopped listener's address inside its warning and tornado logs
    the resulting ValueError as an ERROR with two tracebacks (seen when adapt() retired a
    worker). hpcdask's roles turn exactly that into one INFO line; other ERRORs stay."""
    import logging

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    tornado = logging.getLogger("tornado.application")

    def log(context, exc):
        try:
            try:
                raise context
            except OSError:
                raise exc  # its __context__ is the handshake's OSError
        except Exception:
            tornado.error("Exception in callback %r", "partial(...)", exc_info=True)

    with caplog.at_level(logging.DEBUG):
        log(ConnectionResetError(104, "Connection reset by peer"),
            ValueError("invalid operation on non-started TCPListener"))
        log(ConnectionResetError(104, "reset"), ValueError("some other failure"))
    first, second = caplog.records
    assert (first.levelname, first.exc_info) == ("INFO", None)
    assert first.getMessage() == ("a TLS handshake failed ([Errno 104] Connection reset by peer) "
                                  "while this listener was stopping")
    assert second.levelname == "ERROR" and "some other failure" in caplog.text


def test_a_heartbeat_meeting_a_closed_connection_is_one_line(caplog):
    """distributed's worker logs a heartbeat that meets a closed connection with
    logger.exception (seen once in ~10 runs of test_scheduler_sigterm_ends_everything_cleanly,
    and once in 18 runs of the dask-mpi rig test: a heartbeat on its way while the worker closed
    in order). hpcdask's roles keep it on one line with its cause: INFO while this process's
    worker (a real one here) is closing, WARNING while it runs; any other failure keeps its
    ERROR and traceback."""
    import asyncio
    import logging

    from distributed import Scheduler, Worker
    from distributed.comm.core import CommClosedError

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    log = logging.getLogger("distributed.worker")
    cut = CommClosedError("in <TLS (closed) ConnectionPool.heartbeat_worker>")

    def heartbeat_fails(exc):
        try:
            raise exc
        except Exception:
            log.exception(shutdown.HEARTBEAT_FAILED)

    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address=":0") as s:
            w = await Worker(s.address, nthreads=1)
            heartbeat_fails(cut)  # running: distributed will retry, worth a WARNING
            heartbeat_fails(RuntimeError("unexpected"))
            closing = asyncio.ensure_future(w.close())
            await asyncio.sleep(0)  # close() has begun: its status says closing
            assert w.status.name in ("closing", "closed")
            heartbeat_fails(cut)
            await closing

    with caplog.at_level(logging.DEBUG, logger="distributed.worker"):
        asyncio.run(main())
    ours = [r for r in caplog.records if "heartbeat" in r.getMessage()]
    assert [(r.levelname, r.exc_info is None) for r in ours] == [
        ("WARNING", True), ("ERROR", False), ("INFO", True)]
    assert ours[0].getMessage() == ("Failed to communicate with scheduler during heartbeat "
                                    "(CommClosedError: in <TLS (closed) "
                                    "ConnectionPool.heartbeat_worker>)")
    assert ours[2].getMessage() == ours[0].getMessage() + "; this worker is closing"



@pytest.mark.parametrize("msg, args, line", [
    # Serving data to a peer that closed mid-transfer (seen on Grid Engine at h_rt: the
    # scheduler retires every worker at once).
    ("GET_DATA_FAILED", ("tls://10.0.0.1:1", "tls://10.0.0.2:2"),
     "a peer's connection closed while this worker sent it data (tls://10.0.0.1:1 -> "
     "tls://10.0.0.2:2: CommClosedError: in <TLS (closed)>)"),
    # Fetching a task's input from a peer that died (seen in the compose test: a worker killed
    # mid-workload, a surviving worker's log held a traceback).
    ("GATHER_DEP_FAILED", ("tls://10.0.0.2:2",),
     "a peer's connection closed while this worker fetched data from it (tls://10.0.0.2:2: "
     "CommClosedError: in <TLS (closed)>); the scheduler finds the data elsewhere or "
     "recomputes it"),
])
def test_a_peer_closing_mid_transfer_is_one_line(caplog, msg, args, line):
    """distributed's worker logs these with a traceback when the peer's connection closes. One
    line with its cause: INFO while this process's (real) worker is closing, WARNING while it
    runs; another failure keeps its ERROR and traceback."""
    import asyncio
    import logging

    from distributed import Scheduler, Worker
    from distributed.comm.core import CommClosedError

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    log = logging.getLogger("distributed.worker")

    def fails(exc):
        try:
            raise exc
        except Exception:
            log.exception(getattr(shutdown, msg), *args)

    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address=":0") as s:
            w = await Worker(s.address, nthreads=1)
            fails(CommClosedError("in <TLS (closed)>"))
            fails(RuntimeError("unexpected"))
            closing = asyncio.ensure_future(w.close())
            await asyncio.sleep(0)
            fails(CommClosedError("in <TLS (closed)>"))
            await closing

    with caplog.at_level(logging.DEBUG, logger="distributed.worker"):
        asyncio.run(main())
    ours = [r for r in caplog.records if "10.0.0.2:2" in r.getMessage()]
    assert [(r.levelname, r.exc_info is None) for r in ours] == [
        ("WARNING", True), ("ERROR", False), ("INFO", True)]
    assert ours[0].getMessage() == line
    assert ours[2].getMessage() == line + "; this worker is closing"


def test_a_closing_workers_call_to_its_stopping_nanny_is_one_line(caplog):
    """Seen in CI on Docker Engine: both containers' nannies stopping, a worker the scheduler had
    already dropped closes itself and calls its nanny, whose socket closed before the TLS
    handshake; tornado raises ValueError("IOStream is not idle; cannot convert to SSL") and
    distributed's log_errors logs it as an ERROR with a traceback. While this process's worker
    (a real one) is closing that is one INFO line; while it runs, the ERROR and traceback stay."""
    import asyncio
    import logging

    from distributed import Scheduler, Worker

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    log = logging.getLogger("distributed.utils")

    def fails(exc):
        try:
            raise exc
        except Exception as e:
            log.error("%s", e, exc_info=True)

    async def main():
        async with Scheduler(host="127.0.0.1", dashboard_address=":0") as s:
            w = await Worker(s.address, nthreads=1)
            fails(ValueError(shutdown.TORNADO_NOT_IDLE))  # running: stays an ERROR
            closing = asyncio.ensure_future(w.close())
            await asyncio.sleep(0)
            assert w.status.name in ("closing", "closed")
            fails(ValueError(shutdown.TORNADO_NOT_IDLE))
            fails(ValueError("something else"))
            await closing

    with caplog.at_level(logging.DEBUG, logger="distributed.utils"):
        asyncio.run(main())
    ours = [r for r in caplog.records if r.name == "distributed.utils"]
    assert [(r.levelname, r.exc_info is None) for r in ours] == [
        ("ERROR", False), ("INFO", True), ("ERROR", False)]
    assert ours[1].getMessage() == ("a connection to a peer was cut off as this worker closed "
                                    "(IOStream is not idle; cannot convert to SSL)")


_SIGNALLED = """
import asyncio, os, signal
from hpcdask import signals

async def main():
    async def forever():
        await asyncio.sleep(60)
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    why = await signals.until_signalled(asyncio.Event(), forever())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    for _ in range(20):  # the step's and the jobscript's: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.1)
    print(why)

asyncio.run(main())
# After the loop closed (the role's cleanup: its scratch, its credentials): still ignored.
# asyncio's loop.close() resets the signals it handled to SIG_DFL, and a late SIGTERM then
# killed a draining worker job with 143 (seen once in 10 runs of the "TERM twice" drain test).
assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)
print("after the loop")
"""


def test_a_stopping_role_ignores_further_signals():
    """After the first SIGTERM a role ignores SIGINT/SIGTERM: later ones (the batch system signals
    every process of the step and the jobscript passes its own on) neither interrupt its orderly
    stop nor reach asyncio's handler while its loop closes (a BrokenPipeError traceback)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALLED], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (
        0, ["SIGTERM", "after", "the", "loop"], "")


_SIGNALLED_WITH_THREADS = """
import asyncio, os, signal, threading
from hpcdask import signals

def late_signal():
    # A second SIGTERM for the process (the step's, then the jobscript's), taken by a thread
    # that does not block it (distributed's, the executor's): with SIG_DFL it ends the process.
    t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
    t.start()
    t.join()

async def main():
    async def forever():
        await asyncio.sleep(60)
    loop = asyncio.get_running_loop()
    remove = loop.remove_signal_handler
    def removing(sig):  # the signal lands just after asyncio let go of it
        done = remove(sig)
        late_signal()
        return done
    loop.remove_signal_handler = removing
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    why = await signals.until_signalled(asyncio.Event(), forever())
    late_signal()
    return why

print(asyncio.run(main()))
late_signal()
print("still here")
"""


def test_a_burst_of_signals_never_meets_the_default_action(tmp_path):
    """A second SIGTERM at any moment of the stop, taken by any thread of the process, changes
    nothing: until_signalled hands the signals from its handler to SIG_IGN directly, never through
    SIG_DFL (asyncio's remove_signal_handler resets to SIG_DFL, and the main thread's blocked mask
    does not cover the other threads: a drain test's worker ended with 143 under load)."""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _SIGNALLED_WITH_THREADS], capture_output=True,
                              text=True, timeout=60)
        assert (proc.returncode, proc.stdout.split()) == (0, ["SIGTERM", "still", "here"]), proc


def test_a_worker_handler_cancelled_by_its_closing_scheduler_is_one_line(caplog):
    """Seen in CI on Grid Engine (sge_cluster: dask-jobqueue's scheduler runs in the client): as
    the scheduler closes, it cancels a worker's stream handler and distributed's log_errors logs
    the CancelledError as an ERROR with a traceback. While this process's scheduler (a real one)
    is closing that is one INFO line; while it runs, the ERROR and traceback stay."""
    import asyncio
    import logging

    from distributed import Scheduler

    from hpcdask import shutdown

    shutdown.calm_closed_connections()
    log = logging.getLogger("distributed.scheduler")

    def fails():
        try:
            raise asyncio.CancelledError()
        except asyncio.CancelledError:
            log.error("", exc_info=True)

    async def main():
        s = await Scheduler(host="127.0.0.1", dashboard_address=":0")
        fails()  # running: stays an ERROR
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0)
        assert s.status.name in ("closing", "closed")
        fails()
        await closing

    with caplog.at_level(logging.DEBUG, logger="distributed.scheduler"):
        asyncio.run(main())
    ours = [r for r in caplog.records if r.name == "distributed.scheduler" and
            (r.exc_info or "cut off" in r.getMessage())]
    assert [(r.levelname, r.exc_info is None) for r in ours] == [("ERROR", False), ("INFO", True)]
    assert ours[1].getMessage() == ("a worker's connection was cut off as this scheduler closed "
                                    "(CancelledError)")
