"""Ending on a signal without noise: Slurm's time limit (or scancel) sends SIGTERM to every
process of a job at once, scheduler, nannies and worker processes alike. Each of them then sees
its peers' connections close mid-transfer, which distributed logs as ERRORs with tracebacks, though
nothing is wrong: the stop was asked for. A process that got the signal keeps only CRITICAL from
distributed (hpcdask's own one-line messages stay), and a worker process leaves its stop to its
nanny, which closes it in order.

``hpcdask.shutdown`` is also a Dask preload module: ``Nanny(preload=["hpcdask.shutdown"])``
installs the worker processes' handler.
"""

from __future__ import annotations

import logging
import signal

NOISY = ("distributed", "tornado", "asyncio")


def quiet() -> None:
    """From now on only CRITICAL messages of distributed, tornado and asyncio in this process
    (their sub-loggers too: Dask's logging config gives some their own level)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in NOISY:
            logger.setLevel(logging.CRITICAL)


def quiet_cluster(client) -> None:
    """:func:`quiet` on the scheduler and every worker of ``client``'s cluster, best effort."""
    for call in (lambda: client.run(quiet, on_error="ignore"),
                 lambda: client.run_on_scheduler(quiet)):
        try:
            call()
        except Exception:  # noqa: BLE001 - the cluster may already be going away
            pass


def dask_setup(worker=None) -> None:
    """Preload hook, in the worker process: on SIGTERM, go quiet and let the nanny stop us."""
    def on_term(signum, frame) -> None:
        quiet()

    signal.signal(signal.SIGTERM, on_term)
