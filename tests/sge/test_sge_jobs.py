"""Grid Engine on the test cluster (BATCH=sge): the jobscripts in jobscripts/sge/ and the Dask HPC
docs' binary-mode recipe, submitted by hpcuser from the login node, every role in the image.

Required in CI: without the cluster or the image these tests FAIL (the fixtures fail loudly).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sge, pytest.mark.slow]

MEASURE = Path("/tmp/hpcdask-measurements.jsonl")

# A user's script the project never saw: three workers, their hosts and addresses, a result.
USER_SCRIPT = """\
import socket, sys
import distributed
client = distributed.get_client()
info = client.scheduler_info()["workers"]
hosts = sorted(client.run(socket.gethostname).values())
total = client.submit(sum, range(10)).result()
squares = sum(client.gather(client.map(lambda x: x * x, range(100))))
print(f"USER-SCRIPT args={sys.argv[1:]} workers={len(info)} hosts={','.join(hosts)} "
      f"sum={total} squares={squares}")
print("WORKERS " + " ".join(sorted(info)))
sys.exit(3)
"""


def jobscript(cluster, name: str) -> Path:
    return cluster.src / "jobscripts" / "sge" / name


def measure(name: str, **values) -> None:
    print(f"MEASURE {name}: {values}")
    with MEASURE.open("a") as f:
        f.write(json.dumps({"test": name, **values}) + "\n")


def net(addresses: dict[str, str]) -> str:
    prefixes = {a.rsplit(".", 1)[0] for a in addresses.values()}
    assert len(prefixes) == 1, addresses
    return re.escape(prefixes.pop()) + r"\.\d+"


def wait_for_scheduler_file(c, cdir: Path, job_id: str, workdir: Path, timeout: float) -> None:
    """Until the scheduler job has published cdir/scheduler.json (the worker jobs need it)."""
    deadline = time.monotonic() + timeout
    while not (cdir / "scheduler.json").exists():
        assert time.monotonic() < deadline, str(c.job(job_id, workdir=workdir))
        time.sleep(0.5)


def assert_clean(cluster, job_ids: list[str], shared: Path | None, *texts: str,
                 killed: str | None = None) -> None:
    """Nothing left: no cluster folder, nothing in any job's $TMPDIR (the epilog's records),
    no file of hpcuser's in any node's /tmp, no process of hpcuser's on any machine. KILLED (JOB
    or JOB.TASK): a job (or array task) whose roles were SIGKILLed. Its $TMPDIR keeps what the
    killed roles had there (Grid Engine removes it as the job ends) and may keep the bubblewrap
    runner's .sif mount (test infrastructure, as under Slurm's KillWait: a real Apptainer mounts
    elsewhere), where Grid Engine's removal stops, so its contents stay too."""
    assert shared is None or not list(shared.iterdir()), list(shared.iterdir())
    job, _, task = (killed or "").partition(".")
    left = {k: v for k, v in cluster.leftovers().items()
            if any(f"-job-{j}." in k for j in job_ids)
            and not (killed and k.endswith(f"-job-{job}.{task or 'undefined'}.txt"))}
    assert left == {}, left
    # Another job's $TMPDIR is another test's (a killed one's may stay: see KILLED).
    files = [f for f in cluster.user_files_in_node_tmp()
             if not (m := re.search(r"/tmp/(\d+)\.(\d+)\.all\.q(/|$)", f))
             or (m.group(1) in job_ids and not (killed and m.groups()[:2] == (job, task or "1")))]
    assert files == []
    uid = pwd.getpwnam(cluster.USER).pw_uid
    for where in ("login", *cluster.nodes):
        # Only this machine's processes (the test machines share the host's PID namespace).
        pids = subprocess.run(["ip", "netns", "pids", cluster.netns(where)], capture_output=True,
                              text=True, check=True).stdout.split()
        mine = [p for p in pids if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}").stat().st_uid == uid]
        assert mine == [], (where, mine)
    for text in texts:
        assert "Traceback" not in text and " - ERROR - " not in text, text


