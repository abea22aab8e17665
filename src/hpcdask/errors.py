"""Errors that reach the user as one line."""

from __future__ import annotations

import click


class BadInput(click.UsageError):
    """A bad input: one line that says what is wrong and how to fix it; exit code 2.

    A ``click.UsageError`` so click prints ``Error: <message>`` and exits 2; raised from
    library code too, where callers get an ordinary exception.
    """

    exit_code = 2

    def show(self, file=None) -> None:  # one line, no usage block
        click.echo(f"hpcdask: error: {self.format_message()}", err=True, file=file)


class Refused(click.ClickException):
    """A role refused to join (identity mismatch, wrong credentials): exit code 3."""

    exit_code = 3

    def show(self, file=None) -> None:
        click.echo(f"hpcdask: refused: {self.format_message()}", err=True, file=file)


class NotReady(click.ClickException):
    """The cluster did not reach the size asked for in time: exit code 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"hpcdask: error: {self.format_message()}", err=True, file=file)
