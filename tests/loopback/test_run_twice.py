"""`hpcdask run` twice in one folder on a real LocalCluster: the second run gets a folder of its
own (issue 32: a second `docker compose up` failed on metrics.json). The folder logic alone is
tests/unit/test_run_folders.py."""

from __future__ import annotations

from click.testing import CliRunner

from hpcdask.cli import main


def test_hpcdask_run_twice_with_the_default_output(tmp_path, monkeypatch):
    """The real `hpcdask run` twice in one folder (LocalCluster): both exit 0, two folders."""
    monkeypatch.chdir(tmp_path)
    args = ["run", "--size", "small", "--n-workers", "1", "--threads-per-worker", "1"]
    for _ in range(2):
        r = CliRunner().invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (tmp_path / "hpcdask-output").iterdir())
    assert len(runs) == 2 and runs[1] == runs[0] + "-2", runs
    for r in runs:
        assert (tmp_path / "hpcdask-output" / r / "metrics.json").is_file()
