"""Signals, in one place: how every role ends on SIGINT/SIGTERM (a Slurm time limit, scancel).

A long-running role (scheduler, workers) waits in :func:`until_signalled` and stops in order; a
client role (``hpcdask run``, ``hpcdask client``) runs under :class:`terminate_cleanly`, which
turns SIGTERM into one line and exit code 143. Either way distributed goes quiet first
(:mod:`hpcdask.shutdown`), and any second signal is ignored.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from hpcdask import shutdown


async def until_signalled(stop: asyncio.Event, finished) -> str:
    """Wait for ``finished`` or SIGINT/SIGTERM (then distributed goes quiet: see shutdown.py)."""
    loop = asyncio.get_running_loop()
    got: list[str] = []

    def on_signal(sig: int) -> None:
        got.append(signal.Signals(sig).name)
        ignore_signals()
        shutdown.quiet()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, asyncio.ensure_future(finished)],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        ignore_signals()
    waiter.cancel()
    return got[0] if got else "finished"


def ignore_signals() -> None:
    """Once a role stops, SIGINT/SIGTERM are ignored: the batch system signals every process of
    the step and the jobscript passes its own signal on, so a second one comes, and it changes
    nothing (SIGKILL at KillWait still ends a stuck role). It must also never reach asyncio's
    handler: when it lands while the loop closes (after its wakeup pipe, before its handlers),
    Python prints a BrokenPipeError traceback ("Exception ignored when trying to write to the
    signal wakeup fd"), seen at a Slurm time limit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class Terminated(BaseException):
    """SIGTERM arrived while a client role ran (raised by :class:`terminate_cleanly`)."""


class terminate_cleanly:
    """SIGTERM (Slurm's time limit) becomes an orderly stop with one line and exit code 143."""

    MESSAGE = ("hpcdask: interrupted by SIGTERM (the job's time limit?); no results were written "
               "(provenance.json records the interruption): rerun with more time (sbatch --time) "
               "or --size small")

    def __enter__(self):
        self.fired = False

        def handler(signum, frame):
            # Once: a batch system signals every process of the step, and the runner and the
            # jobscript pass it on too. The line first: KillWait may not leave time for more.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.fired = True
            shutdown.quiet()
            print(self.MESSAGE, file=sys.stderr, flush=True)
            raise Terminated()
        self._old = signal.signal(signal.SIGTERM, handler)
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
        # Whatever the unwinding raised after the signal (a cluster going away under a context
        # manager's exit), the outcome is the signal's: exit 143, the one line already printed.
        if exc_type is Terminated or (self.fired and exc_type is not None
                                      and not issubclass(exc_type, SystemExit)):
            sys.exit(143)
        return False
