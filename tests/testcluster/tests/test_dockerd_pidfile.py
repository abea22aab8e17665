"""The test engine (tests/testcluster/dockerd.py) and a stale pidfile: PIDs wrap at 32768 here and
the test clusters' nodes share the PID namespace, so the number a dead dockerd left may name
someone else's process by now. It gets no signal; the pidfile goes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dockerd import Engine  # noqa: E402


def test_a_stale_pidfile_naming_another_process_signals_nothing(tmp_path):
    other = subprocess.Popen(["sleep", "60"])  # the process the old dockerd's number now names
    engine = Engine(f"pidfile-test-{other.pid}", tmp_path)
    try:
        engine.exec_root.mkdir(parents=True)
        engine.pidfile.write_text(f"{other.pid}\n")
        engine._stop_pid()  # noqa: SLF001 - what start() and stop() call on a leftover pidfile
        assert other.poll() is None, f"the process it named got a signal: {other.returncode}"
        assert not engine.pidfile.exists()
    finally:
        other.kill()
        other.wait()
        subprocess.run(["rm", "-rf", str(engine.exec_root)], check=False)
