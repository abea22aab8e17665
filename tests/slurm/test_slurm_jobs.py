"""The jobscripts on the strict Slurm test cluster (tests/testcluster), every role in the test image.

Every job is submitted by the ordinary user hpcuser from the login node (no ib0 there), runs on
nodes with their own hostname, /tmp and node-local $TMPDIR, and asks for --mem, which Slurm enforces.
Required in CI: without the cluster or the image these tests FAIL (the fixtures fail loudly).
Timings (sbatch to all workers connected, sbatch to workload done) are printed and appended
to ``$HPCDASK_MEASUREMENTS`` (default /tmp/hpcdask-measurements.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LOCK_LABEL = "lock:" + hashlib.sha256((REPO / "containers" / "requirements.lock").read_bytes()
                                      ).hexdigest()[:16]
MEASURE = Path(os.environ.get("HPCDASK_MEASUREMENTS", "/tmp/hpcdask-measurements.jsonl"))
MiB = 2**20


def sif_id(path: str) -> str:
    from hpcdask import sif

    return sif.read_header(path).id


def jobscript(slurm_cluster, name: str) -> Path:
    """A jobscript as users on the cluster see it (the checkout, read-only, at its shared path)."""
    return slurm_cluster.src / "jobscripts" / "slurm" / name


def measure(name: str, **values) -> None:
    print(f"MEASURE {name}: {values}")
    with MEASURE.open("a") as f:
        f.write(json.dumps({"test": name, **values}) + "\n")


def ready_at(res) -> float:
    """When `hpcdask wait` saw every worker (Unix time it printed)."""
    m = re.search(r"worker\(s\) ready after [\d.]+s \(at ([\d.]+)\)", res.stdout)
    assert m, str(res)
    return float(m.group(1))


def wait_for_text(res_path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = re.search(pattern, res_path.read_text(errors="replace"))
        except FileNotFoundError:
            m = None
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {res_path} after {timeout}s:\n"
                         f"{res_path.read_text(errors='replace') if res_path.exists() else ''}")


def pids_in_node(slurm_cluster, node: str, pattern: str) -> list[int]:
    """Processes on NODE (its network namespace) whose command line matches PATTERN."""
    out = subprocess.run(["ip", "netns", "pids", slurm_cluster.netns(node)],
                         capture_output=True, text=True, check=True).stdout.split()
    found = []
    for pid in out:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmd):
            found.append(int(pid))
    return found


def submit(slurm_cluster, script: Path, opts: list[str], args: list[str], env: dict,
           workdir: Path, wait: bool = True, timeout: float = 300, user: str | None = None):
    """sbatch OPTS SCRIPT ARGS as hpcuser (or USER) from the login node."""
    user = user or slurm_cluster.USER
    out = slurm_cluster.run(["sbatch", "--parsable", *opts, f"--output={workdir}/slurm-%j.out",
                             f"--error={workdir}/slurm-%j.err", str(script), *args],
                            env=env, cwd=workdir, user=user).stdout
    job_id = out.strip().split(";")[0]
    if not wait:
        return slurm_cluster.job(job_id, workdir=workdir)
    return slurm_cluster.wait(job_id, timeout=timeout, workdir=workdir)


def net(addresses: dict[str, str]) -> str:
    """A regex of any address on the /24 of ADDRESSES (the cluster instance's ib0 or eth0)."""
    prefixes = {a.rsplit(".", 1)[0] for a in addresses.values()}
    assert len(prefixes) == 1, addresses
    return re.escape(prefixes.pop()) + r"\.\d+"


def metrics_of(res, workdir: Path) -> dict:
    m = re.search(r"^metrics: (\S+)$", res.stdout, re.M)
    assert m, str(res)
    return json.loads((workdir / m.group(1)).read_text())


def assert_clean(slurm_cluster, res, shared: Path) -> None:
    """What every job must leave behind: nothing. No folder in the shared dir, nothing in any
    node's $TMPDIR (the Epilog's record), /tmp or /var/tmp, and no ERROR or traceback."""
    assert not list(shared.iterdir()), (list(shared.iterdir()), str(res))
    left = {k: v for k, v in slurm_cluster.leftovers().items() if f"-job-{res.job_id}." in k}
    assert left == {}, left
    assert slurm_cluster.user_files_in_node_tmp() == []
    for text in (res.stdout, res.stderr):
        assert "Traceback" not in text and " - ERROR - " not in text, str(res)


def test_all_in_one_runs_the_default_workload_medium_on_three_nodes(slurm_cluster, job_env,
                                                                   udir):
    t0 = time.time()
    # --size medium inside --mem=2000M per node: no step is killed (Slurm enforces --mem).
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=2000M", "--time=10"], ["--size", "medium"], job_env, udir,
                 timeout=600)
    done = time.time()
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert "exceeded memory limit" not in res.stderr
    metrics = metrics_of(res, udir)
    workers = {k: v for k, v in metrics["roles"].items() if k.startswith("worker ")}
    addrs = {re.match(r"worker tls://([\d.]+):\d+$", k).group(1) for k in workers}
    assert len(workers) == 3 and len(addrs) == 3, metrics["roles"].keys()
    assert addrs == set(slurm_cluster.addresses.values())  # ib0
    for role in ("scheduler", "client", *workers):
        rep = metrics["roles"][role]
        assert rep["container"] == str(Path(job_env["HPCDASK_IMAGE"]).resolve()), (role, rep)
        # The lock, and the ID in the SIF's header: every role runs from this very file.
        assert rep["image"] == f"{LOCK_LABEL} sif:{sif_id(job_env['HPCDASK_IMAGE'])}", (role, rep)
    assert metrics["score"] == metrics["baseline_score"], metrics
    assert metrics["cluster"]["workers"] == 3
    # Memory: the workers leave their nannies' share, and on the batch node the scheduler's and
    # client's too, inside the job's 2000 MB per node (hpcdask.yaml: 160 MiB, 768 MiB).
    assert metrics["cluster"]["memory_limit"] == (3 * (2000 - 160) - 768) * MiB, metrics["cluster"]
    # The job's own folder (credentials included) is gone; nothing else is left anywhere.
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
    assert metrics["size"] == "medium"
    measure("all-in-one -N3 default workload medium", sbatch_to_workers_s=round(ready_at(res) - t0, 1),
            sbatch_to_done_s=round(done - t0, 1), workload_s=metrics["durations"]["total"])


