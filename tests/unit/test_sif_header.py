"""hpcdask.sif reads the SIF header (the image's ID) as siftool does, and roles carry the ID."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from hpcdask import sif, versions


@pytest.fixture
def new_sif(tmp_path):
    if shutil.which("siftool") is None:
        pytest.fail("siftool is missing: apt-get install siftool (required: these tests run in CI)")
    path = tmp_path / "a.sif"
    subprocess.run(["siftool", "new", str(path)], check=True)
    return path


def siftool_id(path) -> str:
    out = subprocess.run(["siftool", "header", str(path)], capture_output=True, text=True, check=True)
    return next(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("ID:"))


def test_header_id_is_siftools(new_sif, tmp_path):
    other = tmp_path / "b.sif"
    subprocess.run(["siftool", "new", str(other)], check=True)
    assert sif.read_header(new_sif).id == siftool_id(new_sif)
    assert sif.read_header(other).id == siftool_id(other) != siftool_id(new_sif)
    assert sif.read_header(new_sif).version == "01"


@pytest.mark.parametrize("content", [b"", b"#!/bin/sh\n" + b"\0" * 200])
def test_not_a_sif(tmp_path, content):
    p = tmp_path / "x.sif"
    p.write_bytes(content)
    with pytest.raises(ValueError):
        sif.read_header(p)


def test_image_id_sources(new_sif, tmp_path, monkeypatch):
    monkeypatch.setattr(sif, "IMAGE_SIF", str(tmp_path / "none.sif"))
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    assert sif.image_id() is None
    monkeypatch.setenv("APPTAINER_CONTAINER", str(tmp_path))  # a sandbox folder: no ID
    assert sif.image_id() is None
    monkeypatch.setenv("APPTAINER_CONTAINER", str(new_sif))
    assert sif.image_id() == siftool_id(new_sif)
    placeholder = tmp_path / "image.sif"
    placeholder.write_bytes(b"")  # the image's empty placeholder, nothing bound on it
    monkeypatch.setattr(sif, "IMAGE_SIF", str(placeholder))
    assert sif.image_id() == siftool_id(new_sif)
    shutil.copyfile(new_sif, placeholder)  # the launchers' bind wins
    other = tmp_path / "b.sif"
    subprocess.run(["siftool", "new", str(other)], check=True)
    monkeypatch.setenv("APPTAINER_CONTAINER", str(other))
    assert sif.image_id() == siftool_id(new_sif)


def test_identity_carries_the_sif_id_and_differs_between_builds(new_sif, tmp_path, monkeypatch):
    info = tmp_path / "image.json"
    info.write_text(json.dumps({"lock_sha256": "ab" * 32}))
    monkeypatch.setenv("HPCDASK_IMAGE_INFO", str(info))
    monkeypatch.setattr(sif, "IMAGE_SIF", str(new_sif))
    mine = versions.identity()
    assert mine["image"] == f"lock:{'ab' * 8} sif:{siftool_id(new_sif)}"
    other = tmp_path / "b.sif"
    subprocess.run(["siftool", "new", str(other)], check=True)
    monkeypatch.setattr(sif, "IMAGE_SIF", str(other))
    rows = versions.differences(mine, {"worker w1": versions.identity()})
    assert [r[0] for r in rows] == ["sif"]  # same lock, another build
    line = versions.summary(rows)
    assert siftool_id(new_sif) in line and siftool_id(other) in line
