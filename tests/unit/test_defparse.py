"""containers/dask.def read as Apptainer reads it, and kept in step with the Dockerfile.

The parser is containers/imagebuild/image.py's (Apptainer's rules); spython, a third-party parser of
def files, cross-checks the header and %files.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from imagebuild import image

DEF = REPO / "containers" / "dask.def"
DOCKERFILE = REPO / "containers" / "Dockerfile"
INSTALL = REPO / "containers" / "install.sh"


@pytest.fixture(scope="module")
def defn() -> image.Definition:
    return image.parse_def(DEF.read_text())


def heredocs(body: str) -> list[str]:
    """The bodies of ``python - <<'EOF' ... EOF`` heredocs of a shell section."""
    return re.findall(r"python3? - [^\n]*<<'EOF'\n(.*?)\nEOF\n", body, re.DOTALL)


def test_header_pins_the_base_by_digest(defn):
    assert defn.header["bootstrap"] == "docker"
    assert re.fullmatch(r"debian:bookworm-slim@sha256:[0-9a-f]{64}", defn.header["from"])


def test_dockerfile_uses_the_same_base(defn):
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert m and m.group(1) == defn.header["from"]


def test_files_come_from_the_repository_root(defn):
    dsts = {dst: src for src, dst in defn.files}
    assert dsts["/opt/hpcdask/build/requirements.lock"] == "containers/requirements.lock"
    assert dsts["/opt/hpcdask/build/install.sh"] == "containers/install.sh"
    for src, _ in defn.files:
        assert (REPO / src).exists(), f"%files source {src} is missing from the repository"


def test_dockerfile_copies_the_same_inputs(defn):
    text = DOCKERFILE.read_text()
    for src, _ in defn.files:
        assert re.search(rf"^COPY .*\b{re.escape(src)}\b", text, re.MULTILINE), src


def test_spython_agrees_on_header_and_files(defn):
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(DEF)).recipe["spython-base"]
    assert recipe.fromHeader == defn.header["from"]
    assert [tuple(f.split()) for f in recipe.files] == defn.files


def test_sections_are_verbatim_and_heredocs_are_valid_python(defn):
    post, test = defn.body("post"), defn.body("test")
    assert "bash /opt/hpcdask/build/install.sh" in post
    assert 'exec hpcdask "$@"' in defn.body("runscript")
    assert '[ "$#" -gt 0 ] || set -- run' in defn.body("runscript")  # `apptainer run dask.sif`
    docs = heredocs(post) + heredocs(test)
    assert docs, "expected a python heredoc in %post"
    for code in docs:
        ast.parse(code)  # an indented heredoc body would be an IndentationError in the image
    for section in ("post", "test", "runscript", "environment"):
        subprocess.run(["sh", "-n", "-c", defn.body(section)], check=True)


def test_written_scripts_look_like_apptainers(defn):
    runscript = image.script(defn.sections["runscript"])
    assert runscript.startswith("#!/bin/sh\n\n") and runscript.endswith('exec hpcdask "$@"\n')


def test_environment_follows_the_image_contract(defn):
    env = defn.body("environment")
    for line in ('export PATH="/opt/hpcdask/venv/bin:', "export PYTHONNOUSERSITE=1",
                 "export PYTHONPATH= PYTHONHOME=", "export DASK_ROOT_CONFIG=/opt/hpcdask/etc/dask",
                 "export HPCDASK_IMAGE_INFO=/opt/hpcdask/image.json", "export LC_ALL=C.UTF-8"):
        assert line in env, line


def test_dockerfile_env_matches_apptainer_environment(defn):
    docker = dict(re.findall(r"^ENV (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))
    apptainer = dict(re.findall(r"^\s*export (\w+)=\"?([^\"\s$]+)", defn.body("environment"), re.MULTILINE))
    for key in ("PYTHONNOUSERSITE", "DASK_ROOT_CONFIG", "HPCDASK_IMAGE_INFO", "LC_ALL", "VIRTUAL_ENV"):
        assert docker[key] == apptainer[key], key
    assert docker["PATH"].startswith("/opt/hpcdask/venv/bin:")


def test_labels(defn):
    assert defn.labels["org.hpcdask.recipe"] == "apptainer"
    assert "org.hpcdask.lock-sha256" in defn.body("post")


def test_parser_rules():
    d = image.parse_def(
        "# comment\nBootstrap: docker\nFrom: x:y  # trailing\n\n"
        "%files\n    a /b\n    c\n# not a file\n"
        "%post -c /bin/bash\n    echo 1\n  %labels\n    k v w\n"
        "%runscript\n#!/usr/bin/env python3\nprint(1)\n"
    )
    assert d.header == {"bootstrap": "docker", "from": "x:y"}
    assert d.files == [("a", "/b"), ("c", "c")]
    assert d.sections["post"].args == "-c /bin/bash" and d.body("post") == "    echo 1\n"
    assert d.labels == {"k": "v w"}
    assert image.script(d.sections["post"]).startswith("#!/bin/sh -c /bin/bash\n\n")
    assert image.script(d.sections["runscript"]) == "#!/usr/bin/env python3\nprint(1)\n"
    with pytest.raises(ValueError, match="invalid section"):
        image.parse_def("Bootstrap: docker\n%nonsense\n")


def test_install_script_is_clean_shell():
    text = INSTALL.read_text()
    assert "set -euo pipefail" in text
    assert "--require-hashes --no-deps -r" in text
    assert "--no-deps --no-build-isolation --no-index" in text
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
