"""Drain on signal on the Slurm test cluster (issue 23), as hpcuser: a scheduler job and worker
jobs from the jobscripts; a worker job told to go (scancel --signal=TERM, scancel -b -s USR1 as
from #SBATCH --signal=B:USR1@N) hands its results to the workers that stay, and a warned
scheduler or all-in-one job ends its client's work with one line.

Slurm records a job whose batch script exits 0 after `scancel --signal` (or -b -s) as COMPLETED,
exit 0: the signal alone does not cancel it. Required in CI like the other Slurm job tests."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from loopback.test_drain_local import LONG_CLIENT, PERSIST
from slurm.test_slurm_jobs import end_session, jobscript, measure, submit, wait_for_text

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
MB = 10**6


class Session:
    """A scheduler job and N worker jobs (dask-scheduler.sbatch, dask-workers.sbatch) sharing
    HPCDASK_CLUSTER_DIR, and the PERSIST client on the login node."""

    def __init__(self, slurm_cluster, job_env, udir, nworkers=2, worker_env=None, mem="1000M"):
        self.c, self.udir, self.mem = slurm_cluster, udir, mem
        self.cdir = Path(job_env["HPCDASK_SHARED_DIR"]) / "session"
        self.shared = Path(job_env["HPCDASK_SHARED_DIR"])
        self.env = {**job_env, "HPCDASK_CLUSTER_DIR": str(self.cdir)}
        self.sched = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-scheduler.sbatch"),
                                          "--time=10", "--mem=1000M", wait=False, workdir=udir,
                                          # on eth0: the client runs on the login node
                                          env={**self.env, "HPCDASK_SCHEDULER_INTERFACE": "eth0"}
                                          ).job_id
        self.jobs = [self.sched]
        self.workers = [self.add_worker(worker_env) for _ in range(nworkers)]
        self.client = None

    def add_worker(self, env=None) -> str:
        job = self.c.sbatch(jobscript(self.c, "dask-workers.sbatch"), "--time=10",
                            f"--mem={self.mem}", f"--dependency=after:{self.sched}", wait=False,
                            workdir=self.udir, env={**self.env, **(env or {})}).job_id
        self.jobs.append(job)
        return job

    def start_client(self, size: int, nworkers: int) -> dict:
        (self.udir / "persist.py").write_text(PERSIST)
        self.marks, self.go = self.udir / "marks.txt", self.udir / "go"
        self.out, self.err = self.udir / "client.out", self.udir / "client.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.client = self.c.popen(
                ["apptainer", "exec", self.env["HPCDASK_IMAGE"], "hpcdask", "client",
                 "--scheduler-file", str(self.cdir / "scheduler.json"), "--wait-workers",
                 str(nworkers), "--", "persist.py", str(self.marks), str(self.go), str(size)],
                env=self.env, cwd=self.udir, stdout=out, stderr=err)
        deadline = time.monotonic() + 300
        while not (m := re.search(r"HELD (.*)\n", self.out.read_text())):
            assert self.client.poll() is None and time.monotonic() < deadline, (
                self.out.read_text() + self.err.read_text() + self.logs())
            time.sleep(0.5)
        return eval(m.group(1))  # noqa: S307 - our own dict

    def logs(self) -> str:
        """The jobs' outputs so far (for a failure's message)."""
        return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted(self.udir.glob("slurm-*")))

    def finish_client(self) -> str:
        self.go.touch()
        assert self.client.wait(180) == 0, self.out.read_text() + self.err.read_text()
        out = self.out.read_text()
        total, expected = re.search(r"SUM (\d+) EXPECTED (\d+)", out).groups()
        assert total == expected, out
        return out

    def lines(self) -> int:
        return len(self.marks.read_text().splitlines())

    def end(self) -> None:
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
        end_session(self.c, self.jobs, self.udir, self.cdir, self.shared)


#: scancel's arguments per way of telling a worker job to go ("TERM twice": the same signal
#: again while the workers drain; "plain": scancel alone, SIGTERM then SIGKILL after KillWait).
SCANCEL = {"TERM": ["--signal=TERM"], "USR1": ["-b", "-s", "USR1"],
           "TERM twice": ["--signal=TERM"], "plain": []}


def signal_job(slurm_cluster, job: str, how: str) -> None:
    slurm_cluster.run(["scancel", *SCANCEL[how], job])
    if how == "TERM twice":
        time.sleep(0.3)
        slurm_cluster.run(["scancel", *SCANCEL[how], job])


@pytest.mark.parametrize(("how", "key_mb"), [("TERM", 1), ("USR1", 1), ("TERM", 50),
                                             ("TERM twice", 1), ("plain", 1)])
def test_a_signalled_worker_job_hands_its_results_over(slurm_cluster, job_env, udir, how, key_mb):
    # 40 keys of 50 MB: 1 GB on each worker, 2 GB on the one that stays (it may spill).
    s = Session(slurm_cluster, job_env, udir, mem="1000M" if key_mb == 1 else "3000M")
    sig = "USR1" if how == "USR1" else "TERM"
    try:
        held = s.start_client(key_mb * MB, 2)
        assert len(held) == 2 and all(held.values()), held
        victim = s.workers[0]
        signal_job(slurm_cluster, victim, how)
        res = slurm_cluster.wait(victim, timeout=60, workdir=udir)
        s.finish_client()
        assert s.lines() == 40, str(res)  # nothing recomputed
        # scancel alone cancels the job (Slurm records CANCELLED whatever the script's exit).
        if how == "plain":
            assert res.state == "CANCELLED", str(res)
        else:
            assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        log = res.stderr
        assert f"stopping (SIG{sig})" in log, str(res)  # every worker of the job
        # -b signals the batch script alone: it passes the signal on (scancel --signal, without
        # -b, signals the job's steps, the workers themselves; scancel alone signals both).
        assert (f"got SIG{sig}: draining the workers" in log) == (how in ("USR1", "plain")), \
            str(res)
        # One drain, however many signals came.
        assert log.count("hpcdask: draining 1 worker(s)") == 1, str(res)
        took = re.search(r"drained in ([\d.]+)s: (\d+) key", log)
        assert took and "could not drain" not in log, str(res)
        assert "Traceback" not in log and " - ERROR - " not in log, str(res)
        measure(f"drain on {how}", keys=int(took.group(2)), key_mb=key_mb,
                drain_s=float(took.group(1)))
    finally:
        s.end()


def test_a_preempted_worker_job_hands_its_results_over(slurm_cluster, job_env, udir):
    """Preemption for real: the test cluster's `scavenger` partition (PreemptMode=CANCEL,
    GraceTime=20) loses a node to a job of `debug` (PriorityTier 2), and its worker drains."""
    s = Session(slurm_cluster, job_env, udir, nworkers=1)
    preemptor = None
    try:
        victim = slurm_cluster.sbatch(
            jobscript(slurm_cluster, "dask-workers.sbatch"), "-p", "scavenger", "--exclusive",
            "--time=10", "--mem=1000M", f"--dependency=after:{s.sched}", wait=False,
            workdir=udir, env=s.env).job_id
        s.jobs.append(victim)
        held = s.start_client(MB, 2)
        assert len(held) == 2 and all(held.values()), held
        node = slurm_cluster.job(victim).info["NodeList"]
        preemptor = slurm_cluster.sbatch("#!/bin/bash\nsleep 2\n", "-p", "debug", "-w", node,
                                         "--exclusive", "--time=2", wait=False,
                                         workdir=udir).job_id
        res = slurm_cluster.wait(victim, timeout=90, workdir=udir)
        s.finish_client()
        assert s.lines() == 40, str(res)  # nothing recomputed
        log = res.stderr
        # Slurm signals the job's steps (the workers: "STEP ... CANCELLED"), not the batch script,
        # which then ends on its own, exit 0, inside GraceTime: Slurm records it COMPLETED.
        assert "CANCELLED AT" in log and "stopping (SIGTERM)" in log, str(res)
        took = re.search(r"drained in ([\d.]+)s: (\d+) key", log)
        assert took and "could not drain" not in log, str(res)
        assert "Traceback" not in log and " - ERROR - " not in log, str(res)
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        measure("drain on preemption", keys=int(took.group(2)), key_mb=1,
                drain_s=float(took.group(1)), state=res.state, exit_code=res.exit_code)
    finally:
        if preemptor:
            slurm_cluster.run(["scancel", preemptor], check=False)
        s.end()


def test_a_worker_job_with_nowhere_to_drain_says_what_was_lost(slurm_cluster, job_env, udir):
    s = Session(slurm_cluster, job_env, udir, nworkers=1)
    try:
        held = s.start_client(MB, 1)
        assert list(held.values()) == [40], held
        signal_job(slurm_cluster, s.workers[0], "TERM")
        res = slurm_cluster.wait(s.workers[0], timeout=60, workdir=udir)
        s.add_worker()  # a new worker job: the scheduler recomputes what was lost there
        s.finish_client()
        assert s.lines() == 80
        said = [ln for ln in res.stderr.splitlines() if "could not drain" in ln]
        assert len(said) == 1, str(res)
        assert "40 key(s), 38.15 MiB left (no other worker could take them)" in said[0], said
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert "Traceback" not in res.stderr, str(res)
    finally:
        s.end()


def test_a_drain_that_times_out_exits_inside_the_grace(slurm_cluster, job_env, udir):
    s = Session(slurm_cluster, job_env, udir, worker_env={"HPCDASK_DRAIN_TIMEOUT": "1ms"})
    try:
        s.start_client(MB, 2)
        t0 = time.monotonic()
        signal_job(slurm_cluster, s.workers[0], "TERM")
        res = slurm_cluster.wait(s.workers[0], timeout=60, workdir=udir)
        took = time.monotonic() - t0
        s.finish_client()
        said = [ln for ln in res.stderr.splitlines() if "could not drain" in ln]
        assert len(said) == 1 and "the drain timeout (0.001s) passed" in said[0], str(res)
        assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
        assert took < 30, took  # Slurm's KillWait
        assert "Traceback" not in res.stderr and " - ERROR - " not in res.stderr, str(res)
    finally:
        s.end()


def test_a_warned_scheduler_job_ends_the_clients_work_in_one_line(slurm_cluster, job_env, udir):
    s = Session(slurm_cluster, job_env, udir, nworkers=1)
    try:
        (udir / "long.py").write_text(LONG_CLIENT)
        out, err = udir / "client.out", udir / "client.err"
        with out.open("w") as o, err.open("w") as e:
            s.client = slurm_cluster.popen(
                ["apptainer", "exec", s.env["HPCDASK_IMAGE"], "hpcdask", "client",
                 "--scheduler-file", str(s.cdir / "scheduler.json"), "--wait-workers", "1",
                 "--output", str(udir / "out"), "--", "long.py"],
                env=s.env, cwd=udir, stdout=o, stderr=e)
        wait_for_text(out, "STARTED", 300)
        signal_job(slurm_cluster, s.sched, "USR1")
        rc = s.client.wait(60)
        lines = [ln for ln in err.read_text().splitlines() if ln.strip()]
        assert rc == 143 and len(lines) == 1, err.read_text()
        assert lines[0].startswith("hpcdask: the cluster is ending: its scheduler's job got "
                                   "SIGUSR1"), lines
        res = slurm_cluster.wait(s.sched, timeout=60, workdir=udir)
        assert "got SIGUSR1: the cluster is ending" in res.stderr, str(res)
        assert res.exit_code == 0, str(res)  # the scheduler stopped in order
    finally:
        s.end()


def test_a_warned_all_in_one_job_ends_its_client_in_one_line(slurm_cluster, job_env, udir):
    (udir / "long.py").write_text(LONG_CLIENT)
    job = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N2", "--mem=1000M", "--time=10"], ["long.py"], job_env, udir, wait=False)
    try:
        wait_for_text(udir / f"slurm-{job.job_id}.out", "STARTED", 300)
        signal_job(slurm_cluster, job.job_id, "USR1")
        res = slurm_cluster.wait(job.job_id, timeout=90, workdir=udir)
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("hpcdask:")]
    # From the scheduler, or first from scancel -b itself (it signals the batch step's processes,
    # the client among them): either way one line.
    assert len(ours) == 1 and re.match(
        r"hpcdask: the cluster is ending: its (scheduler's )?job got SIGUSR1", ours[0]), str(res)
    assert res.state == "FAILED" and res.exit_code == 143, str(res)
    assert "Traceback" not in res.stderr, str(res)
