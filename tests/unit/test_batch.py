"""hpcdask.batch: the job's environment read once, for Slurm, PBS and Grid Engine; and hpcdask's
errors as ordinary ValueError/RuntimeError subclasses, raised as such by library calls."""

from __future__ import annotations

import socket

import pytest

from hpcdask import batch
from hpcdask.errors import BadInput, HpcdaskError, NotReady, Refused

MiB = 2**20


@pytest.fixture
def big_machine(monkeypatch):
    """A node larger than any allocation below, so the batch system's numbers show through."""
    monkeypatch.setattr(batch, "node_memory", lambda: 1024 * 2**30)


def test_slurm_job(big_machine):
    env = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "c[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_HOST": "login1", "SLURM_CPUS_ON_NODE": "8",
           "SLURM_MEM_PER_NODE": "4096", "HPCDASK_JOB_END": "1900000000"}
    job = batch.job(env)
    assert (job.system, job.id, job.array_task, job.nodelist, job.nodes, job.submit_host,
            job.end) == ("slurm", "4242", "3", "c[1-2]", 2, "login1", 1900000000.0)
    assert job.allocation == batch.Allocation(8, 4096 * MiB, "slurm")


def test_pbs_job_splits_the_jobs_memory_between_its_nodes(big_machine, tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn1\nn2\nn2\nn2\n")  # one line per CPU: 2 nodes of 3
    env = {"PBS_JOBID": "77.pbs", "PBS_ARRAY_INDEX": "5", "PBS_NODEFILE": str(nodefile),
           "PBS_O_HOST": "login2", "NCPUS": "6", "PBS_VMEM": str(6000 * MiB)}
    job = batch.job(env)
    assert (job.system, job.id, job.array_task, job.nodes, job.submit_host) == \
        ("pbs", "77.pbs", "5", 2, "login2")
    assert job.allocation == batch.Allocation(3, 3000 * MiB, "pbs")


def test_grid_engine_job(big_machine, tmp_path):
    me = socket.gethostname()
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text(f"{me} 4 all.q@{me} UNDEFINED\nother 4 all.q@other UNDEFINED\n")
    env = {"JOB_ID": "901", "SGE_TASK_ID": "undefined", "NSLOTS": "8", "NHOSTS": "2",
           "PE_HOSTFILE": str(hostfile), "SGE_O_HOST": "login3", "TMPDIR": "/tmp/901.1.all.q"}
    job = batch.job(env)
    assert (job.system, job.id, job.array_task, job.nodes, job.submit_host, job.nodelist) == \
        ("sge", "901", None, 2, "login3", str(hostfile))
    assert job.allocation.cpus == 4 and job.allocation.source == "sge"
    # Without a host file: the slots split between the hosts; an array task by its number.
    env2 = {"JOB_ID": "902", "SGE_TASK_ID": "7", "NSLOTS": "8", "NHOSTS": "2"}
    assert batch.job(env2).array_task == "7" and batch.allocation(env2).cpus == 4


def test_outside_a_job_the_machine_is_the_allocation():
    job = batch.job({})
    assert (job.system, job.id, job.end, job.nodes) == ("none", None, None, 1)
    assert job.allocation.source == "machine"
    assert batch.job({"JOB_ID": "1"}).system == "none"  # JOB_ID alone is not Grid Engine


@pytest.mark.parametrize("env, name", [
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "eight"}, "SLURM_CPUS_ON_NODE"),
    ({"SLURM_JOB_ID": "1", "SLURM_MEM_PER_NODE": "4G"}, "SLURM_MEM_PER_NODE"),
    ({"PBS_JOBID": "1", "PBS_VMEM": "lots"}, "PBS_VMEM"),
    ({"JOB_ID": "1", "NSLOTS": "-3"}, "NSLOTS"),
    ({"HPCDASK_JOB_END": "tomorrow"}, "HPCDASK_JOB_END"),
])
def test_bad_values_give_one_line_naming_the_variable(env, name):
    with pytest.raises(BadInput) as e:
        batch.job(env)
    assert str(e.value).startswith(f"{name}=") and "\n" not in str(e.value)


