"""Every bad input: one line that names what is wrong and how to fix it, exit code 2,
and nothing half-written. Each row is run through the real command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HPCDASK = [sys.executable, "-m", "hpcdask"]


def private(tmp_path: Path, name: str = "cluster") -> Path:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return d


def case_unknown_interface_scheduler(tmp_path):
    return ["scheduler", "--scheduler-file", str(tmp_path / "c" / "s.json"), "--interface", "ib9"], \
        "interface 'ib9' does not exist"


def case_unknown_interface_worker(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "nope0"], \
        "interfaces here: "


def case_unwritable_scheduler_folder(tmp_path):
    return ["scheduler", "--scheduler-file", "/proc/hpcdask-nope/s.json", "--interface", "lo"], \
        "cannot create the scheduler file folder /proc/hpcdask-nope"


def case_stale_scheduler_file(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text(json.dumps({"address": "tls://10.0.0.1:8786",
                                          "hpcdask": {"job": "4242", "owner": "alice"}}))
    return ["scheduler", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], (
        f"(job 4242, owner alice); another scheduler uses it: give this one its own file, or, "
        f"if that scheduler has ended, delete the stale file: rm {d / 's.json'}")


def case_open_scheduler_folder(tmp_path):
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return ["scheduler", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        f"has mode 0755, open to others; the cluster's credentials need a private folder: chmod 700 {d}"


def case_wait_workers_without_a_cluster(tmp_path):
    return ["run", "--wait-workers", "2"], \
        "--wait-workers waits for a cluster's workers; give --scheduler-file F too"


def case_bad_wait_timeout(tmp_path):
    return ["client", __file__, "--scheduler-file", str(tmp_path / "s.json"), "--wait-workers", "2",
            "--wait-timeout", "soon"], \
        "--wait-timeout 'soon' is not a duration; give e.g. --wait-timeout 300s or 10m"


def case_bad_memory_string(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--memory-limit", "4XB"], "--memory-limit '4XB' is not a size; write it like 4GiB"


def case_zero_threads(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--nthreads", "0"], "--nthreads 0 must be at least 1"


def case_zero_workers(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--nworkers", "0"], "--nworkers 0 must be at least 1"


def case_unknown_memory_preset(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--memory-preset", "nolocal"], "unknown memory preset 'nolocal'; use one of: default, no-local-storage"


def case_missing_local_directory(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--local-directory", str(tmp_path / "nope")], "does not exist; create it or pick another with --local-directory"


def case_bad_lifetime(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--lifetime", "soon"], "--lifetime 'soon' is not a duration"


def case_job_ends_too_soon(tmp_path):
    import time
    return ["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo",
            "--lifetime", "auto", "--job-end", str(time.time() + 30)], "less than the retirement margin"


def case_missing_scheduler_file(tmp_path):
    return ["worker", "--scheduler-file", str(tmp_path / "none.json"), "--interface", "lo"], \
        "did not appear within 1s; start the scheduler first"


def case_scheduler_file_not_json(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text("{not json")
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], "is not JSON"


def case_credentials_folder_open(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / "s.json").write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        f"credentials folder {d} has mode 0755, readable by others; make it private: chmod 700 {d}"


def tls_set(d):
    """A credentials set as the scheduler lays it out: tls -> .tls-x/ (private)."""
    (d / ".tls-x").mkdir(mode=0o700)
    (d / "tls").symlink_to(".tls-x")
    return d / ".tls-x"


def case_tls_missing_after_the_cluster_ended(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        f"credentials folder {d} holds no credentials (tls is missing)"


def case_tls_file_not_certificate(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    tls = tls_set(d)
    for name in ("ca.pem", "cluster.pem", "cluster.key"):
        (tls / name).write_text("not a certificate\n")
        os.chmod(tls / name, 0o600)
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        f"TLS file {tls / 'ca.pem'} is not a PEM certificate"


def case_tls_file_readable_by_others(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    tls = tls_set(d)
    for name in ("ca.pem", "cluster.pem", "cluster.key"):
        (tls / name).write_text("x\n")
        os.chmod(tls / name, 0o644)
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        f"TLS file {tls / 'ca.pem'} has mode 0644, readable by others; make it private: chmod 600"


def case_plain_scheduler_refused(tmp_path):
    d = private(tmp_path)
    (d / "s.json").write_text(json.dumps({"address": "tcp://127.0.0.1:1"}))
    return ["worker", "--scheduler-file", str(d / "s.json"), "--interface", "lo"], \
        "runs without TLS and hpcdask refuses plain connections"


def case_plain_address_refused(tmp_path):
    return ["run", "--address", "tcp://127.0.0.1:1", "--output", str(tmp_path / "o")], \
        "is a plain connection and hpcdask refuses those; use --scheduler-file F (TLS)"


def case_unknown_workload(tmp_path):
    return ["run", "--workload", "pipelin", "--output", str(tmp_path / "o")], \
        "unknown workload 'pipelin'; did you mean --workload pipeline?"


def case_missing_user_script(tmp_path):
    return ["client", str(tmp_path / "analysis.py"), "--scheduler-file", str(tmp_path / "s.json")], \
        "does not exist; give the path of your Python script"


def case_port_in_use(tmp_path, _held=[]):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _held.append(s)  # kept open until the process ends
    port = s.getsockname()[1]
    return ["scheduler", "--scheduler-file", str(tmp_path / "c" / "s.json"), "--interface", "lo",
            "--port", str(port)], f"port {port} on 127.0.0.1 is already in use; pick another with --port"


def case_bad_memory_for_local_cluster(tmp_path):
    return ["run", "--memory-limit", "lots", "--output", str(tmp_path / "o")], \
        "--memory-limit 'lots' is not a size"


def case_output_has_metrics(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.json").write_text("{}")
    return ["run", "--output", str(tmp_path / "o")], "exists from an earlier run"


def case_malformed_config(tmp_path):
    d = tmp_path / "daskcfg"
    d.mkdir()
    (d / "broken.yaml").write_text("distributed:\n  worker: [\n")
    return (["versions"], {"DASK_CONFIG": str(d)}), f"Dask config file {d / 'broken.yaml'} is malformed"


def case_bad_short_env_value(tmp_path):
    return (["worker", "--scheduler-file", str(tmp_path / "s.json")], {"HPCDASK_INTERFACE": "ib7"}), \
        "interface 'ib7' does not exist"


def case_worker_imports_not_a_list(tmp_path):
    return (["worker", "--scheduler-file", str(tmp_path / "s.json"), "--interface", "lo"],
            {"HPCDASK_WORKER_IMPORTS": "{numpy: 1}"}), \
        "hpcdask.worker-imports must be a list of module names"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input(case, tmp_path):
    args, expected = case(tmp_path)
    env = dict(os.environ, HPCDASK_SCHEDULER_FILE_TIMEOUT="1")
    if isinstance(args, tuple):
        args, extra = args
        env.update(extra)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run([*HPCDASK, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr  # one line, no traceback, no usage block
    assert lines[0].startswith("hpcdask: error: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    # Nothing half-written: no new files (the output folder of `run` may be created empty).
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert set(after) <= set(before)


def test_table_is_large_enough():
    assert len(CASES) >= 15


def test_a_worker_started_with_its_scheduler_checks_its_interface_after_the_file(tmp_path):
    """--with-scheduler (the all-in-one job): a wrong interface is not reported while the
    scheduler file is missing (the scheduler, sharing the setting, reports it once and the job
    stops the worker); once a scheduler has published the file, the worker's own one line."""
    d = private(tmp_path)
    f = d / "s.json"
    env = dict(os.environ, HPCDASK_SCHEDULER_FILE_TIMEOUT="60")
    proc = subprocess.Popen([*HPCDASK, "worker", "--scheduler-file", str(f), "--interface",
                             "nope0", "--with-scheduler"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        # A plain worker reports this within a second or two (case_unknown_interface_worker).
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=6)
        tmp = d / "s.json.tmp"
        tmp.write_text(json.dumps({"address": "tls://127.0.0.1:9"}))
        tmp.rename(f)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("hpcdask: error: interface 'nope0' does not exist") and \
        "interfaces here: " in lines[0]
