"""The CI guard (tests/testcluster/ciguard.py) on a small project of its own, run by pytester in a
subprocess: named end-to-end tests are required, and the verdict does not depend on the
reporter options."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]

CONFTEST = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from ciguard import CIGuard

def pytest_configure(config):
    required = {{"image": ("tests/test_image.py::test_percent_test",)}}
    config.pluginmanager.register(CIGuard(Path(__file__).parent / "tests", required), "guard")
"""

IMAGE_TESTS = """
import os
import pytest

def test_cheap():
    pass

def test_percent_test():
    if os.environ.get("E2E") == "skip":
        pytest.skip("no image here")
    assert os.environ.get("E2E") != "fail"
"""

OPTIONS = [[], ["-q"], ["-qq"], ["-rA"], ["--tb=no"], ["-p", "no:terminal"], ["-q", "-rs"]]


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_image.py").write_text(IMAGE_TESTS)
    return pytester


def run(project, monkeypatch, options, e2e="pass", ci="true", args=("tests",)):
    monkeypatch.setenv("E2E", e2e)
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    return project.runpytest_subprocess(*args, "-p", "no:cacheprovider", *options)


def output(result) -> str:
    return "\n".join(result.outlines + result.errlines)


@pytest.mark.parametrize("options", OPTIONS, ids=" ".join)
def test_required_test_passing_is_green(project, monkeypatch, options):
    result = run(project, monkeypatch, options)
    assert result.ret == 0, output(result)
    assert "CI GUARD" not in output(result)


@pytest.mark.parametrize("options", OPTIONS, ids=" ".join)
def test_only_the_cheap_test_passing_fails(project, monkeypatch, options):
    """The kind's cheap test passed, its end-to-end test was deselected: not proof."""
    result = run(project, monkeypatch, [*options, "--deselect",
                                        "tests/test_image.py::test_percent_test"])
    assert result.ret == 1, output(result)
    assert ("CI GUARD: the required image test tests/test_image.py::test_percent_test was not "
            "collected (renamed?)") in output(result)


@pytest.mark.parametrize("options", OPTIONS, ids=" ".join)
def test_a_skipped_required_test_fails(project, monkeypatch, options):
    result = run(project, monkeypatch, options, e2e="skip")
    assert result.ret == 1, output(result)
    text = output(result)
    assert "CI GUARD: skipped in CI: tests/test_image.py::test_percent_test" in text
    assert "CI GUARD: the required image test tests/test_image.py::test_percent_test did not pass" in text


def test_a_failing_required_test_is_named_too(project, monkeypatch):
    result = run(project, monkeypatch, ["-q"], e2e="fail")
    assert result.ret == 1
    assert "tests/test_image.py::test_percent_test did not pass" in output(result)


def test_outside_ci_a_skip_is_only_a_skip(project, monkeypatch):
    result = run(project, monkeypatch, ["-q"], e2e="skip", ci=None)
    assert result.ret == 0, output(result)
    assert "CI GUARD" not in output(result)


def test_a_partial_run_needs_no_end_to_end_test(project, monkeypatch):
    result = run(project, monkeypatch, ["-q"], args=("tests/test_image.py::test_cheap",))
    assert result.ret == 0, output(result)
