"""Signals, in one place: how every role ends on SIGINT/SIGTERM (a Slurm time limit, scancel,
preemption) or on the batch system's early warning (``hpcdask.warning-signal``: USR1 for
``#SBATCH --signal=B:USR1@N``, USR2 for Grid Engine's ``-notify``).

A long-running role (scheduler, workers) waits in :func:`until_signalled` and stops in order (the
workers drain: see :mod:`hpcdask.drain`); a client role (``hpcdask run``, ``hpcdask client``) runs
under :class:`terminate_cleanly`, which turns SIGTERM, or the scheduler's word that the cluster is
ending (:func:`cluster_ending`), into one line and exit code 143. Either way distributed goes
quiet first (:mod:`hpcdask.shutdown`), and any second signal is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from hpcdask import batch, config, shutdown
from hpcdask.errors import BadInput

logger = logging.getLogger("hpcdask")

#: The warnings a batch system can send before it ends a job (``hpcdask.warning-signal``).
WARNING_SIGNALS = ("USR1", "USR2")


def warning_signal() -> signal.Signals:
    """The early-warning signal of this site's batch system (``hpcdask.warning-signal``)."""
    name = str(config.get("warning-signal")).upper().removeprefix("SIG")
    if name not in WARNING_SIGNALS:
        raise BadInput(f"warning-signal {name!r} is not one of {', '.join(WARNING_SIGNALS)}; "
                       f"e.g. HPCDASK_WARNING_SIGNAL=USR1 (Slurm --signal=B:USR1@N) or USR2 "
                       f"(Grid Engine -notify)")
    return signal.Signals[f"SIG{name}"]


def stop_signals() -> tuple[signal.Signals, ...]:
    """Every signal that stops a long-running role: SIGINT, SIGTERM and the warning signal."""
    return (signal.SIGINT, signal.SIGTERM, warning_signal())


async def until_signalled(stop: asyncio.Event, finished) -> str:
    """Wait for ``finished`` or a stop signal (SIGINT, SIGTERM, the warning signal); return the
    signal's name, or "finished". Distributed goes quiet at the signal: see shutdown.py."""
    loop = asyncio.get_running_loop()
    got: list[str] = []

    def on_signal(sig: int) -> None:
        got.append(signal.Signals(sig).name)
        ignore_signals()
        shutdown.quiet()
        stop.set()

    for sig in stop_signals():
        loop.add_signal_handler(sig, on_signal, sig)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, asyncio.ensure_future(finished)],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        # From the loop's handler straight to SIG_IGN, never through SIG_DFL: asyncio's
        # remove_signal_handler (and its close(), which calls it) resets a signal to SIG_DFL, and
        # a late signal then ends the role mid-cleanup (blocking it helps the main thread only:
        # any other thread of the process takes it). asyncio has no call that forgets a handler
        # without resetting it, so its table is emptied here, after the signals are ignored.
        ignore_signals()
        for sig in stop_signals():
            loop._signal_handlers.pop(sig, None)  # noqa: SLF001 - see above
        if not loop._signal_handlers:  # noqa: SLF001
            signal.set_wakeup_fd(-1)  # as remove_signal_handler does with the last one
    waiter.cancel()
    return got[0] if got else "finished"


def ignore_signals() -> None:
    """Once a role stops, SIGINT/SIGTERM are ignored: the batch system signals every process of
    the step and the jobscript passes its own signal on, so a second one comes, and it changes
    nothing (SIGKILL at KillWait still ends a stuck role). It must also never reach asyncio's
    handler: when it lands while the loop closes (after its wakeup pipe, before its handlers),
    Python prints a BrokenPipeError traceback ("Exception ignored when trying to write to the
    signal wakeup fd"), seen at a Slurm time limit."""
    for sig in (signal.SIGINT, signal.SIGTERM, *(signal.Signals[f"SIG{n}"] for n in WARNING_SIGNALS)):
        signal.signal(sig, signal.SIG_IGN)


class Terminated(BaseException):
    """SIGTERM arrived while a client role ran (raised by :class:`terminate_cleanly`)."""


#: The topic on which the scheduler tells its clients that the cluster is ending.
ENDING_TOPIC = "hpcdask-ending"
_ending: list[str] = []  # why, once the scheduler said so
_active: list["terminate_cleanly"] = []  # the client roles running under terminate_cleanly


def cluster_ending(event) -> None:
    """Client's handler of :data:`ENDING_TOPIC` (on the client's event loop): the scheduler got
    its job's warning signal. A client role under :class:`terminate_cleanly` stops in order (its
    main thread gets SIGTERM, marked as this); any other client only hears the line."""
    why = event[1].get("why", "the scheduler's job is ending") if isinstance(event, tuple) else str(event)
    if _ending:
        return
    _ending.append(why)
    if _active:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    else:
        logger.warning("hpcdask: the cluster is ending: %s", why)


class terminate_cleanly:
    """SIGTERM (Slurm's time limit), or the scheduler's word that the cluster is ending,
    becomes an orderly stop with one line and exit code 143."""

    MESSAGE = ("hpcdask: interrupted by SIGTERM (the job's time limit?); no results were written "
               "(provenance.json records the interruption): rerun with more time ({}) "
               "or --size small")
    ENDING = ("hpcdask: the cluster is ending: {}; no results were written (provenance.json "
              "records the interruption): rerun on a cluster with more time left")

    def __enter__(self):
        self.fired = False
        warning = warning_signal()

        def handler(signum, frame):
            # Once: a batch system signals every process of the step, and the runner and the
            # jobscript pass it on too. The line first: KillWait may not leave time for more.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(warning, signal.SIG_IGN)
            self.fired = True
            shutdown.quiet()
            if signum == warning and not _ending:  # the job's warning reached this process too
                _ending.append(f"its job got {warning.name} (its end is near)")
            line = (self.ENDING.format(_ending[0]) if _ending
                    else self.MESSAGE.format(batch.more_time()))
            print(line, file=sys.stderr, flush=True)
            raise Terminated()
        self._old = signal.signal(signal.SIGTERM, handler)
        self._old_warning = signal.signal(warning, handler)
        self._warning = warning
        _active.append(self)
        return self

    @staticmethod
    def run(client, fn, *args, local: bool = False):
        """``fn(*args)``; interrupted, a LocalCluster of ours (which got no signal itself) goes
        quiet before it is closed under its running tasks."""
        try:
            return fn(*args)
        except Terminated:
            if local:
                shutdown.quiet_cluster(client)
            raise

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._old)
        signal.signal(self._warning, self._old_warning)
        if self in _active:
            _active.remove(self)
        # Whatever the unwinding raised after the signal (a cluster going away under a context
        # manager's exit), the outcome is the signal's: exit 143, the one line already printed.
        if exc_type is Terminated or (self.fired and exc_type is not None
                                      and not issubclass(exc_type, SystemExit)):
            sys.exit(143)
        return False
