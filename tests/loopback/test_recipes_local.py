"""The recipes of issue 14 that run without Slurm, with real processes on loopback (TLS):
provenance.json and ``versions --against`` (local and live cluster), GPU workers' environment
(a fake nvidia-smi: no GPU here), JupyterLab next to a cluster (token, loopback only, a
notebook run headless, a real headless Chromium screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from hpcdask import connect

from loopback.test_roles import HPCDASK, start, stop, wait_workers

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HPCDASK_TEST_ARTIFACTS", REPO / "test-artifacts"))
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def scheduler(d: Path, env=None, dashboard="off") -> tuple[subprocess.Popen, Path]:
    path = d / "scheduler.json"
    proc = start(["scheduler", "--scheduler-file", str(path), "--interface", "lo",
                  "--dashboard", dashboard],
                 d.parent / f"{d.name}-scheduler.log", env)
    deadline = time.time() + 60
    while not path.exists():
        assert proc.poll() is None, (d.parent / f"{d.name}-scheduler.log").read_text()
        assert time.time() < deadline, "no scheduler file"
        time.sleep(0.1)
    return proc, path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes") / "cluster"
    # The dashboard on loopback, as users get it (a free port: HPCDASK_DASHBOARD_PORT=0).
    sched, path = scheduler(d, {**os.environ, "HPCDASK_DASHBOARD_PORT": "0"}, "loopback")
    worker = start(["worker", "--scheduler-file", str(path), "--interface", "lo",
                    "--nworkers", "1", "--nthreads", "2", "--memory-limit", "1GiB"],
                   d.parent / "worker.log")
    try:
        wait_workers(path, 1)
        yield {"path": path, "dir": d, "logs": d.parent}
    finally:
        stop(sched)
        stop(worker)


def hpcdask(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*HPCDASK, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


# --- provenance -----------------------------------------------------------------------------

def check_record(rec: dict, exit_status: int) -> None:
    assert rec["kind"] == "hpcdask-provenance" and rec["format"] == 1
    assert rec["exit_status"] == exit_status
    assert rec["started"] <= rec["ended"]
    assert set(rec["image"]) == {"path", "identity", "info"}
    assert rec["image"]["identity"]["image"] == "none (bare venv)"
    roles = rec["roles"]
    assert "scheduler" in roles and "client" in roles
    assert any(r.startswith("worker tls://127.0.0.1:") for r in roles)
    for r in roles.values():
        assert r["python"] and r["packages"]["distributed"] and "dask_config" in r
    assert rec["addresses"]["scheduler"].startswith("tls://127.0.0.1:")
    assert rec["tls"]["certificate_sha256"].startswith("sha256:")
    assert len(rec["tls"]["certificate_sha256"]) == len("sha256:") + 64
    assert "PRIVATE KEY" not in json.dumps(rec)


def test_run_on_a_cluster_writes_provenance_and_checks_against_it(cluster, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SLURM_JOB_ID": "4242", "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}
    proc = hpcdask("run", "--workload", "smoke", "--scheduler-file", str(cluster["path"]),
                   "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert (out / "metrics.json").exists()
    check_record(rec, 0)
    assert rec["job"]["id"] == "4242"
    # The client's environment changed one Dask setting: recorded as such, and only there.
    assert rec["roles"]["client"]["dask_config"]["distributed.scheduler.work-stealing"] is False
    assert "distributed.scheduler.work-stealing" not in rec["roles"]["scheduler"]["dask_config"]
    from hpcdask.security import load
    from hpcdask.provenance import cert_fingerprint
    assert rec["tls"]["certificate_sha256"] == cert_fingerprint(str(load(cluster["dir"]).cert))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left

    # The same live cluster against its own record: identical, exit 0.
    same = hpcdask("versions", "--scheduler-file", str(cluster["path"]),
                   "--against", str(out / "provenance.json"))
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith(f"same as {out / 'provenance.json'}: 3 role(s)")
    # An earlier run that had another numpy and Python: both differences shown, exit 1.
    old = json.loads((out / "provenance.json").read_text())
    old["roles"]["scheduler"]["packages"]["numpy"] = "1.0.0"
    old["roles"]["scheduler"]["python"] = "3.9.1"
    (tmp_path / "old.json").write_text(json.dumps(old))
    diff = hpcdask("versions", "--scheduler-file", str(cluster["path"]),
                   "--against", str(tmp_path / "old.json"))
    assert diff.returncode == 1, diff.stderr
    assert "DIFFERENT from" in diff.stderr and "numpy 1.0.0 != " in diff.stderr
    assert "python 3.9.1 != " in diff.stderr
    table = diff.stderr.splitlines()[1:]
    assert table[0].split()[:2] == ["package", "recorded"]
    assert any(line.split()[:2] == ["numpy", "1.0.0"] for line in table)


def test_versions_against_names_a_change_in_the_scripts_code(cluster, tmp_path):
    """issue 31 item 4: provenance.json has the script folder's code (a sha256 over its *.py,
    or its git commit); `versions --against` says when that code changed since."""
    from hpcdask.provenance import code_digest

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helpers.py").write_text("def f(x):\n    return x + 1\n")
    (proj / "mine.py").write_text("import helpers\nfrom distributed import get_client\n"
                                  "print(get_client().submit(helpers.f, 1).result())\n")

    def run() -> Path:
        proc = hpcdask("client", "mine.py", "--scheduler-file", str(cluster["path"]), cwd=proj)
        assert proc.returncode == 0, proc.stderr
        return max((proj / "hpcdask-output").glob("mine*/provenance.json"),
                   key=lambda p: p.stat().st_mtime)

    def against(record: Path) -> subprocess.CompletedProcess:
        return hpcdask("versions", "--scheduler-file", str(cluster["path"]), "--against",
                       str(record))

    record = run()
    code = json.loads(record.read_text())["project"]["code"]
    assert code == {"folder": str(proj), "py_sha256": code_digest(proj)["py_sha256"]}, code
    same = against(record)
    assert same.returncode == 0 and same.stdout.startswith("same as "), same.stdout + same.stderr
    (proj / "helpers.py").write_text("def f(x):\n    return x + 2\n")
    diff = against(record)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert diff.stderr.splitlines() == [
        f"DIFFERENT code from {record}: the code in {proj} changed: recorded *.py sha256 "
        f"{code['py_sha256'][:12]}, now *.py sha256 {code_digest(proj)['py_sha256'][:12]}"]

    # A git work tree: its commit is recorded; a later commit is named.
    git = ["git", "-C", str(proj), "-c", "user.name=t", "-c", "user.email=t@example.org"]

    def commit(msg: str) -> str:
        for cmd in (["add", "-A"], ["commit", "-qm", msg]):
            subprocess.run([*git, *cmd], check=True, capture_output=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()

    subprocess.run([*git, "init", "-q"], check=True, capture_output=True)
    (proj / ".gitignore").write_text("hpcdask-output/\n")
    one = commit("one")
    record = run()
    assert json.loads(record.read_text())["project"]["code"] == {
        "folder": str(proj), "git_commit": one, "git_dirty": False}
    assert against(record).returncode == 0
    (proj / "helpers.py").write_text("def f(x):\n    return x + 3\n")
    two = commit("two")
    diff = against(record)
    assert diff.returncode == 1 and diff.stderr.splitlines() == [
        f"DIFFERENT code from {record}: the code in {proj} changed: recorded git {one[:12]}, "
        f"now git {two[:12]}"], diff.stdout + diff.stderr


def test_local_run_writes_provenance_and_versions_against_the_local_environment(tmp_path):
    out = tmp_path / "out"
    proc = hpcdask("run", "--workload", "smoke", "--n-workers", "1", "--memory-limit", "1GiB",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    check_record(rec, 0)
    assert rec["tls"]["ca_sha256"].startswith("sha256:")  # Security.temporary()'s, from memory
    same = hpcdask("versions", "--against", str(out / "provenance.json"))
    assert same.returncode == 0, same.stderr
    assert "1 role(s)" in same.stdout
    old = dict(rec)
    old["roles"] = {"scheduler": {**rec["roles"]["scheduler"],
                                  "packages": {**rec["roles"]["scheduler"]["packages"],
                                               "dask": "2020.1.0"}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    diff = hpcdask("versions", "--against", str(tmp_path / "old.json"))
    assert diff.returncode == 1
    assert "dask 2020.1.0 != " in diff.stderr and "(this environment)" in diff.stderr


def test_failed_run_records_its_exit_status(cluster, tmp_path):
    """A run whose workload fails still says what it ran on, with the failure's exit status."""
    out = tmp_path / "out"
    env = {**os.environ, "HPCDASK_SIZE": "tiny"}  # refused by the runner, after connecting
    proc = hpcdask("run", "--workload", "smoke", "--scheduler-file", str(cluster["path"]),
                   "--output", str(out), env=env)
    assert proc.returncode == 2, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert rec["exit_status"] == 2 and not (out / "metrics.json").exists()


