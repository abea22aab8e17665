"""``hpcdask mpi``: dask-mpi's layout, every rank an hpcdask role.

dask-mpi (``mpirun -np 4 dask-mpi --scheduler-file F`` / ``dask_mpi.initialize()``) makes MPI
rank 0 the scheduler, rank 1 the client (your script) and every other rank a worker. Here each
rank runs ``hpcdask mpi`` in the image, started by the host's launcher
(``srun --mpi=pmi2 apptainer exec IMAGE hpcdask mpi ...``), and becomes the matching hpcdask
role through hpcdask's role modules: the scheduler makes the per-cluster TLS credentials and runs
the identity guard, the workers check themselves against it, the client checks every role.

MPI carries what dask-mpi uses it for: the layout (rank, size, the ranks that share a node),
and the end: when the client rank's script is done it tells rank 0 (a message, as dask-mpi's
``send_close_signal`` tells the scheduler), which retires the workers in order and closes.
The scheduler's address and credentials go through the scheduler file, like every hpcdask role.
dask-mpi's own ``initialize()`` cannot be wrapped for this: its Scheduler and workers take no
``security`` or scheduler plugins.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import dask.utils

from hpcdask import config, scheduler, worker
from hpcdask import script as client_script
from hpcdask.errors import BadInput

logger = logging.getLogger("hpcdask")

SCHEDULER, CLIENT = 0, 1  # dask-mpi's ranks; every other rank is a worker
DONE_TAG = 7714  # the client rank's "done" message to the scheduler rank


def world():
    """MPI.COMM_WORLD, initialised through the host launcher's PMI (mpi4py imported late: only
    this command needs MPI, and a rank started without a launcher is a singleton)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def role(rank: int) -> str:
    return {SCHEDULER: "scheduler", CLIENT: "client"}.get(rank, "worker")


def check_size(size: int) -> None:
    if size < 3:
        raise BadInput(f"dask-mpi's layout needs at least 3 MPI ranks (scheduler, client, one "
                       f"worker), found {size}; start more, e.g. srun --mpi=pmi2 -n 4 ... "
                       f"hpcdask mpi ... (under srun without --mpi=pmi2 every rank is alone)")


def node_share(comm) -> int:
    """How many ranks of ``comm`` run on this node (each gets an equal share of it)."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def run(script: Path, args: tuple[str, ...], scheduler_file: Path, output: Path | None,
        tls: bool, comm=None) -> int:
    """Be this rank's role; returns the exit code (the client's script's on rank 1)."""
    comm = comm or world()
    size, rank = comm.Get_size(), comm.Get_rank()
    check_size(size)
    if not script.is_file():
        raise BadInput(f"script {script} does not exist; give the path of your Python script "
                       f"(every rank reads it from the shared filesystem), e.g. "
                       f"hpcdask mpi ./my_analysis.py --scheduler-file F")
    share = node_share(comm)
    logger.info("hpcdask mpi: rank %d of %d on %s (%d rank(s) on this node): %s", rank, size,
                socket.gethostname(), share, role(rank))
    if rank == SCHEDULER:
        scheduler.run_scheduler(scheduler_file, None, None, None, tls,
                             until=lambda: _client_done(comm))
        return 0
    if rank == CLIENT:
        return _client(script, args, scheduler_file, output, tls, comm, workers=size - 2)
    # One worker process per rank, sized once (in run_worker) to its share of the node.
    worker.run_worker(worker.WorkerSpec(scheduler_file=scheduler_file, nworkers=1,
                                        node_share=share, name=f"rank-{rank}", tls=tls))
    return 0


async def _client_done(comm) -> str:
    """On rank 0: wait (without blocking the scheduler's event loop) for the client's message."""
    req = comm.irecv(source=CLIENT, tag=DONE_TAG)
    done = False
    try:
        while True:
            done, rc = req.test()
            if done:
                return f"the client rank is done (exit {rc})"
            await asyncio.sleep(0.1)
    finally:
        if not done:  # stopped otherwise (a signal): nothing may stay posted at MPI_Finalize
            req.Cancel()


def _client(script, args, scheduler_file, output, tls, comm, workers: int) -> int:
    """Rank 1: wait for every worker rank, run the script as ``hpcdask client`` does, then tell
    rank 0 the cluster may stop (also when the script failed)."""
    rc = 1
    try:
        timeout = dask.utils.parse_timedelta(config.get("scheduler-file-timeout"))
        client_script.run_script(script, args, scheduler_file, output, tls, wait_workers=workers,
                       wait_timeout=timeout, wait_hint="HPCDASK_SCHEDULER_FILE_TIMEOUT")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        comm.send(rc, dest=SCHEDULER, tag=DONE_TAG)
    return rc

