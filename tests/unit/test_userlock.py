"""``hpcdask image lock`` and ``hpcdask.lock``: parsing, staleness, and pip's resolution against
a base lock, offline (``PIP_NO_INDEX=1`` + ``PIP_FIND_LINKS`` to a wheelhouse the test builds).

The base lock here is a small one the test writes (pinning ``tinybase==1.2.0``), so the conflict
and the addition do not depend on what this venv has installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpcdask import userlock
from hpcdask.errors import BadInput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _project(folder: Path, name: str, version: str, deps: list[str] = ()) -> Path:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "{version}"
        dependencies = {list(deps)!r}
        """).replace("'", '"'))
    return folder


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """tinybase 0.9.0 and 1.2.0, tinyadd 2.0.0: pure-Python wheels built here, offline."""
    root = tmp_path_factory.mktemp("wheels")
    house = root / "house"
    for name, version in [("tinybase", "0.9.0"), ("tinybase", "1.2.0"), ("tinyadd", "2.0.0")]:
        src = _project(root / f"{name}-{version}", name, version)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", "-w", str(house), str(src)],
                       check=True, env=_offline(house))
    return house


def _offline(house: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(house)}


@pytest.fixture
def project(tmp_path, wheelhouse, monkeypatch) -> Path:
    """A project folder: a local package ./mypkg (needing tinybase, which the base pins) and a
    requirements.txt; a base lock pinning tinybase==1.2.0; pip offline on the wheelhouse."""
    for k, v in _offline(wheelhouse).items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("PIP_") and k not in _offline(wheelhouse)]:
        monkeypatch.delenv(k)
    _project(tmp_path / "mypkg", "mypkg", "0.3.0", ["tinybase>=1"])
    (tmp_path / "requirements.txt").write_text("tinyadd>=2\n./mypkg\n")
    (tmp_path / "base.lock").write_text("tinybase==1.2.0 \\\n    --hash=sha256:00\n")
    return tmp_path


def _lock(project: Path, requirements: str = "requirements.txt") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcdask", "image", "lock", "-r", requirements,
         "--base-lock", "base.lock"],
        cwd=project, capture_output=True, text=True, timeout=600, check=False)


def test_lock_holds_only_the_additions_with_hashes(project, wheelhouse):
    proc = _lock(project)
    assert proc.returncode == 0, proc.stderr
    lock = userlock.parse(project / "hpcdask.lock")
    wheel = next(wheelhouse.glob("tinyadd-2.0.0-*.whl"))
    assert lock.pins == {"tinyadd": ("2.0.0", [userlock.sha256(wheel)])}
    assert lock.local == {"mypkg": ("0.3.0", "./mypkg")}  # tinybase stays the base's
    assert lock.base_lock_sha256 == userlock.sha256(project / "base.lock")
    assert lock.requirements_sha256 == userlock.sha256(project / "requirements.txt")
    assert userlock.stale(project / "hpcdask.lock", project / "requirements.txt",
                          project / "base.lock") is None


@pytest.mark.parametrize(("requirement", "expected"), [
    ("tinybase<1", "requirements.txt asks for tinybase<1 but the image pins tinybase==1.2.0; "),
    ("nosuchpkg-xyz", "no distribution found for nosuchpkg-xyz (from requirements.txt)"),
])
def test_bad_requirement_is_one_line_exit_2_nothing_written(project, requirement, expected):
    (project / "requirements.txt").write_text(f"{requirement}\n")
    proc = _lock(project)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpcdask: error: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["base.lock", "mypkg", "requirements.txt"]


def _written(tmp_path: Path) -> Path:
    (tmp_path / "requirements.txt").write_text("tinyadd\n")
    (tmp_path / "base.lock").write_text("tinybase==1.2.0\n")
    lock = userlock.UserLock(userlock.sha256(tmp_path / "base.lock"),
                             userlock.sha256(tmp_path / "requirements.txt"), python="3.11.2",
                             platform="linux-x86_64",
                             pins={"tinyadd": ("2.0.0", ["ab" * 32, "cd" * 32])},
                             local={"mypkg": ("0.3.0", "./mypkg")})
    (tmp_path / "hpcdask.lock").write_text(lock.text())
    return tmp_path


def test_parse_reads_back_what_text_writes(tmp_path):
    lock = userlock.parse(_written(tmp_path) / "hpcdask.lock")
    assert lock.pins == {"tinyadd": ("2.0.0", ["ab" * 32, "cd" * 32])}
    assert lock.local == {"mypkg": ("0.3.0", "./mypkg")}
    assert (lock.python, lock.platform) == ("3.11.2", "linux-x86_64")


def test_stale_names_what_changed(tmp_path):
    _written(tmp_path)
    args = (tmp_path / "hpcdask.lock", tmp_path / "requirements.txt", tmp_path / "base.lock")
    assert userlock.stale(*args) is None
    (tmp_path / "requirements.txt").write_text("tinyadd>=2\n")
    assert "requirements.txt changed since" in userlock.stale(*args)
    _written(tmp_path)
    (tmp_path / "base.lock").write_text("tinybase==1.3.0\n")
    assert "another base image lock" in userlock.stale(*args)
    (tmp_path / "hpcdask.lock").unlink()
    assert "is missing" in userlock.stale(*args)


def test_a_file_without_the_header_is_not_a_lock(tmp_path):
    (tmp_path / "hpcdask.lock").write_text("tinyadd==2.0.0\n")
    with pytest.raises(BadInput, match="is not an hpcdask.lock"):
        userlock.parse(tmp_path / "hpcdask.lock")


def test_the_image_label_names_the_project_lock(tmp_path, monkeypatch):
    from hpcdask import versions

    info = tmp_path / "image.json"
    info.write_text('{"lock_sha256": "' + "a" * 64 + '"}')
    monkeypatch.setenv("HPCDASK_IMAGE_INFO", str(info))
    base = versions.image_label()
    info.write_text('{"lock_sha256": "' + "a" * 64 + '", "project": {"lock_sha256": "'
                    + "b" * 64 + '"}}')
    user = versions.image_label()
    assert base.startswith(f"lock:{'a' * 16}") and "user:" not in base
    assert user.startswith(f"lock:{'a' * 16} user:{'b' * 16}")
    assert versions._flat({"image": base})["image"] != versions._flat({"image": user})["image"]


def test_provenance_digests_the_code_folder(tmp_path):
    from hpcdask import provenance

    (tmp_path / "helpers.py").write_text("def f(x):\n    return x\n")
    first = provenance.code_digest(tmp_path)
    assert set(first) == {"folder", "py_sha256"}
    (tmp_path / "helpers.py").write_text("def f(x):\n    return x + 1\n")
    assert provenance.code_digest(tmp_path)["py_sha256"] != first["py_sha256"]
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = provenance.code_digest(tmp_path)
    assert len(clean["git_commit"]) == 40 and clean["git_dirty"] is False
    (tmp_path / "helpers.py").write_text("changed = True\n")
    assert provenance.code_digest(tmp_path)["git_dirty"] is True