# --- GPUs (no GPU here: a fake nvidia-smi; what is checked is each worker's environment) ----

def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    (b / name).write_text(f"#!/bin/sh\n{body}\n")
    (b / name).chmod(0o755)
    return b


def test_gpu_workers_one_per_gpu_each_with_its_own_device_first(cluster, tmp_path):
    b = fake_bin(tmp_path, "nvidia-smi", 'echo 0; echo 1; echo 2')
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "HPCDASK_GPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with connect.connect(cluster["path"], check=False) as c:
        before = set(connect.cluster_info(c)["workers"])
        w = start(["worker", "--scheduler-file", str(cluster["path"]), "--interface", "lo",
                   "--nthreads", "1", "--memory-limit", "300MiB"], tmp_path / "gpu.log", env)
        try:
            c.wait_for_workers(len(before) + 3, timeout=90)
            new = set(connect.cluster_info(c)["workers"]) - before
            seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), workers=list(new))
            assert sorted(seen.values()) == ["0,1,2", "1,2,0", "2,0,1"]
            info = connect.cluster_info(c)["workers"]
            assert all(info[a]["resources"] == {"GPU": 1} for a in new)
        finally:
            assert stop(w) == 0, (tmp_path / "gpu.log").read_text()


def test_gpu_workers_follow_the_batch_systems_devices(cluster, tmp_path):
    """Slurm's --gres sets CUDA_VISIBLE_DEVICES: those GPUs (not nvidia-smi's list) are used."""
    b = fake_bin(tmp_path, "nvidia-smi", "exit 9")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "5,7"}
    with connect.connect(cluster["path"], check=False) as c:
        before = set(connect.cluster_info(c)["workers"])
        w = start(["worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", "--nthreads", "1", "--memory-limit", "300MiB"], tmp_path / "gpu.log", env)
        try:
            c.wait_for_workers(len(before) + 2, timeout=90)
            new = set(connect.cluster_info(c)["workers"]) - before
            seen = c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), workers=list(new))
            assert sorted(seen.values()) == ["5,7", "7,5"]
        finally:
            assert stop(w) == 0


