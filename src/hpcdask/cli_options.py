"""The click options and settings every ``hpcdask`` subcommand shares (:mod:`hpcdask.cli`,
:mod:`hpcdask.cli_image`)."""

from __future__ import annotations

from pathlib import Path

import click

from hpcdask.errors import BadInput

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}

def scheduler_file_option(help: str = "The cluster's scheduler file on the shared filesystem; its "
                                       "folder holds the TLS credentials.", required: bool = False):
    """--scheduler-file, the option every role shares (required where the role needs a cluster)."""
    return click.option("--scheduler-file", required=required,
                        type=click.Path(dir_okay=False, path_type=Path), help=help)


tls_option = click.option("--tls/--no-tls", default=True,
                          help="TLS with the cluster's credentials; --no-tls only knowingly.")


def wait_options(f):
    """--wait-workers/--wait-timeout: start a client together with the workers, and let it wait."""
    f = click.option("--wait-timeout", default="300s", show_default=True,
                     help="How long --wait-workers waits (exit 1 after it).")(f)
    return click.option("--wait-workers", type=click.IntRange(min=0), default=0,
                        help="First wait until this many workers have joined (0: do not wait).")(f)


def _timeout(value: str, option: str) -> float:
    import dask.utils

    try:
        return dask.utils.parse_timedelta(value)
    except (ValueError, KeyError):
        raise BadInput(f"{option} {value!r} is not a duration; give e.g. {option} 300s or 10m") from None