def test_scheduler_job_with_a_script_and_an_array_of_three_worker_tasks(sge_cluster, sge_env,
                                                                        sge_udir):
    """qsub dask-scheduler.sge SCRIPT ARGS + qsub -t 1-3 dask-workers.sge: the script runs once the
    3 workers joined (3 hosts' ib0, in the image, TLS), the workers retire, the job's exit status
    is the script's, and nothing is left behind. otheruser cannot read the cluster folder."""
    c = sge_cluster
    cdir = Path(sge_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**sge_env, "HPCDASK_CLUSTER_DIR": str(cdir), "HPCDASK_WAIT_WORKERS": "3"}
    (sge_udir / "my_analysis.py").write_text(USER_SCRIPT)
    c.give(sge_udir / "my_analysis.py")
    t0 = time.time()
    # Memory decides the placement (4000M of h_vmem per node): the scheduler job and one worker
    # fit on a node, two workers do not, so the three workers land on three hosts.
    sched = c.qsub("-l", "h_vmem=1000M", str(jobscript(c, "dask-scheduler.sge")), "my_analysis.py",
                   "--arg", "1", env=env, wait=False, workdir=sge_udir)
    jobs = [sched.job_id]
    try:
        # The workers need the scheduler's folder: submit them once it is there.
        wait_for_scheduler_file(c, cdir, sched.job_id, sge_udir, 120)
        denied = c.run(["ls", str(cdir)], user=c.OTHER_USER, check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        workers = c.qsub("-t", "1-3", "-l", "h_vmem=3000M", str(jobscript(c, "dask-workers.sge")),
                         env=env, wait=False, workdir=sge_udir)
        jobs.append(workers.job_id)
        res = c.wait(sched.job_id, timeout=400, workdir=sge_udir)
        done = time.time()
        out = res.stdout
        assert res.exit_code == 3, str(res)  # the script's
        m = re.search(r"^USER-SCRIPT args=\['--arg', '1'\] workers=3 hosts=(\S+) sum=45 "
                      r"squares=328350$", out, re.M)
        assert m, str(res)
        assert m.group(1).split(",") == c.nodes, m.group(1)
        addrs = re.search(r"^WORKERS (.*)$", out, re.M).group(1).split()
        assert all(re.match(rf"tls://{net(c.addresses)}:\d+$", a) for a in addrs), addrs
        assert len({a.rsplit(":", 1)[0] for a in addrs}) == 3, addrs
        wres = c.wait(workers.job_id, timeout=120, workdir=sge_udir)
        assert wres.state == "COMPLETED" and wres.info["tasks"] == "3", str(wres)
        wout = "".join(p.read_text() for p in sorted(sge_udir.glob(f"*.o{workers.job_id}.*")))
        assert wout.count("worker ended (exit 0)") == 3, wout
        measure("sge scheduler job + 3 worker tasks + script", qsub_to_done_s=round(done - t0, 1))
    finally:
        for j in jobs:
            c.run(["qdel", j], check=False)
    assert not cdir.exists()
    assert_clean(c, jobs, Path(sge_env["HPCDASK_SHARED_DIR"]), out, wout)


def test_the_dask_docs_binary_recipe_word_for_word(sge_cluster, sge_env, sge_udir):
    """The Dask HPC docs' lines in the image: qsub -b y ... hpcdask scheduler --scheduler-file F and
    qsub -b y -t 1-3 ... hpcdask worker --scheduler-file F; a client job uses the cluster; qdel of
    the scheduler job ends the workers."""
    c = sge_cluster
    img = sge_env["HPCDASK_IMAGE"]
    f = c.mkdtemp("recipe-") / "scheduler.json"
    (sge_udir / "my_analysis.py").write_text(USER_SCRIPT.replace("sys.exit(3)", ""))
    c.give(sge_udir / "my_analysis.py")
    jobs = []
    try:
        sched = c.qsub("-b", "y", "apptainer", "exec", img, "hpcdask", "scheduler",
                       "--scheduler-file", str(f), wait=False, workdir=sge_udir)
        jobs.append(sched.job_id)
        workers = c.qsub("-b", "y", "-t", "1-3", "apptainer", "exec", img, "hpcdask", "worker",
                         "--scheduler-file", str(f), wait=False, workdir=sge_udir)
        jobs.append(workers.job_id)
        client = c.qsub("-b", "y", "apptainer", "exec", img, "hpcdask", "client",
                        "--scheduler-file", str(f), "--wait-workers", "3", "--",
                        str(sge_udir / "my_analysis.py"),  # a binary job starts in $HOME
                        timeout=300, workdir=sge_udir)
        jobs.append(client.job_id)
        assert client.state == "COMPLETED" and client.exit_code == 0, str(client)
        assert re.search(r"^USER-SCRIPT args=\[\] workers=3 hosts=\S+ sum=45 squares=328350$",
                         client.stdout, re.M), str(client)
        # qdel of the scheduler job ends the workers.
        c.run(["qdel", sched.job_id])
        c.wait(sched.job_id, timeout=60, workdir=sge_udir)
        wres = c.wait(workers.job_id, timeout=120, workdir=sge_udir)
        assert wres.info["tasks"] == "3", str(wres)
    finally:
        for j in jobs:
            c.run(["qdel", j], check=False)
    # (qdel SIGKILLs a binary job: its scheduler file stays, as with `kill -9`; hpcdask scheduler
    # takes over a dead one's file.)
    assert_clean(c, jobs, None, client.stdout, killed=sched.job_id)


def task_processes(job_id: str, task: int) -> tuple[int, list[int]]:
    """The jobscript shell of array task TASK of JOB_ID (its environment says so; its parent is
    Grid Engine's sge_shepherd) and every process below it: the worker, its nanny, the
    bubblewrap runner, ... (the test machines share the host's PID namespace)."""
    parent, shell = {}, None
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if shell is None:
                env = set((p / "environ").read_bytes().split(b"\0"))
                ppid = parent[int(p.name)]
                if ({f"JOB_ID={job_id}".encode(), f"SGE_TASK_ID={task}".encode()} <= env
                        and Path(f"/proc/{ppid}/comm").read_text().strip() == "sge_shepherd"):
                    shell = int(p.name)
        except (OSError, IndexError, ValueError):
            continue
    assert shell, f"no jobscript of task {job_id}.{task} runs"
    below, grew = set(), True
    while grew:
        new = {pid for pid, pp in parent.items() if (pp == shell or pp in below) and pid not in below}
        below |= new
        grew = bool(new)
    return shell, sorted(below)


# A workload whose results sit on every worker (the client holds them): 400 tasks of 0.1 s, summed.
KILL_SCRIPT = """\
import time
import distributed
client = distributed.get_client()
def slow(i):
    time.sleep(0.1)
    return 2 * i
parts = client.map(slow, range(400))
total = client.submit(sum, parts)
while sum(f.done() for f in parts) < 60:
    time.sleep(0.1)  # under way on every worker
print("STARTED", flush=True)
result = total.result()
print(f"RESULT {'ok' if result == 2 * sum(range(400)) else 'WRONG'} {result} "
      f"workers={len(client.scheduler_info()['workers'])}")
"""


def test_a_killed_worker_task_does_not_lose_the_workload(sge_cluster, sge_env, sge_udir):
    """qsub dask-scheduler.sge SCRIPT + qsub -t 1-3 dask-workers.sge; mid-workload every process
    of worker task 3 is SIGKILLed (its jobscript shell lives on, as its shepherd would): the
    script's result is still right (the lost blocks are recomputed on the two others), the
    scheduler job exits 0, the killed task says so in one line, the other two retire (exit 0),
    and nothing is left behind."""
    c = sge_cluster
    cdir = Path(sge_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**sge_env, "HPCDASK_CLUSTER_DIR": str(cdir), "HPCDASK_WAIT_WORKERS": "3"}
    (sge_udir / "work.py").write_text(KILL_SCRIPT)
    c.give(sge_udir / "work.py")
    t0 = time.time()
    sched = c.qsub("-l", "h_vmem=1000M", str(jobscript(c, "dask-scheduler.sge")), "work.py",
                   env=env, wait=False, workdir=sge_udir)
    jobs = [sched.job_id]
    try:
        wait_for_scheduler_file(c, cdir, sched.job_id, sge_udir, 120)
        workers = c.qsub("-t", "1-3", "-l", "h_vmem=3000M", str(jobscript(c, "dask-workers.sge")),
                         env=env, wait=False, workdir=sge_udir)
        jobs.append(workers.job_id)
        out = sge_udir / f"hpcdask-scheduler.o{sched.job_id}"
        deadline = time.monotonic() + 300
        while "STARTED" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, str(c.job(sched.job_id, workdir=sge_udir))
            time.sleep(0.2)
        shell, pids = task_processes(workers.job_id, 3)
        assert pids, f"task 3's jobscript (pid {shell}) runs no worker"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed = time.time()
        assert "RESULT" not in out.read_text(), out.read_text()  # killed mid-workload
        res = c.wait(sched.job_id, timeout=300, workdir=sge_udir)
        done = time.time()
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert re.search(r"^RESULT ok 159600 workers=2$", res.stdout, re.M), str(res)
        c.wait(workers.job_id, timeout=120, workdir=sge_udir)
        tasks = {t: c.job(workers.job_id, workdir=sge_udir, task=t) for t in (1, 2, 3)}
        assert [tasks[t].exit_code for t in (1, 2, 3)] == [0, 0, 137], {t: str(r) for t, r in tasks.items()}
        wout = {t: (sge_udir / f"hpcdask-workers.o{workers.job_id}.{t}").read_text() for t in (1, 2, 3)}
        assert "worker ended (exit 137)" in wout[3], wout[3]
        assert all("worker ended (exit 0)" in wout[t] for t in (1, 2)), wout
        measure("sge worker task killed mid-workload", killed_after_s=round(killed - t0, 1),
                qsub_to_done_s=round(done - t0, 1))
    finally:
        for j in jobs:
            c.run(["qdel", j], check=False)
    assert not cdir.exists()
    assert_clean(c, jobs, Path(sge_env["HPCDASK_SHARED_DIR"]), res.stdout, wout[1], wout[2],
                 killed=f"{workers.job_id}.3")


LOOP_SCRIPT = """\
import sys
from pathlib import Path
from distributed import get_client
from hpcdask.workloads import execute

out, client, i = Path(sys.argv[1]), get_client(), 0
print("STARTED", flush=True)
while True:  # longer than the job: Grid Engine's h_rt ends it
    execute(client, "pipeline", "small", i, out / f"run-{i}")
    i += 1
"""


def test_h_rt_reached_mid_workload_ends_cleanly(sge_cluster, sge_env, sge_udir):
    """qsub -l h_rt=0:1:0 dask-scheduler.sge SCRIPT on a workload longer than that, with a 2-task
    worker array: at h_rt Grid Engine sends -notify's SIGUSR2 to every process of the job (SIGKILL
    follows after the queue's notify time, 60 s here). The jobscript says so in one line, the
    client says in one line that the cluster is ending and no results were written (exit 143),
    the scheduler retires the workers (their tasks end, exit 0), no role prints a traceback or an
    ERROR, the finished runs are whole and the interrupted one left nothing, and nothing is left
    behind."""
    c = sge_cluster
    cdir = Path(sge_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**sge_env, "HPCDASK_CLUSTER_DIR": str(cdir), "HPCDASK_WAIT_WORKERS": "2"}
    (sge_udir / "loop.py").write_text(LOOP_SCRIPT)
    c.give(sge_udir / "loop.py")
    out = c.mkdtemp("out-")
    t0 = time.time()
    sched = c.qsub("-l", "h_vmem=2000M", "-l", "h_rt=0:1:0", str(jobscript(c, "dask-scheduler.sge")),
                   "loop.py", str(out), env=env, wait=False, workdir=sge_udir)
    jobs = [sched.job_id]
    try:
        wait_for_scheduler_file(c, cdir, sched.job_id, sge_udir, 60)
        workers = c.qsub("-t", "1-2", "-l", "h_vmem=1500M", str(jobscript(c, "dask-workers.sge")),
                         env=env, wait=False, workdir=sge_udir)
        jobs.append(workers.job_id)
        res = c.wait(sched.job_id, timeout=200, workdir=sge_udir)
        done = time.time()
        wres = c.wait(workers.job_id, timeout=60, workdir=sge_udir)
    finally:
        for j in jobs:
            c.run(["qdel", j], check=False)
    text = res.stdout
    assert "STARTED" in text, str(res)
    assert res.exit_code == 143, str(res)  # the client's
    lines = text.splitlines()
    ours = [ln for ln in lines if ln.startswith("hpcdask:") and "worker(s) ready" not in ln]
    # From the scheduler, or first from -notify's signal itself (Grid Engine signals every
    # process of the job, the client among them): either way one line.
    assert len(ours) == 1 and re.match(
        r"hpcdask: the cluster is ending: its (scheduler's )?job got SIGUSR2", ours[0]), ours
    assert [ln for ln in lines if ln.startswith("hpcdask-job: got SIG")] == [
        "hpcdask-job: got SIGUSR2: the cluster is ending; the scheduler tells the clients and "
        "stops"], str(res)
    wout = "".join(p.read_text() for p in sorted(sge_udir.glob(f"*.o{workers.job_id}.*")))
    assert wres.info["tasks"] == "2" and wres.exit_code == 0, str(wres)
    assert wout.count("worker ended (exit 0)") == 2, wout
    # Finished runs are whole; the interrupted one left nothing (no .partial-*, no metrics.json).
    runs = sorted(out.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert runs, str(res)
    for run in runs[:-1]:
        json.loads((run / "metrics.json").read_text())
    last = runs[-1] / "metrics.json"
    assert not last.exists() or json.loads(last.read_text()), last
    partial = list(out.rglob(".partial-*"))
    assert not partial, ({str(p): sorted(str(f) for f in p.rglob("*")) for p in partial},
                         {r.name: sorted(f.name for f in r.iterdir()) for r in runs[-2:]})
    measure("sge h_rt reached mid-workload", qsub_to_end_s=round(done - t0, 1), runs=len(runs))
    assert not cdir.exists()
    assert_clean(c, jobs, Path(sge_env["HPCDASK_SHARED_DIR"]), text, wout)



def test_a_request_no_queue_can_meet_is_refused_at_qsub(sge_cluster, sge_env, sge_udir):
    """The jobscripts' `#$ -w e`: more h_vmem than any host has is refused by qsub itself, with
    Grid Engine's reason, instead of a job that pends forever; nothing is queued."""
    c = sge_cluster
    for name in ("dask-scheduler.sge", "dask-workers.sge"):
        proc = c.run(["qsub", "-terse", "-l", "h_vmem=64G", str(jobscript(c, name))],
                     env=sge_env, cwd=sge_udir, check=False)
        assert proc.returncode != 0 and "no suitable queues" in proc.stderr, (name, proc)
    queued = c.run(["qstat", "-u", c.USER], check=False).stdout
    assert "hpcdask-" not in queued, queued
