"""The batch job this process runs in, read from its environment once: Slurm, PBS, Grid Engine.

:func:`job` fills every value in one pass, as dask-jobqueue's ``Job.__init__`` fills every unset
parameter: the job's ID and array task, its nodes, the host it was submitted from, its end time
(``HPCDASK_JOB_END``, which the jobscripts set), and this node's share of the allocation (CPUs
and memory). Outside a batch job the machine is the allocation. A value the batch system set
that cannot be read is a one-line error naming the variable.

=============  ===================  ==========================================================
system         ID (array task)      this node's CPUs and memory
=============  ===================  ==========================================================
Slurm          SLURM_JOB_ID         SLURM_CPUS_ON_NODE; SLURM_MEM_PER_NODE or _PER_CPU (MiB)
               (SLURM_ARRAY_TASK_ID)
PBS            PBS_JOBID            PBS_NODEFILE (one line per CPU), else NCPUS; the job's
               (PBS_ARRAY_INDEX)    PBS_VMEM split between its nodes (HPCDASK_NODE_MEMORY wins)
Grid Engine    JOB_ID               PE_HOSTFILE (this host's slots), else NSLOTS / NHOSTS;
               (SGE_TASK_ID)        memory: HPCDASK_NODE_MEMORY, else the h_vmem limit Grid
                                    Engine enforces on the job (RLIMIT_AS), else the machine's
=============  ===================  ==========================================================

Memory is never more than the node really allows (:func:`node_memory`).
"""

from __future__ import annotations

import os
import re
import resource
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from hpcdask.errors import BadInput

MiB = 2**20


@dataclass(frozen=True)
class Allocation:
    """What the batch system gave this node (or the whole machine when there is none)."""

    cpus: int
    memory: int
    source: str
    batch_node: bool = False  # the all-in-one job's first node: the scheduler and client run here


@dataclass(frozen=True)
class Job:
    """The batch job of this process (``system`` "none" outside one)."""

    system: str
    id: str | None
    array_task: str | None
    nodelist: str | None  # Slurm's node list, or the PBS/Grid Engine host file
    nodes: int
    submit_host: str | None
    end: float | None  # Unix seconds, or None when the job has no end time
    allocation: Allocation


def node_memory() -> int:
    """What this node really allows: distributed's MEMORY_LIMIT (the machine's memory, capped by a
    cgroup limit and RLIMIT_RSS), so a job without ``--mem`` never sizes workers to more than that."""
    from distributed.system import MEMORY_LIMIT

    return int(min(MEMORY_LIMIT, psutil.virtual_memory().total))


def system(env: Mapping[str, str] | None = None) -> str:
    """slurm, pbs, sge, or none."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env or "SLURM_CPUS_ON_NODE" in env:
        return "slurm"
    if "PBS_JOBID" in env:
        return "pbs"
    if "JOB_ID" in env and any(k in env for k in ("SGE_ROOT", "SGE_TASK_ID", "NSLOTS",
                                                  "PE_HOSTFILE")):
        return "sge"
    return "none"


def job(env: Mapping[str, str] | None = None) -> Job:
    """Every value of this process's batch job, read once from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    kind = system(env)
    get = env.get
    if kind == "slurm":
        ident, task, nodelist = get("SLURM_JOB_ID"), get("SLURM_ARRAY_TASK_ID"), get("SLURM_JOB_NODELIST")
        nodes, host = _int(env, "SLURM_JOB_NUM_NODES", 1), get("SLURM_SUBMIT_HOST")
    elif kind == "pbs":
        ident, task, nodelist = get("PBS_JOBID"), get("PBS_ARRAY_INDEX"), get("PBS_NODEFILE")
        nodes, host = len(set(_hostfile(nodelist))) or 1, get("PBS_O_HOST")
    elif kind == "sge":
        task = get("SGE_TASK_ID")
        ident, nodelist = get("JOB_ID"), get("PE_HOSTFILE")
        task = None if task in (None, "", "undefined") else task
        nodes, host = _int(env, "NHOSTS", 1), get("SGE_O_HOST")
    else:
        ident = task = nodelist = host = None
        nodes = 1
    return Job(kind, ident or None, task or None, nodelist or None, nodes, host or None,
               job_end(None, env), allocation(env))


#: How a user asks their batch system for more time, in its own words.
MORE_TIME = {"slurm": "sbatch --time", "pbs": "qsub -l walltime=...", "sge": "qsub -l h_rt=...",
             "none": "your job's time limit, e.g. sbatch --time"}


def more_time(env: Mapping[str, str] | None = None) -> str:
    """How to ask this job's batch system for more time (``sbatch --time``, ``qsub -l h_rt=...``)."""
    return MORE_TIME[system(env)]