USER_SCRIPT = """\
import os, sys
import distributed
from hpcdask.connect import cluster_info
client = distributed.get_client()
info = cluster_info(client)["workers"]
n = len(info)
total = client.submit(sum, range(10)).result()
scratch = sorted(set(client.run(lambda dask_worker: dask_worker.local_directory).values()))
limits = sorted(w["memory_limit"] for w in info.values())
print(f"USER-SCRIPT args={sys.argv[1:]} workers={n} sum={total} "
      f"scheduler={client.scheduler.address}")
print(f"SCRATCH {' '.join(scratch)} TMPDIR={os.environ.get('TMPDIR')}")
print(f"LIMITS {' '.join(map(str, limits))}")
"""


def test_user_script_gets_a_connected_client(slurm_cluster, job_env, udir):
    (udir / "my_analysis.py").write_text(USER_SCRIPT)
    # No --mem: each node's share is Slurm's default (DefMemPerCPU=1000 x 1 CPU), never the machine.
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"), ["-N2", "--time=5"],
                 ["my_analysis.py", "--arg", "1"], job_env, udir, timeout=240)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert re.search(r"^USER-SCRIPT args=\['--arg', '1'\] workers=2 sum=45 "
                     rf"scheduler=tls://{net(slurm_cluster.addresses)}:\d+$", res.stdout, re.M), str(res)
    # Worker scratch is in the job's node-local $TMPDIR (bound into the image), not /tmp.
    scratch = re.search(r"^SCRATCH (.*) TMPDIR=(\S+)$", res.stdout, re.M)
    tmpdir = f"{slurm_cluster.state_dir}/local/job-{res.job_id}"
    assert scratch.group(2) == tmpdir
    dirs = scratch.group(1).split()
    assert dirs and all(d.startswith(tmpdir + "/") for d in dirs), dirs
    limits = [int(x) for x in re.search(r"^LIMITS (.*)$", res.stdout, re.M).group(1).split()]
    assert limits == [(1000 - 160 - 500) * MiB, (1000 - 160) * MiB], limits
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))


