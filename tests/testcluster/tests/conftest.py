"""Fixtures of the runner tests: a tiny image made from the debootstrap base, as a sandbox folder
and as a SIF file (containers/imagebuild/sif.py's assembler), both cached per session.

The base comes from containers/imagebuild/base.sh (cached outside the repository). These need root,
bubblewrap, debootstrap, squashfs-tools and siftool; without them they FAIL (required in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BASE_SH = REPO / "containers" / "imagebuild" / "base.sh"

ENVIRONMENT = """#!/bin/sh

export PATH="/opt/tiny/bin:$PATH"
export PYTHONNOUSERSITE=1
export FROM_IMAGE=yes
export OVERRIDDEN=image
export PYTHONPATH=
export EMPTIED=
unset UNSET_BY_IMAGE
"""
# What containers/imagebuild/image.py (like Apptainer's build) writes as 99-base.sh.
BASE_ENV = """#!/bin/sh
if [ -z "$LD_LIBRARY_PATH" ]; then
    LD_LIBRARY_PATH="/.singularity.d/libs"
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
fi
PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
"""
DEF = "Bootstrap: localimage\nFrom: base\n\n%runscript\n    echo runscript\n"
LABELS = {"org.example.tiny": "yes", "org.example.url": "https://example.org/?a=1&b=<2>"}


def need_tools() -> None:
    missing = [t for t in ("bwrap", "debootstrap", "mksquashfs", "siftool") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install bubblewrap debootstrap "
                    "squashfs-tools siftool (required, not optional: these tests run in CI)")
    if os.geteuid() != 0:
        pytest.fail("the base image needs root (debootstrap)")


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory) -> Path:
    need_tools()
    out = subprocess.run(["bash", str(BASE_SH)], stdout=subprocess.PIPE, text=True, check=True)
    base = Path(out.stdout.strip().splitlines()[-1])
    img = tmp_path_factory.mktemp("img") / "tiny"
    if subprocess.run(["cp", "-al", str(base), str(img)], check=False).returncode != 0:
        subprocess.run(["cp", "-a", str(base), str(img)], check=True)
    sd = img / ".singularity.d"
    (sd / "env").mkdir(parents=True)
    (sd / "env" / "90-environment.sh").write_text(ENVIRONMENT)
    (sd / "env" / "99-base.sh").write_text(BASE_ENV)
    (sd / "runscript").write_text('#!/bin/sh\n\necho "runscript: $*"\nexit 3\n')
    (sd / "test").write_text("#!/bin/sh\n\necho test-script-ran\n")
    for f in ("env/90-environment.sh", "env/99-base.sh", "runscript", "test"):
        (sd / f).chmod(0o755)
    (sd / "Singularity").write_text(DEF)
    (sd / "runscript.help").write_text("tiny: a test image\n")
    (sd / "labels.json").write_text(json.dumps(LABELS, indent=4) + "\n")
    (img / "opt" / "tiny" / "bin").mkdir(parents=True)
    # A new file (the base's are hard links): the runner binds the host's only over an existing one.
    (img / "etc" / "hosts").write_text("")
    return img

@pytest.fixture(scope="session")
def tiny_sif(sandbox, tmp_path_factory) -> Path:
    """The tiny sandbox assembled into a SIF the way containers/imagebuild/sif.py builds dask.sif."""
    from imagebuild import sif as sif_builder

    out = tmp_path_factory.mktemp("sif") / "tiny.sif"
    objects = {"inspect-metadata.json": sif_builder.go_json(sif_builder.inspect_metadata(sandbox)),
               "oci-config.json": sif_builder.go_json(sif_builder.BOOKWORM_SLIM_CONFIG)}
    return sif_builder.assemble(sandbox, DEF.encode(), out, objects)
