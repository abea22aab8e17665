"""dask.sif: the image as a SIF file, assembled the way ``apptainer build`` does it, run through
the bubblewrap runner (tests/testcluster/bin/apptainer) the way unprivileged Apptainer runs a SIF.

The SIF comes from the session fixture ``sif`` (containers/imagebuild/sif.py, cached by the sandbox's
input key). Needs root, bubblewrap, debootstrap, squashfs-tools, siftool, squashfuse: without them
these tests FAIL, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hpcdask import sif as sifmod

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"
LOCK = REPO / "containers" / "requirements.lock"
DEF = REPO / "containers" / "dask.def"
from imagebuild import sif as sif_builder
from testcluster.nobody import run_as_nobody

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1800)]

# What `siftool list` shows for an image `apptainer build` makes from a `Bootstrap: docker` def:
# internal/pkg/build/assemblers/sif.go createSIF adds the definition file, then the JSON objects
# by name (inspect-metadata.json from metadata.go, oci-config.json from the OCI conveyor packer),
# then the squashfs as the primary system partition with the architecture, all in group 1.
APPTAINER_KINDS = ["Def.FILE", "JSON.Generic", "JSON.Generic", "FS (Squashfs/*System/amd64)"]


def apptainer(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)


@pytest.fixture(scope="module")
def other_sif(sif, tmp_path_factory) -> Path:
    """Another build of the same root filesystem (the same objects, a new SIF ID)."""
    return sif_builder.renew(sif, tmp_path_factory.mktemp("other") / "dask.sif")


def test_objects_are_those_apptainer_writes(sif):
    objs = sif_builder.objects(sif)
    assert [o["type"] for o in objs] == APPTAINER_KINDS
    assert {o["group"] for o in objs} == {"1"}
    names = [subprocess.run(["siftool", "info", o["id"], str(sif)], capture_output=True, text=True,
                            check=True).stdout for o in objs[1:3]]
    assert "inspect-metadata.json" in names[0] and "oci-config.json" in names[1]
    assert int(objs[3]["position"].split("-")[0]) % 4096 == 0  # partitions are aligned


def test_header(sif):
    head = sifmod.read_header(sif)
    assert head.launch == "#!/usr/bin/env run-singularity\n"
    out = subprocess.run(["siftool", "header", str(sif)], capture_output=True, text=True, check=True).stdout
    assert f"ID:                   {head.id}" in out
    assert "Primary Architecture: amd64" in out


def test_deffile_and_metadata_objects(sif):
    objs = sif_builder.objects(sif)
    dump = {o["id"]: subprocess.run(["siftool", "dump", o["id"], str(sif)], capture_output=True,
                                    check=True).stdout for o in objs[:3]}
    assert dump["1"] == DEF.read_bytes()
    meta = json.loads(dump["2"])
    assert meta["type"] == "container"
    attrs = meta["data"]["attributes"]
    assert attrs["labels"]["org.hpcdask.lock-sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert attrs["runscript"].endswith('exec hpcdask "$@"')
    assert "/.singularity.d/env/90-environment.sh" in attrs["environment"]
    assert json.loads(dump["3"])["Cmd"] == ["bash"]


def test_inspect(sif):
    labels = apptainer("inspect", "--labels", str(sif))
    sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert f"org.hpcdask.lock-sha256: {sha}\n" in labels.stdout, labels.stderr
    assert apptainer("inspect", "--deffile", str(sif)).stdout == DEF.read_text().rstrip("\n") + "\n"
    assert apptainer("inspect", "--runscript", str(sif)).stdout.endswith('exec hpcdask "$@"\n')


def test_run_and_test(sif):
    r = apptainer("run", str(sif), "--help")
    assert r.returncode == 0 and "Usage: hpcdask" in r.stdout, r.stderr
    r = apptainer("test", str(sif))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "%test: ok" in r.stdout


def test_roles_report_the_sif_id(sif, other_sif):
    """Bound at /opt/hpcdask/image.sif (as the jobscripts do), the image reports its own ID."""
    for image in (sif, other_sif):
        r = apptainer("exec", "--bind", f"{image}:{sifmod.IMAGE_SIF}:ro", str(image),
                      "hpcdask", "versions")
        assert r.returncode == 0, r.stderr
        assert f"sif:{sifmod.read_header(image).id}" in r.stdout.splitlines()[0]
    assert sifmod.read_header(sif).id != sifmod.read_header(other_sif).id


def test_worker_from_another_build_is_refused(sif, other_sif, tmp_path):
    """The same lock, another build: the strict check refuses the worker, naming both IDs."""
    d = tmp_path / "cluster"
    d.mkdir(mode=0o700)
    path = d / "scheduler.json"

    def role(image: Path, *args: str) -> list[str]:
        return [str(RUNNER), "exec", "--bind", str(d), "--bind", f"{image}:{sifmod.IMAGE_SIF}:ro",
                str(image), "hpcdask", *args, "--scheduler-file", str(path), "--interface", "lo"]

    log = (tmp_path / "scheduler.log").open("w")
    sched = subprocess.Popen(role(sif, "scheduler", "--dashboard", "off"), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not path.exists():
            assert sched.poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "no scheduler file"
            time.sleep(0.2)
        mine, theirs = sifmod.read_header(sif).id, sifmod.read_header(other_sif).id
        r = subprocess.run(role(other_sif, "worker", "--nworkers", "1", "--nthreads", "1"),
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 3, r.stderr
        assert "hpcdask: refused:" in r.stderr and "Traceback" not in r.stderr
        assert f"sif {mine} != {theirs}" in r.stderr  # both IDs named
    finally:
        sched.terminate()
        sched.wait(120)
        log.close()
    assert f"sif:{mine}" in (tmp_path / "scheduler.log").read_text()  # the scheduler reports it too


def test_an_ordinary_user_runs_the_sif(sif):
    """Not root: /dev/fuse is root-only here, so the runner extracts the image, like Apptainer."""
    with tempfile.TemporaryDirectory(prefix="sif-nobody-") as d:
        os.chmod(d, 0o777)
        env = {"PATH": os.environ["PATH"], "HOME": d, "TMPDIR": d}
        copy = Path(d) / "dask.sif"  # one the ordinary user may read (the cache is root's)
        shutil.copyfile(sif, copy)
        copy.chmod(0o644)
        r = run_as_nobody([RUNNER, "exec", copy, "sh", "-c", "id -u; hpcdask versions"],
                          env, capture_output=True, text=True, cwd=d, timeout=900, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == "65534"
        assert "image lock:" in r.stdout
        assert sorted(p.name for p in Path(d).iterdir()) == ["dask.sif"]  # nothing left behind