HELPERS = """\
import os, socket

def square(x):
    return x * x

def where():
    return f"{socket.gethostname()} {os.path.realpath(__file__)}"
"""

ANALYSIS = """\
import sys
import dask.bag as db
import distributed
import helpers  # beside the script, as with `python analysis.py`

client = distributed.get_client()
print(f"PATH0 {sys.path[0]} FILE {__file__}")
total = sum(db.from_sequence(range(30), npartitions=6).map(helpers.square).compute())
print(f"TOTAL {total}")
for addr, w in sorted(client.run(helpers.where).items()):
    print(f"WORKER {w}")
"""


def test_a_helper_module_beside_the_script_imports_in_the_client_and_every_worker(
        slurm_cluster, job_env, udir):
    proj = udir / "project"
    proj.mkdir()
    (proj / "helpers.py").write_text(HELPERS)
    (proj / "analysis.py").write_text(ANALYSIS)
    slurm_cluster.give(proj)
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=5"], ["project/analysis.py"], job_env, udir,
                 timeout=240)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    real = os.path.realpath(proj)
    assert re.search(rf"^PATH0 {re.escape(real)} FILE \S*analysis.py$", res.stdout, re.M), str(res)
    assert re.search(r"^TOTAL 8555$", res.stdout, re.M), str(res)
    workers = re.findall(r"^WORKER (\S+) (\S+)$", res.stdout, re.M)
    assert len(workers) == 3 and len({h for h, _ in workers}) == 3, str(res)
    assert {f for _, f in workers} == {f"{real}/helpers.py"}, workers
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))


def test_user_script_exit_code_is_the_jobs(slurm_cluster, job_env, udir):
    (udir / "fails.py").write_text("import sys\nsys.exit(5)\n")
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N1", "--mem=1500M", "--time=5"], ["fails.py"], job_env, udir, timeout=240)
    assert res.exit_code == 5, str(res)
    assert "client ended (exit 5)" in res.stderr


def test_two_clusters_and_two_users_at_once_keep_to_their_own_files(slurm_cluster, job_env,
                                                                     udir):
    """Two all-in-one jobs of hpcuser and one of otheruser at the same time, on the same nodes:
    each has its own folder, none reads or removes another's, otheruser cannot use hpcuser's."""
    script = ("import json, sys, time, distributed\n"
              "c = distributed.get_client()\n"
              "print('FILE', sys.argv[1], c.scheduler.address, flush=True)\n"
              "time.sleep(20)\n"
              "print('SUM', c.submit(sum, range(10)).result())\n")
    other = slurm_cluster.mkdtemp("t-", user=slurm_cluster.OTHER_USER)
    other_shared = slurm_cluster.mkdtemp("clusters-", user=slurm_cluster.OTHER_USER)
    for d in (udir, other):
        (d / "hold.py").write_text(script)
    opts = ["-N1", "--mem=1200M", "--time=5"]
    env = dict(job_env)
    jobs = [submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"), opts,
                   ["hold.py", "mine"], env, udir, wait=False) for _ in range(2)]
    jobs.append(submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"), opts,
                       ["hold.py", "theirs"], {**env, "HPCDASK_SHARED_DIR": str(other_shared)},
                       other, wait=False, user=slurm_cluster.OTHER_USER))
    try:
        # While all three run: hpcuser's two folders are distinct and private.
        for job, d in zip(jobs, (udir, udir, other)):
            wait_for_text(d / f"slurm-{job.job_id}.out", r"(?m)^FILE ", 240)
        folders = sorted(Path(job_env["HPCDASK_SHARED_DIR"]).iterdir())
        assert len(folders) == 2 and all(f.stat().st_mode & 0o777 == 0o700 for f in folders)
        sched = next(folders[0].glob("scheduler-*.json"))
        # otheruser can neither read hpcuser's scheduler file or credentials nor use them.
        for f in (sched, sched.parent / "cluster.key"):
            proc = slurm_cluster.run(["cat", str(f)], user=slurm_cluster.OTHER_USER, check=False)
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        proc = slurm_cluster.run(["apptainer", "exec", job_env["HPCDASK_IMAGE"], "hpcdask",
                                  "versions", "--scheduler-file", str(sched)],
                                 env={"HPCDASK_SCHEDULER_FILE_TIMEOUT": "2s"},
                                 user=slurm_cluster.OTHER_USER, check=False, timeout=120)
        assert proc.returncode == 2, proc
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(r"(not readable by you|did not appear within 2s)", proc.stderr)
        results = [slurm_cluster.wait(j.job_id, timeout=300, workdir=d)
                   for j, d in zip(jobs, (udir, udir, other))]
    finally:
        for j in jobs:
            slurm_cluster.run(["scancel", j.job_id], check=False, user=None)
    for res in results:
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert "SUM 45" in res.stdout, str(res)
    assert_clean(slurm_cluster, results[0], Path(job_env["HPCDASK_SHARED_DIR"]))
    assert not list(other_shared.iterdir())


