"""hpcdask clean: stale per-cluster folders are removed; live ones and other users' never."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hpcdask import clean, security

HPCDASK = [sys.executable, "-m", "hpcdask"]


def _sched_file(folder, address, host=None, pid=None):
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / "scheduler.json").write_text(json.dumps(
        {"address": address, "hpcdask": {"host": host or socket.gethostname(), "pid": pid}}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _old(folder, age=3600):
    t = time.time() - age
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


@pytest.fixture
def shared(tmp_path, monkeypatch):
    d = tmp_path / "clusters"
    d.mkdir()
    monkeypatch.setenv("HPCDASK_SHARED_DIR", str(d))
    return d


def run(*args, env=None):
    return subprocess.run([*HPCDASK, "clean", *args], capture_output=True, text=True,
                          timeout=60, env=env or os.environ.copy())


def test_clean_removes_only_stale_folders(shared):
    with socket.socket() as live_sock:
        live_sock.bind(("127.0.0.1", 0))
        live_sock.listen()
        live_addr = f"tls://127.0.0.1:{live_sock.getsockname()[1]}"
        _sched_file(shared / "live", live_addr)
        security.create(shared / "live", "live")
        _sched_file(shared / "ended", "tls://127.0.0.1:1", pid=_dead_pid())
        security.create(shared / "ended", "ended")
        clean.stamp(security.create(shared / "jobqueue-running", "r").folder)  # this process
        jq_dead = security.create(shared / "jobqueue-dead", "d").folder
        clean.stamp(jq_dead)
        stamp = json.loads((jq_dead / clean.STAMP).read_text())
        (jq_dead / clean.STAMP).write_text(json.dumps({**stamp, "pid": _dead_pid()}))
        # Expired 10 s ago, whatever the time the check takes (not_after(...) >= now + margin).
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=10)
        expired = security.create(shared / "expired", "x", past).folder
        _old(expired)
        elsewhere = security.create(shared / "elsewhere", "e").folder
        (elsewhere / clean.STAMP).write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
        _old(elsewhere)
        foreign = shared / "foreign"
        foreign.mkdir()
        os.chown(foreign, 12345, 12345)

        dry = run("--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert (shared / "ended").exists()
        proc = run()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    left = sorted(p.name for p in shared.iterdir())
    assert left == ["elsewhere", "foreign", "jobqueue-running", "live"], out
    assert f"removed {shared / 'ended'}: its process" in out
    assert f"removed {shared / 'jobqueue-dead'}" in out
    assert f"removed {shared / 'expired'}: its certificate has expired" in out
    assert f"kept {shared / 'live'}: live: its scheduler answers at {live_addr}" in out
    assert f"kept {shared / 'foreign'}: foreign: belongs to uid 12345" in out
    assert f"kept {shared / 'elsewhere'}: unknown" in out
    assert f"stale {shared / 'ended'}" in dry.stdout and "(not removed: --dry-run)" in dry.stdout


def test_clean_refuses_a_named_live_or_foreign_folder(shared):
    clean.stamp(security.create(shared / "mine-live", "m").folder)
    proc = run(str(shared / "mine-live"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"hpcdask: error: refusing to remove {shared / 'mine-live'}: "
                                   f"live, its process {os.getpid()} still runs on this host")
    assert (shared / "mine-live" / "tls").exists()
    foreign = shared / "theirs"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    proc = run(str(foreign))
    assert proc.returncode == 2 and "belongs to uid 12345, not you" in proc.stderr
    assert foreign.exists()