def worker_marks(env: Mapping[str, str] | None = None) -> Path | None:
    """``$HPCDASK_WORKER_MARKS``: where this job's workers mark their nodes while they run
    (:func:`hpcdask.worker.running_mark`); None when unset."""
    env = os.environ if env is None else env
    text = env.get("HPCDASK_WORKER_MARKS", "").strip()
    return Path(text) if text else None


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The batch job's ID (None outside a job)."""
    return job(env).id


def job_end(given: float | None = None, env: Mapping[str, str] | None = None) -> float | None:
    """The job's end time in Unix seconds: ``given`` (--job-end), else $HPCDASK_JOB_END (the
    jobscripts ask the batch system for it), else None (no end time)."""
    if given:
        return float(given)
    env = os.environ if env is None else env
    text = env.get("HPCDASK_JOB_END") or ""
    if not text.strip():
        return None
    try:
        return float(text) or None
    except ValueError:
        raise BadInput(f"HPCDASK_JOB_END={text!r} is not a time in Unix seconds; set it like "
                       f"HPCDASK_JOB_END=$(date -d '+1 hour' +%s), or unset it") from None


def allocation(env: Mapping[str, str] | None = None) -> Allocation:
    """CPUs and memory of this node's share of the job: Slurm, PBS, Grid Engine, else the machine."""
    env = os.environ if env is None else env
    machine_cpus = len(os.sched_getaffinity(0))
    machine_mem = node_memory()
    batch = bool(env.get("HPCDASK_BATCH_HOST")) and env.get("HPCDASK_BATCH_HOST") == socket.gethostname()
    kind = system(env)
    if kind == "slurm":
        cpus = _int(env, "SLURM_CPUS_ON_NODE", machine_cpus)
        if env.get("SLURM_MEM_PER_NODE"):
            mem = _int(env, "SLURM_MEM_PER_NODE", 0) * MiB  # Slurm reports MB (MiB)
        elif env.get("SLURM_MEM_PER_CPU"):
            mem = _int(env, "SLURM_MEM_PER_CPU", 0) * MiB * cpus
        else:
            mem = machine_mem
    elif kind == "pbs":
        hosts = _hostfile(env.get("PBS_NODEFILE"))
        nodes = len(set(hosts)) or 1
        cpus = len(hosts) // nodes if hosts else _int(env, "NCPUS", 0) or _int(env, "PBS_NCPUS", 0)
        cpus = cpus or machine_cpus
        # PBS_VMEM (bytes) is the whole job's: each node gets its share.
        node_mem = _int(env, "HPCDASK_NODE_MEMORY", 0)
        mem = node_mem or (_int(env, "PBS_VMEM", 0) // nodes) or machine_mem
    elif kind == "sge":
        slots = _pe_slots(env.get("PE_HOSTFILE"))
        hosts = _int(env, "NHOSTS", 1) or 1
        cpus = slots or (_int(env, "NSLOTS", 0) // hosts) or machine_cpus
        # h_vmem reaches the job as its address-space limit; the environment names no memory.
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        mem = _int(env, "HPCDASK_NODE_MEMORY", 0) or (limit if limit > 0 else machine_mem)
    else:
        return Allocation(machine_cpus, machine_mem, "machine", batch)
    return Allocation(cpus, min(mem, machine_mem), kind, batch)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    """``env[name]`` as a whole number (``default`` when unset or empty); a one-line error else."""
    text = (env.get(name) or "").strip()
    if not text:
        return default
    m = re.fullmatch(r"(\d+)(?:\(x\d+\))?", text)  # Slurm writes e.g. 4(x2) for 2 nodes of 4
    if not m:
        raise BadInput(f"{name}={text!r} is not a whole number; the batch system sets it, so run "
                       f"inside the job as submitted, or unset it: env -u {name} ...")
    return int(m.group(1))


def _hostfile(path: str | None) -> list[str]:
    """The host of every line of a PBS node file (one line per CPU); [] when unreadable."""
    if not path:
        return []
    try:
        with open(path) as f:
            return [ln.split()[0] for ln in f if ln.strip()]
    except OSError:
        return []


def _pe_slots(path: str | None) -> int:
    """This host's slots in Grid Engine's PE_HOSTFILE (``host slots queue processors``)."""
    if not path:
        return 0
    me = socket.gethostname()
    try:
        with open(path) as f:
            for ln in f:
                parts = ln.split()
                if len(parts) >= 2 and parts[0].split(".")[0] == me.split(".")[0]:
                    return int(parts[1]) if parts[1].isdigit() else 0
    except OSError:
        return 0
    return 0


_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def walltime_seconds(walltime: str) -> int:
    """Seconds in a Slurm (or PBS) time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = _TIME.match(str(walltime).strip())
    if not m:
        raise BadInput(f"walltime {walltime!r} is not a Slurm time; write MM, MM:SS, HH:MM:SS, "
                       f"D-HH, D-HH:MM or D-HH:MM:SS, e.g. walltime='01:00:00'")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    parts = [g[k] for k in ("a", "b", "c") if k in g]
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]
