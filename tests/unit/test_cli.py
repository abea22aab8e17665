"""The command line: every subcommand has help, the console script and the dask plugin work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcdask.cli import main

SUBCOMMANDS = ["run", "scheduler", "worker", "client", "versions", "preflight"]


def test_top_level_help_lists_every_role():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(main, [name, "-h"])
    assert result.exit_code == 0, result.output
    assert f"Usage: hpcdask {name}" in result.output


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(main, ["worker", "--threads", "2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "hpcdask: error: No such option '--threads'. Did you mean '--nthreads'? "
        "(see: hpcdask worker --help)"]


def test_console_script_and_dask_plugin():
    venv_bin = Path(sys.executable).parent
    out = subprocess.run([venv_bin / "hpcdask", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("hpcdask, version ")
    dask = subprocess.run([venv_bin / "dask", "hpcdask", "--help"], capture_output=True, text=True)
    assert dask.returncode == 0, dask.stderr
    assert "worker" in dask.stdout


def test_run_list_shows_workloads():
    result = CliRunner().invoke(main, ["run", "--list"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert "pipeline" in names and "smoke" in names


def test_versions_local_shows_key_packages():
    result = CliRunner().invoke(main, ["versions"])
    assert result.exit_code == 0
    assert "dask-ml 2025.1.0" in result.output and "scikit-learn 1.7.2" in result.output


def test_preflight_checks_each_setting(tmp_path):
    result = CliRunner().invoke(main, ["preflight", "--interface", "lo", "--scheduler-file",
                                       str(tmp_path / "c" / "s.json"), "--memory-limit", "1GiB"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "ok interface lo: 127.0.0.1"
    assert any(ln.startswith("ok scheduler file folder") for ln in lines)
    assert any("1024 MiB per worker" in ln for ln in lines)


def test_preflight_fails_on_a_missing_interface():
    result = CliRunner().invoke(main, ["preflight", "--interface", "ib9"])
    assert result.exit_code == 2
    assert "interface 'ib9' does not exist" in result.output