def test_the_users_own_interface_setting_is_honoured(slurm_cluster, job_env, udir):
    """~/.config/dask/*.yaml says eth0: the jobscripts do not override it with ib0."""
    conf = slurm_cluster.home / ".config" / "dask"
    conf.mkdir(parents=True, exist_ok=True)
    slurm_cluster.give(slurm_cluster.home / ".config")
    (conf / "hpcdask-test.yaml").write_text("hpcdask:\n  interface: eth0\n")
    try:
        (udir / "addr.py").write_text(USER_SCRIPT)
        res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                     ["-N2", "--mem=1500M", "--time=5"], ["addr.py"], job_env, udir, timeout=240)
    finally:
        (conf / "hpcdask-test.yaml").unlink()
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert re.search(rf"scheduler=tls://{net(slurm_cluster.eth_addresses)}:\d+$", res.stdout,
                     re.M), str(res)


RETIRE_SCRIPT = r'''
import os, sys, time
import distributed
import numpy as np
from hpcdask.connect import cluster_info

marks = sys.argv[1]
client = distributed.get_client()
client.wait_for_workers(2, timeout=120)
workers = sorted(cluster_info(client)["workers"])

def block(i):
    open(os.path.join(marks, f"{i}-{time.time_ns()}"), "w").close()
    return np.full(200_000, i, dtype="f8")

futs = client.map(block, range(24), pure=False)
distributed.wait(futs)
held = {w: len(keys) for w, keys in client.has_what().items()}
print(f"HELD {held}", flush=True)
t0 = time.time()
while len(cluster_info(client)["workers"]) > 1:
    assert time.time() - t0 < 120, "no worker retired"
    time.sleep(0.5)
print(f"RETIRED after {time.time() - t0:.1f}s; left {sorted(client.has_what())}", flush=True)
sums = [float(x.sum()) for x in client.gather(futs)]
assert sums == [200_000.0 * i for i in range(24)], sums
runs = len(os.listdir(marks))
print(f"RESULT ok runs={runs}", flush=True)

from hpcdask.workloads import execute
path = execute(client, "pipeline", "small", 0, sys.argv[2])
print(f"metrics: {path}", flush=True)
'''


def end_session(slurm_cluster, jobs: list[str], udir: Path, cdir: Path, shared: Path) -> None:
    """Cancel a scheduler job (JOBS[0]) and its worker jobs; the scheduler job made CDIR, so it
    removes it, and nothing else of theirs is left anywhere."""
    for j in jobs:
        slurm_cluster.run(["scancel", j], check=False)
    res = slurm_cluster.wait(jobs[0], timeout=60, workdir=udir)
    assert not cdir.exists()
    assert_clean(slurm_cluster, res, shared)


