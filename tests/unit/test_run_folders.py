"""A run whose output folder was not named gets a folder of its own: reruns never fail, never
overwrite, never delete (issue 32: a second `docker compose up` failed on metrics.json)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from hpcdask import provenance
from hpcdask.errors import BadInput


def finish(folder, n):
    (folder / "metrics.json").write_text(json.dumps({"run": n}))


def test_ten_runs_get_ten_folders_and_keep_every_result(tmp_path):
    default = tmp_path / "out" / "classify-small"
    folders = []
    for n in range(1, 11):
        folder = provenance.run_folder(default)
        assert folder.is_dir() and not any(folder.iterdir()), folder
        finish(folder, n)
        folders.append(folder)
    assert [f.name for f in folders] == ["classify-small"] + [f"classify-small-{n}"
                                                              for n in range(2, 11)]
    assert [json.loads((f / "metrics.json").read_text())["run"] for f in folders] == list(
        range(1, 11))


def test_an_existing_folder_is_never_written_into(tmp_path):
    default = tmp_path / "r"
    default.mkdir()  # an earlier run's (or the user's own): left alone
    (default / "notes.txt").write_text("mine")
    assert provenance.run_folder(default) == tmp_path / "r-2"
    (tmp_path / "r-3").mkdir()
    assert provenance.run_folder(default) == tmp_path / "r-4"
    assert [p.name for p in default.iterdir()] == ["notes.txt"]
    assert (default / "notes.txt").read_text() == "mine"


def test_runs_started_together_get_different_folders(tmp_path):
    got, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        got.append(provenance.run_folder(tmp_path / "w"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8, got


def test_an_unwritable_parent_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="cannot create the output folder"):
        provenance.run_folder(tmp_path / "file" / "x")


def test_a_user_without_a_name_still_stamps_files(monkeypatch):
    """A container run as an arbitrary uid (HPCDASK_UID=4242) has no passwd entry."""
    import getpass

    from hpcdask import files

    def no_name():
        raise KeyError("getpwuid(): uid not found: 4242")

    monkeypatch.setattr(getpass, "getuser", no_name)
    assert files.user_name() == f"uid {os.getuid()}"
