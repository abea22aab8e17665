"""``hpcdask module``: the image as an Lmod module, the way sites expose containers
(singularity-hpc's ``shpc``): after ``module use DIR && module load hpcdask``, ``python``, ``python3``, ``hpcdask``,
``dask`` and ``jupyter`` run inside the image, and ``HPCDASK_IMAGE`` names it, so the jobs
submitted from that shell run the same image; ``module unload hpcdask`` gives the shell back as it
was (Lmod's ``pushenv`` restores an ``HPCDASK_IMAGE`` set before).

What it writes under DIR::

    hpcdask/VERSION.lua         the modulefile (``module avail`` lists it)
    .hpcdask/VERSION/bin/run    the one wrapper: ``apptainer exec`` with the jobscripts' binds
    .hpcdask/VERSION/bin/NAME   a symlink to ``run`` per command (run reads its own name)

Lmod skips hidden folders, so the wrappers never show up as modules. Writing again replaces the
same VERSION whole; each file is written beside and renamed into place.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hpcdask
from hpcdask import sif
from hpcdask.errors import BadInput

#: The commands the module puts on PATH, each run inside the image.
COMMANDS = ("python", "python3", "hpcdask", "dask", "jupyter")
# A module name or version: a path part Lmod lists, and plain text in the wrapper and modulefile.
_NAME_PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")

# The binds are those of jobscripts/lib/hpcdask-job.sh's hj_exec_prefix (the shared folder, a
# per-job $TMPDIR, HPCDASK_BIND, the image onto its placeholder so every role reads its SIF ID):
# the wrapper must stand alone (the module outlives any checkout), so it spells them out again.
RUN = """\
#!/bin/bash
# Written by `hpcdask module` (hpcdask {hpcdask_version}) for the module {name}/{version}: runs the
# command it is called as (python, hpcdask, dask, ...) inside the image below, with the binds of
# hpcdask's jobscripts. `hpcdask module` writes it again; edits here are lost then.
set -euo pipefail
image={image}
prefix={prefix}
apptainer=${{HPCDASK_APPTAINER:-apptainer}}
if ! command -v "$apptainer" >/dev/null 2>&1; then
    echo "{name}: '$apptainer' not found on PATH of $(hostname); module load apptainer," \\
        "or set HPCDASK_APPTAINER=/path/to/apptainer" >&2
    exit 2
fi
if [ ! -r "$image" ]; then
    echo "{name}: image $image is missing or not readable; write the module for the image" \\
        "you have: hpcdask module --image NEW.sif --prefix $prefix" >&2
    exit 2
fi
binds=()
if [ -n "${{HPCDASK_SHARED_DIR:-}}" ] && [ -d "$HPCDASK_SHARED_DIR" ]; then
    binds+=(--bind "$HPCDASK_SHARED_DIR")
fi
if [ -n "${{TMPDIR:-}}" ] && [ -d "$TMPDIR" ]; then
    case $TMPDIR in /tmp | /var/tmp) ;; *) binds+=(--bind "$TMPDIR") ;; esac
fi
if [ -n "${{HPCDASK_BIND:-}}" ]; then
    IFS=, read -ra specs <<<"$HPCDASK_BIND"
    for spec in "${{specs[@]}}"; do binds+=(--bind "$spec"); done
fi
[ ! -f "$image" ] || binds+=(--bind "$image:{placeholder}:ro")
exec "$apptainer" exec "${{binds[@]}}" "$image" "${{0##*/}}" "$@"
"""

LUA = """\
-- Written by `hpcdask module` (hpcdask {hpcdask_version}): the hpcdask image as a module.
help([[
{commands} run inside the image
{image_text}
(apptainer exec, with the binds of hpcdask's jobscripts). HPCDASK_IMAGE names it, so the jobs
submitted from this shell (sbatch dask-cluster.sbatch ...) run the same image.
]])
whatis("Name: {name}")
whatis("Version: {version}")
whatis("Description: Dask on HPC from one image: {image_text}")
prepend_path("PATH", {bin})
pushenv("HPCDASK_IMAGE", {image_lua})
"""


@dataclass(frozen=True)
class Module:
    """What :func:`write` made: the modulefile, the wrappers' folder, and the module's name."""

    modulefile: Path
    bin: Path
    name: str
    version: str


def default_version(image: Path) -> str:
    """hpcdask's version, plus the SIF's ID (its first 8 characters) for a .sif: two images are
    two versions of the module, and ``module load hpcdask`` takes the newest."""
    try:
        return f"{hpcdask.__version__}-{sif.read_header(image).id[:8]}"
    except (OSError, ValueError):
        return hpcdask.__version__  # a sandbox folder: no SIF ID


def write(image: str | os.PathLike[str], prefix: str | os.PathLike[str], name: str = "hpcdask",
          version: str | None = None) -> Module:
    """Write the module NAME/VERSION for IMAGE under PREFIX (see the module's docstring)."""
    given = image
    image = Path(image).expanduser().absolute()
    if not image.exists():
        raise BadInput(f"image {given} does not exist (here: {image}); give the image's path: "
                       f"hpcdask module --image /path/to/hpcdask.sif --prefix {prefix} (inside "
                       f"the image only bound folders are visible: run it from the image's "
                       f"folder, or bind that folder)")
    if not os.access(image, os.R_OK):
        raise BadInput(f"image {image} is not readable by you; fix its mode or give a copy you "
                       f"can read: hpcdask module --image COPY.sif --prefix {prefix}")
    for what, value in (("--name", name), ("--version", version)):
        if value is not None and not _NAME_PART.fullmatch(value):
            raise BadInput(f"{what} {value!r} is not a module name part (letters, digits and "
                           f"._+- only, not first '.'); e.g. hpcdask module --name hpcdask "
                           f"--version 2026.12")
    version = version or default_version(image)
    prefix = Path(prefix).expanduser().absolute()
    try:
        prefix.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=prefix)
        probe.close()
    except OSError as e:
        raise BadInput(f"cannot write in --prefix {prefix} ({e.strerror}); give a folder of "
                       f"yours, e.g. hpcdask module --image {image} --prefix "
                       f"$HOME/modulefiles") from None

    bindir = prefix / f".{name}" / version / "bin"
    modulefile = prefix / name / f"{version}.lua"
    fields = {"hpcdask_version": hpcdask.__version__, "name": name, "version": version,
              "prefix": shlex.quote(str(prefix)), "placeholder": sif.IMAGE_SIF}
    bindir.mkdir(parents=True, exist_ok=True)
    _replace(bindir / "run", RUN.format(image=shlex.quote(str(image)), **fields), 0o755)
    for command in COMMANDS:
        link = bindir / command
        tmp = bindir / f".{command}.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to("run")
        tmp.replace(link)
    modulefile.parent.mkdir(parents=True, exist_ok=True)
    image_text = str(image).replace('"', "").replace("]]", "")  # inside "..." and [[...]]
    _replace(modulefile, LUA.format(commands=", ".join(COMMANDS), image_text=image_text,
                                    bin=_lua(bindir), image_lua=_lua(image), **fields), 0o644)
    return Module(modulefile, bindir, name, version)


def _lua(value: os.PathLike[str] | str) -> str:
    """A Lua string literal."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _replace(path: Path, text: str, mode: int) -> None:
    """PATH holds TEXT, or is unchanged: written beside, then renamed into place."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