def test_scheduler_job_and_short_worker_jobs(slurm_cluster, job_env, udir):
    """The README's recipe: a scheduler job (its scheduler on eth0 for the login node's client),
    worker jobs submitted at once with --dependency (they wait for it), workers on ib0; a client on
    the login node. The short worker job retires mid-workload without losing a result."""
    cdir = Path(job_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**job_env, "HPCDASK_CLUSTER_DIR": str(cdir)}
    t0 = time.time()
    sched = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-scheduler.sbatch"), "--time=5",
                                 "--mem=1000M", env={**env, "HPCDASK_SCHEDULER_INTERFACE": "eth0"},
                                 wait=False, workdir=udir)
    jobs = [sched.job_id]
    after = f"--dependency=after:{sched.job_id}"
    try:
        # A retires ~25 s after it starts (1 min limit - 35 s margin), well before its limit.
        short = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-workers.sbatch"), "--time=1",
                                     "--mem=1000M", after, wait=False, workdir=udir,
                                     env={**env, "HPCDASK_LIFETIME_MARGIN": "35s",
                                          "HPCDASK_LIFETIME_STAGGER": "1s"})
        jobs.append(short.job_id)
        long = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-workers.sbatch"), "--time=5",
                                    "--mem=1000M", after, env=env, wait=False, workdir=udir)
        jobs.append(long.job_id)
        (udir / "retire.py").write_text(RETIRE_SCRIPT)
        marks = slurm_cluster.mkdtemp("marks-")
        # The client runs on the login node (eth0 only), in the image.
        out = slurm_cluster.run(
            ["apptainer", "exec", job_env["HPCDASK_IMAGE"], "hpcdask", "client",
             "--scheduler-file", str(cdir / "scheduler.json"), "--", "retire.py", str(marks),
             str(udir / "out")], env=env, timeout=240, cwd=udir)
        done = time.time()
        text = out.stdout
        assert "RESULT ok runs=24" in text, text + out.stderr  # nothing recomputed: data moved
        held = eval(re.search(r"^HELD (.*)$", text, re.M).group(1))  # noqa: S307 - our own dict
        assert len(held) == 2 and all(held.values()), held  # both workers held results
        assert all(re.match(rf"tls://{net(slurm_cluster.addresses)}:", w) for w in held), held
        sched_info = json.loads((cdir / "scheduler.json").read_text())
        assert sched_info["address"].startswith(f"tls://{slurm_cluster.eth_addresses['node1'][:-2]}")
        metrics = json.loads((udir / "out" / "metrics.json").read_text())
        assert metrics["score"] == metrics["baseline_score"]
        # The short job's worker retired before the time limit: the job ended on its own.
        res = slurm_cluster.wait(short.job_id, timeout=90, workdir=udir)
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert "workers ended (exit 0)" in res.stderr, str(res)
        measure("scheduler job + worker jobs", sbatch_to_done_s=round(done - t0, 1),
                retired=re.search(r"RETIRED after ([\d.]+)s", text).group(1))
    finally:
        end_session(slurm_cluster, jobs, udir, cdir, Path(job_env["HPCDASK_SHARED_DIR"]))


def test_a_killed_worker_does_not_lose_the_workload(slurm_cluster, job_env, udir):
    t0 = time.time()
    job = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-cluster.sbatch"), "-N3",
                               "--mem=2000M", "--time=10", env=job_env, wait=False, workdir=udir)
    err = udir / f"slurm-{job.job_id}.err"
    try:
        wait_for_text(err, r"fit on the cluster \.\.\.", 240)
        victim = slurm_cluster.nodes[-1]
        pids = pids_in_node(slurm_cluster, victim, r"hpcdask worker|multiprocessing|bwrap")
        assert pids, "no worker processes found on " + victim
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        killed = time.time()
        res = slurm_cluster.wait(job.job_id, timeout=400, workdir=udir)
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    metrics = metrics_of(res, udir)
    assert metrics["score"] == metrics["baseline_score"], metrics
    assert metrics["cluster"]["workers"] == 2  # the killed one did not come back
    measure("worker killed mid-workload", killed_after_s=round(killed - t0, 1),
            sbatch_to_done_s=round(time.time() - t0, 1))


