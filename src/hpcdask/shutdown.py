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

import asyncio
import logging
import os
import signal

NOISY = ("distributed", "tornado", "asyncio")
#: Where distributed logs a closed connection at INFO *with its traceback*: batched.py's
#: "Batched Comm Closed" and core.py's "Lost connection to". Routine whenever a peer stops first
#: (a time limit stops every process of a job within milliseconds, in no particular order).
#: And tornado.application, which reports distributed's listener stopping under a TLS handshake,
#: and distributed.worker, whose heartbeat to a scheduler that is closing fails.
#: And distributed.protocol.core and comm.utils, whose "Failed to Serialize" (CRITICAL) and
#: ERROR are a reply to a peer cut off ("Event loop is closed") when a worker closes under it: a
#: drain that timed out closes a worker mid-replication.
#: And distributed.utils, whose log_errors reports a closing worker's last call to its nanny
#: when the nanny's socket closed before the TLS handshake (tornado: TORNADO_NOT_IDLE).
#: And distributed.scheduler, whose log_errors reports a worker's stream handler cancelled by
#: the scheduler's own close (dask-jobqueue's clusters close their scheduler in the client).
CLOSED_CONNECTION_LOGGERS = ("distributed.batched", "distributed.core", "tornado.application",
                             "distributed.worker", "distributed.protocol.core",
                             "distributed.comm.utils", "distributed.utils",
                             "distributed.scheduler")
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."
#: distributed's worker, serving data to a peer whose connection closed mid-transfer (the peer
#: stopped or died; it asks again elsewhere): logged as an ERROR with a traceback.
GET_DATA_FAILED = "failed during get data with %s -> %s"
#: distributed's worker, fetching a task's input from a peer whose connection closed (the peer
#: was killed, preempted or stopped; the scheduler finds the data elsewhere or recomputes it):
#: logged as an ERROR with a traceback.
GATHER_DEP_FAILED = "Worker stream died during communication: %s"
#: What a closing worker's own pending calls raise when its loop or its connection pool closed
#: under them (a drain that timed out or failed closes the worker as the scheduler drops it).
CLOSED_UNDER_US = ("Event loop is closed", "ConnectionPool is closed")
#: tornado's words when a connection's socket closed before its TLS handshake could start.
TORNADO_NOT_IDLE = "IOStream is not idle; cannot convert to SSL"


