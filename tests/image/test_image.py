"""The image built from containers/dask.def works as the design's image contract says.

The image is the sandbox containers/imagebuild/image.py builds (debootstrap base + the def's sections,
cached outside the repository; the first build takes a few minutes, later ones are instant) and
runs through the bubblewrap stand-in tests/testcluster/bin/apptainer. Needs root, bubblewrap and
debootstrap: without them these tests FAIL, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"
LOCK = REPO / "containers" / "requirements.lock"
from imagebuild import image as image_builder

pytestmark = [pytest.mark.image, pytest.mark.slow]


@pytest.fixture(scope="session")
def img() -> Path:
    missing = [t for t in ("bwrap", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install bubblewrap debootstrap "
                    "(required: the image tests run in CI)")
    try:
        return image_builder.build()
    except image_builder.BuildError as e:
        pytest.fail(f"building the test image failed: {e}")


def apptainer(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)


def test_labels_carry_the_lock_sha256(img):
    labels = json.loads((img / ".singularity.d" / "labels.json").read_text())
    sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert labels["org.hpcdask.lock-sha256"] == sha
    assert labels["org.hpcdask.recipe"] == "apptainer"
    info = json.loads((img / "opt" / "hpcdask" / "image.json").read_text())
    assert info["lock_sha256"] == sha and info["recipe"] == "apptainer"
    assert (img / "opt" / "hpcdask" / "requirements.lock").read_bytes() == LOCK.read_bytes()
    out = apptainer("inspect", "--labels", str(img))  # sorted "key: value" lines, like Apptainer
    assert f"org.hpcdask.lock-sha256: {sha}" in out.stdout.splitlines()
    out = apptainer("inspect", "--json", "--labels", str(img))
    assert json.loads(out.stdout)["data"]["attributes"]["labels"]["org.hpcdask.lock-sha256"] == sha


def test_apptainer_test_passes(img):
    """%test: the lock check, imports, dot, and a small real workload (LocalCluster + dask-ml)."""
    r = apptainer("test", "--cleanenv", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "%test: ok" in r.stdout


def test_run_help(img):
    r = apptainer("run", "--cleanenv", str(img), "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage: hpcdask" in r.stdout


def test_cleanenv_exec_sees_the_image_environment(img, tmp_path):
    code = ("import json, os, sys, dask\n"
            "print(json.dumps({'exe': sys.executable, 'prefix': sys.prefix,"
            " 'nousersite': sys.flags.no_user_site, 'pythonpath': os.environ.get('PYTHONPATH'),"
            " 'root_config': os.environ.get('DASK_ROOT_CONFIG'),"
            " 'info': os.environ.get('HPCDASK_IMAGE_INFO'),"
            " 'tmpdir': dask.config.get('temporary-directory'),"
            " 'paths': dask.config.paths}))")
    r = apptainer("exec", "--cleanenv", str(img), "python", "-c", code,
                  env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["exe"] == "/opt/hpcdask/venv/bin/python"
    assert got["prefix"] == "/opt/hpcdask/venv"
    assert got["nousersite"] == 1
    assert not got["pythonpath"]  # set empty by %environment (Python ignores an empty one)
    assert got["root_config"] == "/opt/hpcdask/etc/dask"
    assert got["info"] == "/opt/hpcdask/image.json"
    assert got["tmpdir"] is None  # -> tempfile.gettempdir(): $TMPDIR or /tmp
    assert "/opt/hpcdask/etc/dask" in got["paths"]


def test_host_pythonpath_does_not_reach_the_image(img, tmp_path):
    """Without --cleanenv (as the jobscripts run roles), Apptainer re-exports every host variable
    %environment left unset; the def sets PYTHONPATH empty so that it ends unset."""
    r = apptainer("exec", str(img), "python", "-c", "import os; print(os.environ.get('PYTHONPATH'))",
                  env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "None\n"), r.stderr


def test_image_is_read_only(img):
    r = apptainer("exec", str(img), "touch", "/opt/hpcdask/venv/x")
    assert r.returncode != 0 and "Read-only" in r.stderr


def test_graphviz_dot_is_there(img):
    r = apptainer("exec", "--cleanenv", str(img), "dot", "-V")
    assert r.returncode == 0 and "graphviz" in r.stderr.lower()


def test_lock_check_names_a_changed_package(img, tmp_path):
    """A lock that differs from the image makes %test fail, naming the package.

    Building a second image from a lock with one pin changed would take minutes; the same
    check runs here by binding a modified copy of the lock over /opt/hpcdask/requirements.lock
    of the built image, which is the file %test compares the installed set against.
    """
    text = LOCK.read_text()
    m = re.search(r"^toolz==(\S+) \\$", text, re.MULTILINE)
    assert m, "expected toolz pinned in the lock"
    bad = tmp_path / "requirements.lock"
    bad.write_text(text.replace(f"toolz=={m.group(1)} \\", "toolz==0.0.1 \\"))
    r = apptainer("test", "--cleanenv", "--bind", f"{bad}:/opt/hpcdask/requirements.lock",
                  str(img))
    assert r.returncode != 0
    assert re.search(r"toolz.*0\.0\.1", r.stdout + r.stderr), r.stdout + r.stderr
    assert "%test: ok" not in r.stdout


def test_second_build_is_cached(img):
    first = image_builder.build()  # img, unless the sources changed since the fixture built it
    t0 = time.monotonic()
    assert image_builder.build() == first
    assert time.monotonic() - t0 < 10
