"""hpcdask's own exceptions: what reaches the user as one line.

Library code (``hpcdask.cluster.slurm_cluster()`` in a notebook too) raises these, ordinary
``ValueError``/``RuntimeError`` subclasses as dask-jobqueue raises; only the command line
(:mod:`hpcdask.cli`) turns them into ``hpcdask: error: ...`` and an exit code.
"""

from __future__ import annotations


class HpcdaskError(Exception):
    """Base of hpcdask's errors: ``message`` is one line (a table may follow for a refusal)."""

    exit_code = 1
    prefix = "error"

    @property
    def message(self) -> str:
        return str(self)

    def format_message(self) -> str:
        return str(self)

    def one_line(self) -> str:
        """What the command line prints: ``hpcdask: error: <message>``."""
        return f"hpcdask: {self.prefix}: {self}"


class BadInput(HpcdaskError, ValueError):
    """A bad input: one line that says what is wrong and how to fix it; exit code 2."""

    exit_code = 2


class Refused(HpcdaskError, RuntimeError):
    """A role refused to join (identity mismatch, wrong credentials): exit code 3."""

    exit_code = 3
    prefix = "refused"


class NotReady(HpcdaskError, RuntimeError):
    """The cluster did not reach the size asked for in time: exit code 1."""

    exit_code = 1