class NoClosedConnectionTraceback(logging.Filter):
    """Keep the line of an INFO (or DEBUG) record about a closed connection, drop its traceback.
    WARNING and above are left alone: those are distributed's judgement that something failed,
    with one exception, a race of distributed's own: a TLS handshake that fails (the peer gave
    up) while the listener stops makes comm/tcp.py's warning read the stopped listener's
    address, and tornado logs the ValueError as an ERROR with two tracebacks. That one becomes
    the INFO line it was meant to be. And a worker's heartbeat that meets a closed connection
    becomes one line with its cause: an INFO line when this process's workers are closing
    anyway (an orderly stop closes the worker's connections under a heartbeat on its way), a
    WARNING otherwise (distributed retries at the next heartbeat); so does a transfer to a peer
    whose connection closed (:data:`GET_DATA_FAILED`: a cluster stopping all at once, where one
    worker still serves another that is going), and a fetch from a peer that died
    (:data:`GATHER_DEP_FAILED`: a worker killed or preempted mid-workload). And a call cut off by its
    own worker closing (:data:`CLOSED_UNDER_US`: a drain that timed out or failed; or
    :data:`TORNADO_NOT_IDLE`: its nanny, stopping too, closed the socket of the worker's last
    call before the TLS handshake) becomes an INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.WARNING and isinstance(exc, OSError):  # CommClosedError too
            _one_line(record)
        elif record.msg == GET_DATA_FAILED and isinstance(exc, OSError):
            closing = _workers_closing()
            _one_line(record, logging.INFO if closing else logging.WARNING,
                      "a peer's connection closed while this worker sent it data (%s -> %s: "
                      "%s: %s)" + ("; this worker is closing" if closing else ""),
                      (*record.args, type(exc).__name__, exc))
        elif record.msg == GATHER_DEP_FAILED and isinstance(exc, OSError):
            closing = _workers_closing()
            _one_line(record, logging.INFO if closing else logging.WARNING,
                      "a peer's connection closed while this worker fetched data from it (%s: "
                      "%s: %s); the scheduler finds the data elsewhere or recomputes it"
                      + ("; this worker is closing" if closing else ""),
                      (*record.args, type(exc).__name__, exc))
        elif record.msg == HEARTBEAT_FAILED and isinstance(exc, OSError):
            closing = _workers_closing()
            _one_line(record, logging.INFO if closing else logging.WARNING,
                      "Failed to communicate with scheduler during heartbeat (%s: %s)"
                      + ("; this worker is closing" if closing else ""),
                      (type(exc).__name__, exc))
        elif (isinstance(exc, RuntimeError) and str(exc) in CLOSED_UNDER_US
              or isinstance(exc, ValueError) and str(exc) == TORNADO_NOT_IDLE) \
                and _workers_closing():
            _one_line(record, logging.INFO,
                      "a connection to a peer was cut off as this worker closed (%s)", (exc,))
        elif isinstance(exc, asyncio.CancelledError) and _schedulers_closing():
            _one_line(record, logging.INFO,
                      "a worker's connection was cut off as this scheduler closed (%s)",
                      (type(exc).__name__,))
        elif (isinstance(exc, ValueError) and "non-started TCPListener" in str(exc)
              and isinstance(exc.__context__, OSError)):
            _one_line(record, logging.INFO,
                      "a TLS handshake failed (%s) while this listener was stopping",
                      (exc.__context__,))
        return True


def _workers_closing() -> bool:
    """True when this process holds workers and every one of them is closing or closed.
    distributed keeps no public list of a process's workers; ``Worker._instances`` (a WeakSet,
    which its own ``get_worker`` reads too) is the one it has."""
    from distributed import Worker
    from distributed.core import Status

    workers = list(Worker._instances)
    return bool(workers) and all(
        w.status in (Status.closing, Status.closed, Status.closing_gracefully, Status.failed)
        for w in workers)


def _schedulers_closing() -> bool:
    """True when this process holds schedulers and every one of them is closing or closed
    (``Scheduler._instances``, as :func:`_workers_closing` reads the workers')."""
    from distributed import Scheduler
    from distributed.core import Status

    schedulers = list(Scheduler._instances)
    return bool(schedulers) and all(s.status in (Status.closing, Status.closed)
                                    for s in schedulers)


def _one_line(record: logging.LogRecord, level: int | None = None, msg: str | None = None,
              args: tuple = ()) -> None:
    """RECORD without its traceback; with LEVEL, at that level and saying MSG % ARGS instead."""
    record.exc_info = None
    record.exc_text = None
    if level is not None:
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.msg, record.args = msg, args


def calm_closed_connections() -> None:
    """Install :class:`NoClosedConnectionTraceback` on distributed's loggers that need it (once).
    A logger's filters see every record logged through it, whatever the handlers."""
    for name in CLOSED_CONNECTION_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoClosedConnectionTraceback) for f in logger.filters):
            logger.addFilter(NoClosedConnectionTraceback())


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


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (shared by this node's worker processes) ignoring
    the batch system's warning signals, as multiprocessing has it ignore SIGINT and SIGTERM: it
    is a process of the job, so it gets them too, and USR1/USR2 would kill it (its relaunch
    prints tracebacks) while the workers drain or stop."""
    from multiprocessing import resource_tracker

    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def dask_setup(worker=None) -> None:
    """Preload hook, in the worker process: on SIGTERM (or USR1/USR2), go quiet and let the
    nanny stop us (it drains us first: hpcdask.drain).
    As a nanny's preload (``dask worker --preload-nanny``: dask-jobqueue's worker jobs) it
    installs the log filters (on import) and takes the batch system's signals: the warning signal
    (``hpcdask.warning-signal``: Grid Engine's -notify sends USR2 before qdel's SIGKILL) stops it
    as SIGTERM does (distributed's own handling: the worker closes), the other is ignored; their
    default action would kill the nanny at once and leave its worker behind."""
    from distributed import Nanny

    def on_term(signum, frame) -> None:
        quiet()

    if isinstance(worker, Nanny):
        from hpcdask.signals import warning_signal

        def on_warning(signum, frame) -> None:
            quiet()
            # Only while distributed still waits for SIGTERM: a nanny already ending (its worker
            # retired) has put back the default action, and SIGTERM would kill it mid-exit.
            if callable(signal.getsignal(signal.SIGTERM)):
                os.kill(os.getpid(), signal.SIGTERM)

        from hpcdask.memory import kill_over_budget

        kill_over_budget(worker)  # the worker process below only goes quiet at SIGTERM
        warning = warning_signal()
        start_resource_tracker()  # before the worker process needs it, and without USR1/USR2
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, on_warning if sig == warning else on_term)
        return

    # The batch system signals every process of the step: SIGTERM, and its warning signal (USR1,
    # USR2), whose default action would kill this process under the nanny's drain.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, on_term)


# Every hpcdask role imports this module (the worker processes as their preload): install there.
calm_closed_connections()
