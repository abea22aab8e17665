"""The identity of the SIF image a role runs from: the ID in the SIF global header.

Every ``apptainer build`` (and ``siftool new``) gives the image a new random UUID, stored in the
first 128 bytes of the file (sylabs/sif ``pkg/sif/sif.go``: launch script, ``SIF_MAGIC``,
version, arch, ID, ...), so two builds of the same lock are told apart without hashing the
gigabytes of the root filesystem.

Inside the container the ``.sif`` is not visible by default. The jobscripts and
``hpcdask.cluster`` bind it read-only at :data:`IMAGE_SIF` (an empty placeholder the image
carries, so the bind needs no underlay); otherwise ``$APPTAINER_CONTAINER`` (the image's host
path, which Apptainer exports) is tried, which works when that path is bound too.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

IMAGE_SIF = "/opt/hpcdask/image.sif"  # where the launchers bind the image file, read-only
MAGIC = b"SIF_MAGIC\0"
# launch[32] magic[10] version[3] arch[3] id[16] ctime mtime dfree dtotal descoff desclen dataoff datalen
_HEADER = struct.Struct("<32s10s3s3s16s8q")


@dataclass(frozen=True)
class Header:
    launch: str
    version: str
    id: str
    created: int
    data_offset: int
    data_size: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """The SIF global header of ``path``; ValueError when it is not a SIF file."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: too short for a SIF header")
    launch, magic, version, _arch, ident, ctime, _mtime, *_, dataoff, datalen = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a SIF file (no SIF_MAGIC)")
    return Header(launch=launch.rstrip(b"\0").decode(errors="replace"),
                  version=version.rstrip(b"\0").decode(errors="replace"),
                  id=str(uuid.UUID(bytes=ident)), created=ctime,
                  data_offset=dataoff, data_size=datalen)


def image_id() -> str | None:
    """The ID of the SIF this process runs from, or None (a sandbox, a venv, an unbound SIF)."""
    for candidate in (IMAGE_SIF, os.environ.get("APPTAINER_CONTAINER")):
        if candidate and Path(candidate).is_file():
            try:
                return read_header(candidate).id
            except (OSError, ValueError):
                continue
    return None