def test_gpu_worker_without_a_gpu_is_one_line_exit_2(cluster, tmp_path):
    b = fake_bin(tmp_path, "nvidia-smi", "exit 9")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = hpcdask("worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "shows no GPU" in proc.stderr and "--gres=gpu:N" in proc.stderr


def test_gpu_worker_hands_over_to_dask_cuda_when_installed(cluster, tmp_path):
    """With dask-cuda in the environment its CUDAWorker runs the GPU workers, given hpcdask's
    TLS, interface and sizing (a stand-in dask_cuda records what it was given: no CUDA here)."""
    pkg = tmp_path / "site" / "dask_cuda"
    pkg.mkdir(parents=True)
    record = tmp_path / "cuda.json"
    (pkg / "__init__.py").write_text(
        "import json, os\n"
        "class CUDAWorker:\n"
        "    def __init__(self, scheduler, **kw):\n"
        f"        json.dump(dict(scheduler=scheduler, cvd=os.environ['CUDA_VISIBLE_DEVICES'],\n"
        "            tls=kw['security'].require_encryption, ca=bool(kw['security'].tls_ca_file),\n"
        "            host=kw['host'], nthreads=kw['nthreads'], memory_limit=kw['memory_limit']),\n"
        f"            open({str(record)!r}, 'w'))\n"
        "    def __await__(self):\n"
        "        raise SystemExit(0)\n"
        "        yield\n")
    b = fake_bin(tmp_path, "nvidia-smi", "echo 0; echo 1")
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "PYTHONPATH": str(pkg.parent)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = hpcdask("worker", "--gpus", "--scheduler-file", str(cluster["path"]), "--interface",
                   "lo", "--nthreads", "2", "--memory-limit", "1GiB", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    address = json.loads(cluster["path"].read_text())["address"]
    assert got == {"scheduler": address, "cvd": "0,1", "tls": True, "ca": True,
                   "host": "127.0.0.1", "nthreads": 2, "memory_limit": 2**30}


# --- provenance: bad files --------------------------------------------------------------------

@pytest.mark.parametrize("content, says", [
    ("{not json", "is not JSON"),
    ('{"address": "tls://1.2.3.4:8786"}', "is not an hpcdask provenance record"),
    ('["a"]', "is not an hpcdask provenance record"),
    ('{"kind": "hpcdask-provenance", "format": 99}', "has provenance format 99"),
    ('{"kind": "hpcdask-provenance", "format": 1, "roles": {"x": {"python": 3}}}',
     'has no valid "roles"'),
])
def test_versions_against_a_malformed_or_foreign_file_is_one_line_exit_2(tmp_path, content, says):
    f = tmp_path / "provenance.json"
    f.write_text(content)
    proc = hpcdask("versions", "--against", str(f), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_versions_against_a_missing_file_is_one_line_exit_2(tmp_path):
    proc = hpcdask("versions", "--against", str(tmp_path / "nope.json"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cannot read" in proc.stderr


# --- Jupyter next to the cluster --------------------------------------------------------------

def http(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        return opener.open(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture(scope="module")
def lab(cluster):
    log = cluster["logs"] / "jupyter.log"
    root = cluster["logs"] / "notebooks"
    root.mkdir()
    proc = start(["jupyter", "--scheduler-file", str(cluster["path"]), "--port", "0",
                  "--root-dir", str(root)], log)
    token_file = cluster["dir"] / "jupyter-token"
    deadline = time.time() + 120
    port = None
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, log.read_text()
        text = log.read_text()
        if port is None and "ssh -N -L " in text:
            port = int(text.split("ssh -N -L ", 1)[1].split(":", 1)[0])
        if port and token_file.exists() and "is running at" in text:
            break
        time.sleep(0.2)
    token = token_file.read_text().strip()
    try:
        yield {"port": port, "token": token, "token_file": token_file,
               "proc": proc, "log": log, "root": root, "url": f"http://127.0.0.1:{port}"}
    finally:
        assert stop(proc) == 0, log.read_text()
        assert not token_file.exists()  # removed when the lab ends
        # Browsers came and went while the dashboard's websocket sent: no traceback of the
        # proxy's, and the token (passed as ?token= by the tests) never in the log.
        text = log.read_text()
        assert "WebSocketClosedError" not in text and token not in text, text


def test_lab_token_is_private_and_never_shown(lab):
    assert stat_mode(lab["token_file"]) == 0o600
    assert len(lab["token"]) >= 40
    assert lab["token"] not in lab["log"].read_text()
    assert not any(lab["token"] in " ".join(p.cmdline()) for p in family(lab["proc"].pid))
    text = lab["log"].read_text()
    assert f"ssh -N -L {lab['port']}:127.0.0.1:{lab['port']} -J LOGIN " in text
    assert f"http://localhost:{lab['port']}/lab?token=TOKEN" in text
    assert f"cat {lab['token_file']}" in text


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def family(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def test_lab_answers_200_with_the_token_and_403_without(lab):
    assert http(f"{lab['url']}/lab?token={lab['token']}") == 200
    assert http(f"{lab['url']}/api/status", lab["token"]) == 200
    assert http(f"{lab['url']}/api/status") == 403
    assert http(f"{lab['url']}/api/status", "wrong-token") == 403
    assert http(f"{lab['url']}/api/contents") == 403
    assert http(f"{lab['url']}/lab") == 302  # to the login page, nothing of the lab


def test_nothing_of_the_lab_listens_off_loopback(lab):
    # A kernel too: started through the lab's API, so its sockets are the lab's children's.
    req = urllib.request.Request(f"{lab['url']}/api/kernels", data=b"{}", method="POST",
                                 headers={"Authorization": f"token {lab['token']}"})
    kernel = json.loads(urllib.request.urlopen(req, timeout=30).read())
    try:
        deadline = time.time() + 60
        while len(family(lab["proc"].pid)) < 2:
            assert time.time() < deadline, "no kernel process"
            time.sleep(0.2)
        time.sleep(2)
        listening = [(p.pid, c.laddr) for p in family(lab["proc"].pid)
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 2  # the lab and the kernel's ZMQ ports
        assert all(addr.ip == "127.0.0.1" for _, addr in listening), listening
    finally:
        req = urllib.request.Request(f"{lab['url']}/api/kernels/{kernel['id']}", method="DELETE",
                                     headers={"Authorization": f"token {lab['token']}"})
        urllib.request.urlopen(req, timeout=30)


NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": [
            "import dask.array as da\n", "import hpcdask\n",
            "from distributed import get_client\n", "from hpcdask.connect import cluster_info\n",
            "client = hpcdask.client()\n",
            "print('same client:', get_client() is client)\n",
            "print('scheduler:', client.scheduler.address)\n"]},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": [
            "x = da.arange(1_000_000, chunks=100_000)\n",
            "print('sum:', int(x.sum().compute()))\n",
            "print('workers:', sorted(cluster_info(client)['workers']))\n"]},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_notebook_sums_a_dask_array_on_the_cluster_headless(cluster, lab, tmp_path):
    nb = tmp_path / "sum.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    env = {**os.environ, "HPCDASK_SCHEDULER_FILE": str(cluster["path"])}  # as the lab's kernels get
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute",
                           "--output", "done.ipynb", str(nb)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = json.loads((tmp_path / "done.ipynb").read_text())
    texts = [o.get("text", "") for c in done["cells"] for o in c["outputs"]]
    out = "".join("".join(t) if isinstance(t, list) else t for t in texts)
    address = json.loads(cluster["path"].read_text())["address"]
    assert "same client: True\n" in out
    assert f"scheduler: {address}\n" in out and address.startswith("tls://127.0.0.1:")
    assert "sum: 499999500000\n" in out
    assert "workers: ['tls://127.0.0.1:" in out
    assert not [o for c in done["cells"] for o in c["outputs"] if o["output_type"] == "error"]


def test_notebook_without_a_cluster_is_told_how(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HPCDASK_SCHEDULER_FILE"}
    proc = subprocess.run([sys.executable, "-c", "import hpcdask; hpcdask.client()"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "no cluster named: pass hpcdask.client('/path/to/scheduler.json')" in proc.stderr


@pytest.mark.parametrize("args, env, says", [
    (["--ip", "192.0.2.254"], {}, "--ip 192.0.2.254 (192.0.2.254) is not an address of "),
    (["--ip", "no-such-host.invalid"], {}, "--ip no-such-host.invalid: no such address or host "
                                           "name on "),
    (["--base-url", "node/h/1"], {}, "--base-url 'node/h/1': give a path that starts with /, "
                                     "as a reverse proxy passes it, e.g. --base-url /node/"),
    ([], {"JUPYTER_TOKEN": "short"}, "JUPYTER_TOKEN has 5 characters (or spaces); give at least "
                                     "16 without spaces"),
])
def test_jupyter_bad_listen_options_are_one_line_exit_2(tmp_path, args, env, says):
    """Behind Open OnDemand the lab takes its address, prefix and token from the job; a wrong
    one is refused before anything starts (no token file, no lab)."""
    proc = hpcdask("jupyter", "--scheduler-file", str(tmp_path / "none.json"), *args,
                   env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcdask: error: ") and says in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_real_chromium_shows_the_lab(lab):
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: apt-get install chromium (tests/setup-host.sh)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "jupyterlab.png"
    shot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--window-size=1280,800", "--virtual-time-budget=20000"]
    url = f"{lab['url']}/lab?token={lab['token']}"
    profile = lab["root"].parent / "chromium-profile"

    def browse(*what: str) -> subprocess.CompletedProcess:
        shutil.rmtree(profile, ignore_errors=True)
        return subprocess.run([chromium, *flags, f"--user-data-dir={profile}", *what, url],
                              capture_output=True, text=True, timeout=180)

    dom = browse("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The lab's own shell rendered by its JavaScript, not a login or error page.
    assert 'id="jp-main-dock-panel"' in dom.stdout or "jp-LabShell" in dom.stdout, dom.stdout[:2000]
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title.startswith("JupyterLab"), title  # not "403: Forbidden" or the login page
    png = browse(f"--screenshot={shot}")
    assert png.returncode == 0, png.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


@pytest.fixture
def other_service():
    """Another service on this node's loopback (as another user's would be): the lab's proxy
    must not reach it."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_dashboard_comes_through_the_labs_proxy_and_nothing_else(cluster, lab,
                                                                     other_service):
    port = json.loads(cluster["path"].read_text())["services"]["dashboard"]
    url, token = lab["url"], lab["token"]
    code, body = get(f"{url}/proxy/127.0.0.1:{port}/status", token)
    assert code == 200 and "bokeh" in body.lower(), (code, body[:500])
    assert get(f"{url}/proxy/{port}/individual-plots.json", token)[0] == 200
    assert get(f"{url}/proxy/127.0.0.1:{port}/status")[0] in (302, 403)  # no token: nothing
    # No open proxy: another port, another host, the absolute form: refused.
    for path in (f"127.0.0.1:{other_service}/", f"{other_service}/", f"localhost:{other_service}/",
                 f"absolute/127.0.0.1:{other_service}/", f"absolute/{other_service}/",
                 f"10.255.255.1:{port}/status", f"[::1]:{port}/status"):
        assert get(f"{url}/proxy/{path}", token)[0] in (403, 404), path
    assert get(f"http://127.0.0.1:{other_service}/")[0] == 200  # it is there, only refused
    # Nor through the scheduler's dashboard: distributed's own /proxy route is off.
    assert get(f"http://127.0.0.1:{port}/proxy/{other_service}/127.0.0.1/")[0] == 404
    text = lab["log"].read_text()
    assert (f"jupyter: the dashboard, through the lab: http://localhost:{lab['port']}/proxy/"
            f"127.0.0.1:{port}/status (the same tunnel and token)") in text, text


def test_kernels_and_dask_panes_link_the_dashboard_through_the_lab(cluster, lab):
    port = json.loads(cluster["path"].read_text())["services"]["dashboard"]
    link = f"/proxy/127.0.0.1:{port}/status"
    # A kernel the lab starts gets the link in its environment; its Client's dashboard_link is
    # then the lab's path (the same environment, in a process of our own).
    before = {p.pid for p in family(lab["proc"].pid)}
    req = urllib.request.Request(f"{lab['url']}/api/kernels", data=b"{}", method="POST",
                                 headers={"Authorization": f"token {lab['token']}"})
    kernel = json.loads(urllib.request.urlopen(req, timeout=30).read())
    try:
        deadline = time.time() + 60
        while not (new := [p for p in family(lab["proc"].pid) if p.pid not in before]):
            assert time.time() < deadline, "no kernel process"
            time.sleep(0.2)
        env = new[0].environ()
    finally:
        req = urllib.request.Request(f"{lab['url']}/api/kernels/{kernel['id']}", method="DELETE",
                                     headers={"Authorization": f"token {lab['token']}"})
        urllib.request.urlopen(req, timeout=30)
    assert env.get("DASK_DISTRIBUTED__DASHBOARD__LINK") == link, sorted(env)
    assert env.get("HPCDASK_SCHEDULER_FILE") == str(cluster["path"]), sorted(env)
    proc = subprocess.run(
        [sys.executable, "-c", "import hpcdask; print(hpcdask.client().dashboard_link)"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HPCDASK_SCHEDULER_FILE": str(cluster["path"]),
             "DASK_DISTRIBUTED__DASHBOARD__LINK": env["DASK_DISTRIBUTED__DASHBOARD__LINK"]})
    assert proc.returncode == 0 and proc.stdout == f"{link}\n", proc.stdout + proc.stderr
    # dask-labextension's panes: their defaults (the lab's overrides), and the plots are found
    # through the proxy (checked from the browser, which holds the token; here: in the URL).
    code, body = get(f"{lab['url']}/lab/api/settings/dask-labextension:plugin", lab["token"])
    assert code == 200, code
    props = json.loads(body)["schema"]["properties"]
    assert props["defaultURL"]["default"] == f"/proxy/127.0.0.1:{port}", props["defaultURL"]
    assert props["browserDashboardCheck"]["default"] is True
    assert props["hideClusterManager"]["default"] is True
    # A compute node has no internet: the lab neither offers Jupyter's news nor checks updates.
    code, body = get(f"{lab['url']}/lab/api/settings/@jupyterlab/apputils-extension:notification",
                     lab["token"])
    assert code == 200, code
    props = json.loads(body)["schema"]["properties"]
    assert props["fetchNews"]["default"] == "false", props["fetchNews"]
    assert props["checkForUpdates"]["default"] is False, props["checkForUpdates"]
    check = urllib.parse.quote(f"{lab['url']}/proxy/127.0.0.1:{port}?token={lab['token']}",
                               safe="")
    code, body = get(f"{lab['url']}/dask/dashboard-check/{check}", lab["token"])
    assert code == 200, (code, body)
    found = json.loads(body)
    assert found["isActive"] is True, found
    assert any("Task Stream" in name for name in found["plots"]), found


def test_real_chromium_draws_the_dashboard_through_the_lab(cluster, lab):
    """Bokeh's document comes over its websocket through the lab's proxy: the workers table
    is drawn (with the lab's token in the URL, as a user's first visit)."""
    from testcluster import browser

    port = json.loads(cluster["path"].read_text())["services"]["dashboard"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-through-lab.png"
    seen = browser.screenshot(
        f"{lab['url']}/proxy/127.0.0.1:{port}/workers?token={lab['token']}", shot,
        ready=f"{browser.BOKEH_DRAWN} && {browser.bokeh_column('name')}.includes('Total (')",
        timeout=90)
    assert seen["title"] == "Dask: Workers", seen
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_script_writes_provenance_with_its_exit_status(cluster, tmp_path):
    script = tmp_path / "mine.py"
    script.write_text("from distributed import get_client\n"
                      "assert get_client().submit(sum, [1, 2]).result() == 3\n"
                      "raise SystemExit(7)\n")
    proc = hpcdask("client", str(script), "--scheduler-file", str(cluster["path"]), cwd=tmp_path)
    assert proc.returncode == 7, proc.stderr
    rec = json.loads((tmp_path / "hpcdask-output" / "mine" / "provenance.json").read_text())
    assert rec["exit_status"] == 7 and rec["command"][1] == "client"
    # An output folder that cannot be made: the script's own result still stands, one warning.
    (tmp_path / "file").write_text("")
    proc = hpcdask("client", str(script), "--scheduler-file", str(cluster["path"]),
                   "--output", str(tmp_path / "file" / "sub"), cwd=tmp_path)
    assert proc.returncode == 7
    assert "could not write" in proc.stderr and "Traceback" not in proc.stderr