def test_a_killed_scheduler_ends_the_job(slurm_cluster, job_env, udir):
    (udir / "long.py").write_text("import time, distributed\n"
                      "c = distributed.get_client()\n"
                      "print('STARTED', flush=True)\n"
                      "for _ in range(3000):\n"
                      "    c.submit(time.sleep, 0.1, pure=False).result()\n")
    job = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=10"], ["long.py"], job_env, udir, wait=False)
    out = udir / f"slurm-{job.job_id}.out"
    try:
        wait_for_text(out, "STARTED", 180)
        first = slurm_cluster.nodes[0]
        pids = pids_in_node(slurm_cluster, first, rf"python\S* \S*hpcdask scheduler .*job-{job.job_id}\.")
        assert len(pids) == 1, pids
        os.kill(pids[0], 9)
        killed = time.monotonic()
        res = slurm_cluster.wait(job.job_id, timeout=90, workdir=udir)
        took = time.monotonic() - killed
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    assert res.exit_code not in (0, None), str(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("hpcdask-job: error:")]
    assert lines == ["hpcdask-job: error: the scheduler ended (exit 137) while the client was "
                     "running; stopping the job"], str(res)
    assert took < 45, took
    deadline = time.monotonic() + 20
    while subprocess.run(["pgrep", "-f", "hpcdask worker"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, subprocess.run(
            ["pgrep", "-af", "hpcdask worker"], capture_output=True, text=True).stdout
        time.sleep(0.5)
    measure("scheduler killed", kill_to_job_end_s=round(took, 1))


MEMORY_HOG_SCRIPT = """\
import distributed
c = distributed.get_client()
limit = max(w["memory_limit"] for w in c.scheduler_info()["workers"].values())
def hog(n):
    import numpy as np
    return int(np.ones(n, dtype="uint8").sum())
print("SUBMITTED", flush=True)
c.submit(hog, 3 * limit, key="hog-3x").result()
"""


def test_a_task_killed_for_memory_ends_the_job_cleanly(slurm_cluster, job_env, udir):
    """A task allocating 3x a worker's memory limit: distributed retries it and raises
    KilledWorker, which is right. Then the job ends within seconds, with the script's exit
    code, the user's traceback as the only one, and one hpcdask line naming the task, the
    workers' memory limits and the fix; no nanny restarts a worker into removed credentials."""
    (udir / "hog.py").write_text(MEMORY_HOG_SCRIPT)
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N2", "--mem=1500M", "--time=5"], ["hog.py"], job_env, udir, timeout=300)
    assert res.state == "FAILED" and res.exit_code == 1, str(res)
    text = res.stdout + res.stderr
    assert text.count("Traceback (most recent call last)") == 1, str(res)
    lines = res.stderr.splitlines()
    killed = next((i for i, ln in enumerate(lines)
                   if ln.startswith("distributed.scheduler.KilledWorker")), None)
    assert killed is not None, str(res)
    hint = lines[killed + 1]
    assert hint.startswith("hpcdask: task 'hog-3x' "), str(res)
    assert re.search(r"memory limit of [\d.]+ [KMG]iB each", hint) and "--mem" in hint, hint
    assert "fewer workers per node" in hint and "smaller chunks" in hint, hint
    client_end = float(re.search(r"client ended \(exit 1\) after ([\d.]+)s", res.stderr).group(1))
    start = time.mktime(time.strptime(res.info["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    end = time.mktime(time.strptime(res.info["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    measure("task killed for memory", client_end_s=client_end,
            client_end_to_job_end_s=round(end - start - client_end, 1))
    assert end - start - client_end < 30, str(res)  # not the workers' 60 s stop timeout
    assert not list(Path(job_env["HPCDASK_SHARED_DIR"]).iterdir())
    assert slurm_cluster.user_files_in_node_tmp() == []


NODE_LOSS_SCRIPT = """\
import time, distributed
c = distributed.get_client()
def slow(i):
    time.sleep(0.1)
    return i * i
futures = c.map(slow, range(300), pure=False)
for n, _ in enumerate(distributed.as_completed(futures), 1):
    if n == 60:
        print("STARTED", flush=True)
print("RESULT", sum(c.gather(futures)), flush=True)
"""


def test_a_dead_node_does_not_hold_the_job(slurm_cluster, job_env, udir):
    """A node crashes mid-workload (every process of its namespace killed, its slurmd too): the
    other workers finish the map, and once the client has ended and the workers had their stop
    timeout the job ends with the client's exit code, naming the node that did not answer,
    instead of waiting until Slurm declares the node down (then CANCELLED, NODE FAIL: the job
    and the worker step run with --no-kill)."""
    (udir / "map.py").write_text(NODE_LOSS_SCRIPT)
    stop_timeout = 10
    env = {**job_env, "HPCDASK_STOP_TIMEOUT": str(stop_timeout)}
    job = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=10"], ["map.py"], env, udir, wait=False)
    out = udir / f"slurm-{job.job_id}.out"
    victim = slurm_cluster.nodes[-1]
    try:
        wait_for_text(out, "STARTED", 240)
        pids = subprocess.run(["ip", "netns", "pids", slurm_cluster.netns(victim)],
                              capture_output=True, text=True, check=True).stdout.split()
        assert pids, victim
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        # From the client's end (as the jobscript logs it) to the job leaving the queue.
        wait_for_text(udir / f"slurm-{job.job_id}.err", r"client ended \(exit 0\)", 300)
        client_end = time.monotonic()
        # The batch script's end. Slurm then keeps the job COMPLETING until it declares the
        # crashed node down (SlurmdTimeout, 45 s more here): the admin's scontrol does it now.
        deadline = time.monotonic() + 300
        while slurm_cluster.job(job.job_id, workdir=udir).state == "RUNNING":
            assert time.monotonic() < deadline, str(slurm_cluster.job(job.job_id, workdir=udir))
            time.sleep(0.2)
        after_client = time.monotonic() - client_end
        slurm_cluster.run(["scontrol", "update", f"NodeName={victim}", "State=DOWN",
                           "Reason=crashed"], check=False, user=None)
        res = slurm_cluster.wait(job.job_id, timeout=400, workdir=udir)
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
        slurm_cluster.cluster_sh("up")  # the victim's slurmd again, for the tests after this one
    assert f"RESULT {sum(i * i for i in range(300))}" in res.stdout, str(res)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    # The crashed node is named, and only it (the others' workers stopped in order).
    named = re.search(r"^hpcdask-job: these node\(s\) did not answer .*: (\S+); ", res.stderr, re.M)
    assert named and named.group(1).split(",") == [victim], str(res)
    # Slurm's record: the batch script's end (EndTime) after the client's (the jobscript's line).
    client_end_s = float(re.search(r"client ended \(exit 0\) after ([\d.]+)s", res.stderr).group(1))
    start = time.mktime(time.strptime(res.info["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    end = time.mktime(time.strptime(res.info["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    measure("node lost mid-workload", client_end_to_job_end_s=round(end - start - client_end_s, 1),
            client_end_to_script_end_seen_s=round(after_client, 1))
    assert end - start - client_end_s < stop_timeout + 5 + 10, str(res)  # + KillWait + slack


def test_wrong_interface_fails_fast_listing_the_interfaces(slurm_cluster, job_env, udir):
    t0 = time.monotonic()
    res = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-cluster.sbatch"), "-N2",
                               "--mem=1000M", "--time=5",
                               env={**job_env, "HPCDASK_INTERFACE": "ib9"}, timeout=120,
                               workdir=udir)
    took = time.monotonic() - t0
    assert res.state == "FAILED" and res.exit_code == 2, str(res)
    lines = [ln for ln in res.stderr.splitlines() if "interfaces here" in ln]
    assert len(lines) == 1, str(res)
    assert re.search(r"interface 'ib9' does not exist on node\d; interfaces here: "
                     rf"eth0 \({net(slurm_cluster.eth_addresses)}\), ib0 \({net(slurm_cluster.addresses)}\), "
                     r"lo \(127\.0\.0\.1\); "
                     r"pass one: --interface eth0", lines[0]), lines
    assert took < 30, took
    measure("wrong interface", sbatch_to_failure_s=round(took, 1))


def test_missing_image_fails_before_anything_starts(slurm_cluster, job_env, udir):
    res = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-cluster.sbatch"), "-N1",
                               "--mem=500M", "--time=2", timeout=60, workdir=udir,
                               env={**job_env, "HPCDASK_IMAGE": str(udir / "nope.sif")})
    assert res.exit_code == 2, str(res)
    assert res.stderr.strip().splitlines() == [
        f"hpcdask-job: error: image {udir / 'nope.sif'} does not exist (HPCDASK_IMAGE); "
        f"build it (make sif) or point HPCDASK_IMAGE at it"], str(res)


LOOP_SCRIPT = """\
import sys
from pathlib import Path
from distributed import get_client
from hpcdask.workloads import execute

out, client, i = Path(sys.argv[1]), get_client(), 0
print("STARTED", flush=True)
while True:  # longer than the job: Slurm's time limit ends it
    execute(client, "pipeline", "small", i, out / f"run-{i}")
    i += 1
"""


def test_a_job_at_its_time_limit_ends_cleanly_within_killwait(slurm_cluster, job_env, udir):
    """A 1-minute time limit on a workload longer than the job: every role gets SIGTERM from Slurm at
    once. The client says so in one line (exit 143), no role prints a traceback or an ERROR,
    no partial results are left, and all of it within KillWait (5 s here): nothing is left in
    the cluster folder or the nodes' $TMPDIR (the Epilog would record it), /tmp or /var/tmp.
    (A role that sees a peer's connection close before its own signal arrives logs it on one
    line, without distributed's traceback: hpcdask.shutdown.NoClosedConnectionTraceback.)"""
    (udir / "loop.py").write_text(LOOP_SCRIPT)
    out = slurm_cluster.mkdtemp("out-")
    job = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=10"], ["loop.py", str(out)], job_env, udir,
                 wait=False)
    # The limit is lowered to 1 minute once the workload runs (a user may lower, not raise, a
    # job's limit): Slurm's own time limit then strikes mid-workload however slowly a loaded
    # machine started the cluster (--time=1 from the start sometimes struck before it ran).
    stdout, deadline = udir / f"slurm-{job.job_id}.out", time.monotonic() + 240
    while not (stdout.exists() and "STARTED" in stdout.read_text()):
        assert time.monotonic() < deadline, str(slurm_cluster.job(job.job_id, workdir=udir))
        time.sleep(0.5)
    slurm_cluster.run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=1"])
    res = slurm_cluster.wait(job.job_id, timeout=300, workdir=udir)
    # Slurm itself ended it (tests/slurm/test_cluster_infra.py relies on this test for the time
    # limit the test cluster enforces: a job of its own to prove it took 60-100 s).
    assert res.state == "TIMEOUT" and "DUE TO TIME LIMIT" in res.stderr, str(res)
    assert "STARTED" in res.stdout, str(res)
    err = res.stderr.splitlines()
    from hpcdask.signals import terminate_cleanly

    assert [ln for ln in err if ln.startswith("hpcdask: interrupted by SIGTERM")] == [
        terminate_cleanly.MESSAGE.format("sbatch --time")], str(res)
    assert "hpcdask-job: stopped by SIGTERM (time limit or scancel)" in err, str(res)
    # Finished runs are whole; the interrupted one left nothing (no .partial-*, no metrics.json).
    runs = sorted(out.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert runs, str(res)
    for run in runs[:-1]:
        json.loads((run / "metrics.json").read_text())
    last = runs[-1] / "metrics.json"
    assert not last.exists() or json.loads(last.read_text()), last  # interrupted: none; else whole
    left = sorted(str(p.relative_to(out)) for p in out.rglob(".partial-*/**/*"))
    assert not list(out.rglob(".partial-*")), (left, str(res))
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
