"""``hpcdask image``: the user's project in the one image (docs/project.md): ``lock`` resolves
the project's requirements over the image's lock, ``build`` makes the project's SIF from it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import hpcdask
from hpcdask.cli_options import CONTEXT
from hpcdask.errors import BadInput


@click.group("image", context_settings=CONTEXT)
def image() -> None:
    """The project's own image: the user's requirements locked over the image's lock, and a
    SIF that is the base image plus exactly that lock (see docs/project.md)."""


@image.command("lock", context_settings=CONTEXT)
@click.option("-r", "--requirements", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("requirements.txt"), help="The project's requirements (pip's syntax).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The lock to write (default: hpcdask.lock beside the requirements).")
@click.option("--base-lock", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The image's lock (default: $HPCDASK_BASE_LOCK or the image's own).")
def image_lock(requirements, output, base_lock) -> None:
    """Resolve the requirements against the image's lock; write hpcdask.lock with hashes.

    Run it with the image's Python: apptainer exec $HPCDASK_IMAGE hpcdask image lock -r
    requirements.txt. pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX,
    pip.conf) choose where packages come from.
    """
    from hpcdask import userlock

    path = userlock.write(requirements, output, base_lock)
    lock = userlock.parse(path)
    click.echo(f"{path}: {len(lock.pins)} package(s), {len(lock.local)} local, over the image's "
               f"lock {lock.base_lock_sha256[:16]}")


@image.command("build", context_settings=CONTEXT)
@click.option("-r", "--requirements", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("requirements.txt"), help="The project's requirements (pip's syntax).")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The base image's SIF (\"$HPCDASK_IMAGE\").")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The project's SIF to write (e.g. myproject.sif).")
def image_build(requirements, base, output) -> None:
    """The base image plus a layer holding exactly hpcdask.lock (locked first when missing or
    stale), built as an ordinary user on the login node.

    Runs the assembler of the hpcdask checkout (containers/imagebuild/userlayer.py; needs
    unsquashfs, mksquashfs, siftool and bwrap on this node), or $HPCDASK_CONTAINERS/imagebuild.
    """
    import os
    import subprocess

    containers = Path(os.environ.get("HPCDASK_CONTAINERS")
                      or Path(hpcdask.__file__).resolve().parents[2] / "containers")
    if not (containers / "imagebuild" / "userlayer.py").is_file():
        raise BadInput("hpcdask image build needs the hpcdask checkout's containers/ folder; run "
                       "it on the login node from the checkout, or set HPCDASK_CONTAINERS=PATH")
    env = {**os.environ, "PYTHONPATH": str(containers)}
    proc = subprocess.run([sys.executable, "-m", "imagebuild.userlayer", "build", "-r",
                           str(requirements), "--base", str(base), "-o", str(output)],
                          env=env, check=False)
    if proc.returncode:
        raise click.exceptions.Exit(proc.returncode)
