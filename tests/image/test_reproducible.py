"""Issue 28: the same commit builds the same ``dask.sif``, byte for byte, and anyone can check it.

On the real build path (containers/imagebuild: debootstrap base + the def's sections, mksquashfs,
siftool): ``python -m imagebuild.sif check`` rebuilds this checkout's image in a fresh cache and
compares it with the session's SIF; a changed file gives another content-derived ID and the check
names the file; the build's times are SOURCE_DATE_EPOCH's; every .pyc in the image is
hash-based. Needs root, debootstrap, bubblewrap, squashfs-tools and siftool: without them these
tests FAIL, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdask import sif as sifmod
from imagebuild import image as image_builder
from imagebuild import sif as sif_builder

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(2400)]


def sha256(path: Path) -> str:
    return sif_builder.sha256(path)


def epoch_of(image: Path) -> int:
    """The SOURCE_DATE_EPOCH the cached sandbox ``image`` was built with (its marker records it)."""
    return json.loads(image.with_name(image.name + ".json").read_text())["source_date_epoch"]


@pytest.mark.run_last
def test_a_rebuild_in_a_fresh_cache_is_byte_identical(sif, rebuilt_sif_cache, tmp_path):
    """``make sif-check``'s command on the session's SIF, given the second build the session made
    in a fresh cache (from the same checkout, in its own processes; the base is the cached one: it
    stands in for the def's digest-pinned `From:`): the same file, and the command says so with
    its sha256."""
    rebuilt = list(rebuilt_sif_cache.glob("dask-*.sif"))
    assert [p.name for p in rebuilt] == [sif.name]
    assert rebuilt[0].stat().st_ino != sif.stat().st_ino  # two files, two builds
    env = {**os.environ, "PYTHONPATH": str(REPO / "containers")}
    r = subprocess.run([sys.executable, "-m", "imagebuild.sif", "check", str(sif), "--cache",
                        str(rebuilt_sif_cache)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=1800, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.startswith(f"identical (sha256 {sha256(sif)})"), r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.run_last
def test_one_changed_byte_in_src_gives_another_image_and_the_check_names_the_file(
        sif, changed_sif_build, tmp_path):
    """A copy of this checkout with one byte of src/ changed, built in a fresh cache while the
    session ran (same SOURCE_DATE_EPOCH): another SIF and another content-derived ID; ``make
    sif-check``'s command, run in that copy on the session's SIF, exits 1 and names the file."""
    from testcluster.fixtures import CHANGED

    changed = list(changed_sif_build["cache"].glob("dask-*.sif"))
    assert len(changed) == 1 and changed[0].name != sif.name
    ours, theirs = sifmod.read_header(sif).id, sifmod.read_header(changed[0]).id
    assert theirs != ours and theirs == str(sif_builder.content_id(changed[0]))
    r = subprocess.run([sys.executable, "-m", "imagebuild.sif", "check", str(sif), "--cache",
                        str(changed_sif_build["cache"])], cwd=tmp_path, capture_output=True,
                       text=True, timeout=1800, env=changed_sif_build["env"], check=False)
    assert r.returncode == 1, r.stdout + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"differs: {sif} (sha256 {sha256(sif)}) is not what this checkout "
                               f"builds (sha256 {sha256(changed[0])}"), r.stdout
    module = CHANGED[0].removeprefix("src/")
    assert f"  header ID: {ours} != {theirs}" in lines, r.stdout
    assert f"  /opt/hpcdask/venv/lib/python3.11/site-packages/{module}: content differs" in lines, r.stdout
    assert "Traceback" not in r.stderr
    print(r.stdout)


def test_the_images_times_are_source_date_epoch(sif, image):
    """The header, every descriptor, the build-date label, image.json and every file's mtime are
    the build's SOURCE_DATE_EPOCH, not the builder's clock; the ID is the content's."""
    epoch = epoch_of(image)
    head = sifmod.read_header(sif)
    assert head.created == epoch
    assert head.id == str(sif_builder.content_id(sif))
    with open(sif, "rb") as f:
        raw = f.read(1 << 16)
    dtotal, descoff = sif_builder.HEADER.unpack_from(raw)[8:10]
    descs = [sif_builder.DESCRIPTOR.unpack_from(raw, descoff + i * sif_builder.DESCRIPTOR.size)
             for i in range(dtotal)]
    assert [(d[8], d[9]) for d in descs if d[1]] == [(epoch, epoch)] * 4
    labels = json.loads((image / ".singularity.d/labels.json").read_text())
    assert labels["org.label-schema.build-date"] == time.strftime(
        "%A_%d_%B_%Y_%H:%M:%S_UTC", time.gmtime(epoch))
    built = json.loads((image / "opt/hpcdask/image.json").read_text())["built"]
    assert built == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    part = next(o for o in sif_builder.objects(sif) if o["type"].startswith("FS"))
    offset = int(part["position"].split("-")[0])
    listing = subprocess.run(["unsquashfs", "-lln", "-o", str(offset), str(sif)],
                             capture_output=True, text=True, check=True).stdout
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
    rows = [ln for ln in listing.splitlines() if ln.startswith(("-", "d", "l"))]
    assert len(rows) > 10_000
    assert all(stamp in ln for ln in rows), [ln for ln in rows if stamp not in ln][:5]


def test_every_pyc_in_the_image_is_hash_based(image):
    """pip's and Debian's .pyc alike: unchecked-hash (flags 0b01), so they neither embed the
    install time nor go stale when every file time becomes SOURCE_DATE_EPOCH."""
    roots = [image / "opt/hpcdask/venv", *image.glob("usr/lib/python3*")]
    flags: dict[int, list[str]] = {}
    for root in roots:
        for pyc in root.rglob("*.pyc"):
            with open(pyc, "rb") as f:
                f.read(4)
                flags.setdefault(int.from_bytes(f.read(4), "little"), []).append(str(pyc))
    assert set(flags) == {1}, {k: v[:3] for k, v in flags.items()}
    # the stdlib, the venv's packages and hpcdask itself all have theirs
    venv = next((image / "opt/hpcdask/venv/lib").glob("python3.*/site-packages"))
    for pkg in ("distributed", "sklearn", "dask_ml", "hpcdask"):
        assert list((venv / pkg / "__pycache__").glob("__init__.cpython-*.pyc")), pkg
    assert list(image.glob("usr/lib/python3.*/__pycache__/os.cpython-*.pyc"))
    assert list(image.glob("usr/lib/python3.*/asyncio/__pycache__/__init__.cpython-*.pyc"))
    assert not (image / "var/cache/ldconfig/aux-cache").exists()
    assert not list((image / "var/log").rglob("*.log"))


def _tiny(root: Path, text: str) -> Path:
    (root / ".singularity.d").mkdir(parents=True, exist_ok=True)
    (root / "opt/hpcdask/venv/lib/hpcdask").mkdir(parents=True, exist_ok=True)
    (root / "opt/hpcdask/venv/lib/hpcdask/cli.py").write_text(text)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/os-release").write_text("bookworm\n")
    return root


def test_one_changed_byte_changes_the_id_and_the_comparison_names_the_file(tmp_path):
    """A root filesystem assembled twice, a second apart (other file times), with one epoch gives
    one file and one ID; one changed byte gives another ID, and the comparison the check prints
    names that file and what differs. A non-reproducible build (siftool's random ID and clock)
    of the same files is told apart by its header alone."""
    epoch = 1_700_000_000
    root = _tiny(tmp_path / "root", "print('a')\n")
    objs = {"inspect-metadata.json": b"{}"}
    a = sif_builder.assemble(root, b"Bootstrap: x\n", tmp_path / "a.sif", objs, epoch=epoch)
    time.sleep(1.1)
    os.utime(root / "etc/os-release")
    b = sif_builder.assemble(root, b"Bootstrap: x\n", tmp_path / "b.sif", objs, epoch=epoch)
    assert sha256(a) == sha256(b)
    assert sif_builder.compare(a, b) == []
    (root / "opt/hpcdask/venv/lib/hpcdask/cli.py").write_text("print('b')\n")
    c = sif_builder.assemble(root, b"Bootstrap: x\n", tmp_path / "c.sif", objs, epoch=epoch)
    ida, idc = sifmod.read_header(a).id, sifmod.read_header(c).id
    assert ida != idc
    assert sif_builder.compare(a, c) == [f"header ID: {ida} != {idc}",
                                         "/opt/hpcdask/venv/lib/hpcdask/cli.py: content differs"]
    other = sif_builder.renew(a, tmp_path / "other.sif")
    lines = sif_builder.compare(a, other)
    assert lines[0].startswith(f"header ID: {ida} != ")
    assert lines[-1] == "root filesystem: the same files, modes, owners, times and contents"
    assert hashlib.sha256(a.read_bytes()).hexdigest() != sha256(other)


def test_a_bad_source_date_epoch_or_image_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "containers")}
    r = subprocess.run([sys.executable, "-m", "imagebuild.image", "epoch"], capture_output=True,
                       text=True, env={**env, "SOURCE_DATE_EPOCH": "yesterday"}, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "SOURCE_DATE_EPOCH='yesterday'" in r.stderr
    (tmp_path / "x.sif").write_text("not a sif")
    for target, says in ((tmp_path / "x.sif", "is not a SIF file"), (tmp_path / "none.sif", "no such file")):
        r = subprocess.run([sys.executable, "-m", "imagebuild.sif", "check", str(target)],
                           capture_output=True, text=True, env=env, check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and says in r.stderr and "make sif-check SIF=" in r.stderr
    r = subprocess.run([sys.executable, "-m", "imagebuild.image", "epoch"], capture_output=True,
                       text=True, env={k: v for k, v in env.items() if k != "SOURCE_DATE_EPOCH"},
                       check=True)
    last = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct", "--", "containers",
                           "src", "pyproject.toml"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == last.stdout.strip()


def test_a_pin_the_archive_lacks_stops_the_build_with_one_line_and_no_sif(tmp_path):
    """debian.lock pins a version Debian does not serve: install.sh's one line names the package,
    the version and the command that refreshes the lock; exit 2; no dask.sif, no image cached."""
    ctx = tmp_path / "checkout"
    (ctx / "containers").mkdir(parents=True)
    for f in ("dask.def", "install.sh", "requirements.lock", "debian.lock"):
        shutil.copyfile(REPO / "containers" / f, ctx / "containers" / f)
    shutil.copyfile(REPO / "pyproject.toml", ctx / "pyproject.toml")
    shutil.copytree(REPO / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__"))
    lock = ctx / "containers" / "debian.lock"
    pins = lock.read_text()
    tini = next(ln for ln in pins.splitlines() if ln.startswith("tini="))
    lock.write_text(pins.replace(tini, "tini=0.0.1-hpcdask-not-in-debian"))
    cache, out = tmp_path / "cache", tmp_path / "dask.sif"
    env = {**os.environ, "PYTHONPATH": str(REPO / "containers")}
    r = subprocess.run([sys.executable, "-m", "imagebuild.sif", "build", "--cache", str(cache),
                        "--base-cache", str(image_builder.DEFAULT_CACHE), "--context", str(ctx),
                        "--def", str(ctx / "containers" / "dask.def"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env=env, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    line = ("install.sh: containers/debian.lock pins tini=0.0.1-hpcdask-not-in-debian, which the "
            "Debian archive no longer serves: refresh the lock with `make debian-lock` and rebuild")
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("install.sh:")] == [
        line + " (or build from snapshot.debian.org)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == []


def test_the_debian_layer_is_the_lock_and_hpcdask_versions_shows_it(sif, image):
    """Every Debian package of the image is installed at the version debian.lock pins, no other
    is, and ``hpcdask versions --all`` inside the image lists them."""
    lock = REPO / "containers" / "debian.lock"
    pins = sorted(ln for ln in lock.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    status = (image / "var/lib/dpkg/status").read_text().split("\n\n")
    have = sorted(f"{f['Package']}={f['Version']}" for f in (
        dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln and not ln.startswith(" "))
        for block in status if block.strip()) if f.get("Status", "").endswith(" installed"))
    assert have == pins
    assert (image / "opt/hpcdask/debian.lock").read_bytes() == lock.read_bytes()
    r = subprocess.run([str(REPO / "tests/testcluster/bin/apptainer"), "exec", str(sif),
                        "hpcdask", "versions", "--all"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    head = f"debian {len(pins)} packages, debian.lock sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}: "
    assert any(ln.startswith(head + "python3.11 ") for ln in r.stdout.splitlines()), r.stdout
    listed = sorted(ln.strip().replace(" ", "=", 1) for ln in r.stdout.splitlines() if ln.startswith("  "))
    assert listed == pins
