"""The lock is what the venv holds, and the main job gives scikit-learn's answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdask import versions

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "containers" / "requirements.lock"
RUNTIME_VENV = REPO / ".venv"


def test_runtime_venv_pip_freeze_equals_the_lock():
    """`make run`'s venv: pip freeze lists exactly the lock's pins, plus hpcdask itself."""
    assert (RUNTIME_VENV / ".done").exists(), "make venv first (make test does)"
    out = subprocess.run([RUNTIME_VENV / "bin" / "pip", "freeze", "--all", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    frozen = {versions.canonical(k): v for k, v in
              (line.split("==", 1) for line in out.splitlines() if "==" in line)}
    frozen.pop("pip", None)
    assert frozen == versions.read_lock(LOCK)


def test_test_venv_holds_the_lock_too():
    """The tests run on the same pins, plus only the dev lock's test tools."""
    dev = versions.read_lock(REPO / "tests" / "requirements-dev.lock")
    diffs = versions.lock_differences(LOCK, extra_ok=frozenset({"hpcdask", *dev}))
    assert diffs == []


def test_lock_pins_every_package_with_hashes():
    text = LOCK.read_text()
    pins = versions.read_lock(LOCK)
    assert len(pins) > 40
    assert text.count("--hash=sha256:") >= len(pins)
    assert pins["distributed"] == "2026.8.0" and pins["dask"] == "2026.8.0"
    assert pins["dask-ml"] == "2025.1.0" and pins["scikit-learn"] == "1.7.2"


@pytest.mark.timeout(600)
def test_main_job_on_a_local_cluster_matches_scikit_learn(tmp_path):
    """`hpcdask run` with no cluster: the default workload on a TLS LocalCluster."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hpcdask", "run", "--output", str(out),
                           "--n-workers", "2"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"metrics: {out / 'metrics.json'}" in proc.stdout
    assert "Traceback" not in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    report = (out / "dask-report.html").read_text()
    assert len(report) > 10_000
    # The report opens offline (compute nodes have no internet): Bokeh inline, no CDN script.
    assert not re.search(r"<script[^>]+src=[\"']https?://", report)
    assert "Bokeh" in report and "cdn.bokeh.org" not in report
    assert m["workload"] == "pipeline" and m["metric"] == "accuracy"
    # Same blocks, same order, same partial_fit calls: the model may differ only by the float
    # rounding of the distributed mean/variance (1e-9 is far above that, far below any real
    # difference), and the accuracy on 4000 test rows by at most one row.
    assert m["max_coef_difference"] < 1e-9
    assert abs(m["score"] - m["baseline_score"]) <= 1 / m["data"]["test"]
    assert m["score"] > 0.6
    assert m["cluster"]["workers"] == 2 and m["cluster"]["scheduler"].startswith("tls://127.0.0.1")
    roles = m["roles"]
    assert {r.split()[0] for r in roles} == {"scheduler", "worker", "client"}
    assert len({json.dumps(r["packages"], sort_keys=True) for r in roles.values()}) == 1
    assert not list(out.glob(".partial-*"))


@pytest.mark.timeout(300)
def test_sigterm_mid_run_leaves_no_partial_results(tmp_path):
    """Slurm's time limit sends SIGTERM: one clear line, exit 143, no metrics.json, no temp files;
    provenance.json records the interrupted run."""
    import signal
    import time

    out = tmp_path / "out"
    err = tmp_path / "stderr"
    with err.open("w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "hpcdask", "run", "--size", "medium",
                                 "--n-workers", "2", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=e)
    deadline = time.time() + 180
    while "fit on the cluster ..." not in err.read_text():
        assert proc.poll() is None, err.read_text()[-2000:]
        assert time.time() < deadline, "the workload never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    text = err.read_text()
    assert text.strip().splitlines()[-1].startswith("hpcdask: interrupted by SIGTERM")
    assert "Traceback" not in text
    # No results and no temp files; only the run's record, saying how it ended.
    assert [p.name for p in out.iterdir()] == ["provenance.json"]
    assert json.loads((out / "provenance.json").read_text())["exit_status"] == 143