def test_slurms_repeated_counts_read_as_this_nodes(big_machine):
    assert batch.allocation({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "4(x2)"}).cpus == 4


def test_errors_are_value_and_runtime_errors_without_click():
    import hpcdask.errors as errors

    assert issubclass(BadInput, ValueError) and issubclass(BadInput, HpcdaskError)
    assert issubclass(Refused, RuntimeError) and issubclass(NotReady, RuntimeError)
    assert "click" not in errors.__dict__
    assert (BadInput.exit_code, Refused.exit_code, NotReady.exit_code) == (2, 3, 1)
    assert Refused("x differs").one_line() == "hpcdask: refused: x differs"


def test_library_calls_raise_hpcdasks_own_errors(tmp_path):
    """What a notebook sees: a ValueError with the one-line message, no click exception."""
    import click

    from hpcdask.cluster import slurm_cluster

    with pytest.raises(ValueError) as e:  # these tests run outside the image
        slurm_cluster(image=str(tmp_path / "hpcdask.sif"))
    assert isinstance(e.value, BadInput) and not isinstance(e.value, click.ClickException)
    assert "this process runs outside the image" in str(e.value)
    with pytest.raises(ValueError, match="walltime 'soon' is not a Slurm time"):
        batch.walltime_seconds("soon")


def test_grid_engine_memory_is_the_h_vmem_limit(monkeypatch):
    """Grid Engine's environment names no memory; it enforces h_vmem as the job's address-space
    limit (RLIMIT_AS), which is the job's memory, unless the jobscript exported its share."""
    GiB = 2**30
    env = {"JOB_ID": "7", "SGE_TASK_ID": "2", "NSLOTS": "2"}
    monkeypatch.setattr(batch.resource, "getrlimit", lambda r: (3 * GiB, 3 * GiB))
    monkeypatch.setattr(batch, "node_memory", lambda: 16 * GiB)
    a = batch.allocation(env)
    assert (a.cpus, a.memory, a.source) == (2, 3 * GiB, "sge")
    assert batch.allocation({**env, "HPCDASK_NODE_MEMORY": str(GiB)}).memory == GiB
    monkeypatch.setattr(batch.resource, "getrlimit", lambda r: (-1, -1))  # no h_vmem: unlimited
    assert batch.allocation(env).memory == 16 * GiB


@pytest.mark.parametrize("ends", ["in order", "killed"])
def test_a_worker_process_marks_its_node_while_it_runs(tmp_path, ends):
    """hpcdask.worker.running_mark, in a real process: its node's mark is there while it runs and
    goes when it ends in order (the last one out removes the folder); a process killed outright,
    as on a crashed node, leaves it: the jobscript then names that node (hj_lost_nodes)."""
    import os
    import signal
    import subprocess
    import sys

    marks = tmp_path / ".running-42"
    code = ("import sys\nfrom hpcdask.worker import running_mark\nwith running_mark() as m:\n"
            "    print(m, flush=True)\n    sys.stdin.readline()\n")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HPCDASK_WORKER_MARKS": str(marks)}) as p:
        try:
            mark = p.stdout.readline().strip()
            assert mark == str(marks / f"{socket.gethostname()}.{p.pid}")
            assert [m.name for m in marks.iterdir()] == [f"{socket.gethostname()}.{p.pid}"]
            if ends == "killed":
                p.send_signal(signal.SIGKILL)
            else:
                p.stdin.write("\n")
                p.stdin.flush()
            p.wait(30)
        finally:
            p.kill()
    if ends == "killed":
        assert [m.name for m in marks.iterdir()] == [f"{socket.gethostname()}.{p.pid}"]
    else:
        assert p.returncode == 0 and not marks.exists()
