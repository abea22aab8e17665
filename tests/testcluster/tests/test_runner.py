"""The bubblewrap stand-in for Apptainer (tests/testcluster/bin/apptainer) behaves like Apptainer.

Everything here runs for real: a tiny sandbox image is made from the debootstrap base
(containers/imagebuild/base.sh, cached outside the repository) by hard-linking it and adding a
/.singularity.d/ of its own; the host's Python is bound in for the user-site check. These tests
need root, bubblewrap and debootstrap; without them they FAIL (the project requires them in CI).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"
BASE_SH = REPO / "containers" / "imagebuild" / "base.sh"

def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60):
    return subprocess.run([str(RUNNER), *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def sh(image: Path, script: str, *opts: str, **kw):
    return run("exec", *opts, str(image), "/bin/sh", "-c", script, **kw)


def test_exec_exit_code_and_output(sandbox):
    assert sh(sandbox, "echo hello").stdout == "hello\n"
    assert sh(sandbox, "exit 7").returncode == 7
    assert run("exec", str(sandbox), "false").returncode == 1


def test_image_is_read_only(sandbox):
    for path in ("/usr/new-file", "/etc/new-file", "/new-file", "/.singularity.d/x"):
        r = sh(sandbox, f"touch {path}")
        assert r.returncode != 0 and "Read-only file system" in r.stderr, path


def test_default_binds_home_cwd_tmp(sandbox, tmp_path):
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "in-home").write_text("h")
    (work / "in-work").write_text("w")
    marker = Path("/tmp") / f"runner-test-{os.getpid()}"
    r = sh(sandbox, f'pwd; cat "$HOME/in-home" in-work; echo inside > {marker}',
           env={"HOME": str(home)}, cwd=work)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{work}\nhw"
        assert marker.read_text() == "inside\n"  # /tmp is the host's
    finally:
        marker.unlink(missing_ok=True)


def test_bind_options(sandbox, tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("data\n")
    r = sh(sandbox, "cat /mnt/f && echo more > /mnt/g", "--bind", f"{src}:/mnt")
    assert r.returncode == 0, r.stderr
    assert (src / "g").read_text() == "more\n"
    r = sh(sandbox, "cat /mnt/f; touch /mnt/h", "-B", f"{src}:/mnt:ro")
    assert r.stdout == "data\n" and r.returncode != 0
    # A file bound over a file of the image (how test_image.py swaps in a modified lock).
    r = sh(sandbox, "cat /etc/debian_version", "--bind", f"{src / 'f'}:/etc/debian_version")
    assert r.stdout == "data\n"
    # Several binds in one option, like Apptainer's -B a,b:c.
    r = sh(sandbox, "ls /mnt /srv", "-B", f"{src}:/mnt,{src}:/srv")
    assert r.returncode == 0 and r.stdout.count("f\n") == 2


def test_environment_passes_through_unless_cleanenv(sandbox):
    env = {"HOST_ONLY": "from-host", "PYTHONPATH": "/nowhere", "PATH": "/host/bin:/usr/bin:/bin"}
    script = 'echo "$HOST_ONLY|$FROM_IMAGE|${PYTHONPATH-unset}|$PATH"'
    r = sh(sandbox, script, env=env)
    host_only, from_image, pythonpath, path = r.stdout.strip().split("|")
    # The image sets PYTHONPATH empty: Apptainer's restore_env then unsets it.
    assert (host_only, from_image, pythonpath) == ("from-host", "yes", "unset")
    # The host's PATH is not passed (as in Apptainer); the image's env scripts set it.
    assert path.startswith("/opt/tiny/bin:") and "/host/bin" not in path
    r = sh(sandbox, script, "--cleanenv", env=env)
    assert r.stdout.strip().split("|")[:3] == ["", "yes", ""]  # not the host's: set empty
    r = sh(sandbox, "env", "-e", env=env)
    names = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    assert "HOST_ONLY" not in names and {"HOME", "PYTHONNOUSERSITE", "FROM_IMAGE"} <= names


def test_env_overrides_win_over_the_image(sandbox):
    r = sh(sandbox, 'echo "$OVERRIDDEN $EXTRA"', "--cleanenv", "--env", "OVERRIDDEN=cli",
           env={"APPTAINERENV_EXTRA": "x"})
    assert r.stdout == "cli x\n"
    r = sh(sandbox, 'echo "$OVERRIDDEN"', env={"APPTAINERENV_OVERRIDDEN": "apptainerenv"})
    assert r.stdout == "apptainerenv\n"


def test_apptainer_variables(sandbox):
    r = sh(sandbox, 'echo "$APPTAINER_CONTAINER|$APPTAINER_NAME|$SINGULARITY_CONTAINER|'
                    '$SINGULARITY_NAME|$APPTAINER_COMMAND"', "--cleanenv")
    real = str(sandbox.resolve())
    assert r.stdout.strip().split("|") == [real, "tiny", real, "tiny", "exec"]


def test_run_and_test_actions(sandbox):
    r = run("run", str(sandbox), "a", "b c")
    assert (r.returncode, r.stdout) == (3, "runscript: a b c\n")
    r = run("test", str(sandbox))
    assert (r.returncode, r.stdout) == (0, "test-script-ran\n")


def test_pwd_option(sandbox):
    assert sh(sandbox, "pwd", "--pwd", "/etc").stdout == "/etc\n"


def test_a_file_that_is_no_sif_is_refused(tmp_path):
    sif = tmp_path / "dask.sif"
    sif.write_bytes(b"\0" * 200)
    r = run("exec", str(sif), "true")
    assert r.returncode == 255
    assert r.stderr.startswith("FATAL:") and "image format not recognized" in r.stderr


def test_host_network_namespace_is_kept(sandbox):
    r = sh(sandbox, "readlink /proc/self/ns/net")
    assert r.stdout.strip() == os.readlink("/proc/self/ns/net")


def test_sigterm_reaches_the_payload(sandbox):
    script = 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    p = subprocess.Popen([str(RUNNER), "exec", str(sandbox), "/bin/sh", "-c", script],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert (p.returncode, out) == (42, "got-term\n")


def test_payload_dies_with_the_runner(sandbox, tmp_path):
    pidfile = tmp_path / "pid"
    p = subprocess.Popen([str(RUNNER), "exec", "--bind", str(tmp_path), str(sandbox),
                          "/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"])
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    payload = int(pidfile.read_text())
    p.kill()
    p.wait(timeout=20)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{payload}").exists() and "sleep" in Path(f"/proc/{payload}/comm").read_text():
        assert time.monotonic() < deadline, "payload outlived the runner"
        time.sleep(0.05)


def test_pythonnousersite_keeps_home_local_out(sandbox, tmp_path):
    """A package in ~/.local (the host's home is bound in) must not be importable."""
    home = tmp_path / "home"
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = home / ".local" / "lib" / ver / "site-packages"
    site.mkdir(parents=True)
    (site / "intruder.py").write_text("")
    # The host's interpreter, bound at a top-level path (it finds its stdlib relative to itself).
    real = Path(os.path.realpath(sys._base_executable))
    prefix = Path(sys.base_prefix)
    python = f"/hostpython/{real.relative_to(prefix)}"
    code = "import importlib.util as u; print(u.find_spec('intruder') is None)"
    opts = ("--cleanenv", "--bind", f"{prefix}:/hostpython",
            "--env", "LD_LIBRARY_PATH=/hostpython/lib")
    r = run("exec", *opts, str(sandbox), python, "-c", code, env={"HOME": str(home)})
    assert r.stdout == "True\n", r.stderr
    # Control: with the image's PYTHONNOUSERSITE overridden, the same package is found.
    r = run("exec", *opts, "--env", "PYTHONNOUSERSITE=", str(sandbox), python, "-c", code,
            env={"HOME": str(home)})
    assert r.stdout == "False\n", r.stderr


def test_start_cost(sandbox):
    """Apptainer starts in some tens of ms; the stand-in must not be much slower."""
    runs = []
    for _ in range(10):
        t0 = time.perf_counter()
        assert run("exec", str(sandbox), "true").returncode == 0
        runs.append(time.perf_counter() - t0)
    assert sorted(runs)[5] < 0.5
