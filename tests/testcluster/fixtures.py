"""The test cluster and the test image as pytest fixtures (registered by ``tests/conftest.py``).

``image`` and ``sif``: the test image (containers/imagebuild: debootstrap + containers/dask.def's
sections), as a sandbox folder and as a SIF file, built once and cached by their inputs.
``slurm_cluster`` brings the cluster up once per session and tears it down at the end, even when
tests fail. If the cluster cannot be started the fixture fails loudly: these tests are required
in CI, so a missing Slurm is an error, never a skip. A cluster that was already healthy before
the session (``make cluster-up``) is left up; ``HPCDASK_CLUSTER_KEEP=1`` keeps the one the session
started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testcluster.cluster import REPO, ClusterError, SlurmCluster, cluster_sh, exports


# The SIF build started at the session's start (prebuild), while the first tests run.
_BACKGROUND: list[subprocess.Popen] = []
# Two more builds of the image, each into a fresh cache (issue 28), started at the session's start
# at the lowest CPU and I/O priority: they take the CPU the tests leave idle, and the tests
# comparing them run last. "same": this checkout again (one commit, one image); "changed": a copy
# of the checkout's build inputs with one byte of src/ changed (another image, and the check
# names the file).
_REBUILDS: dict[str, dict] = {}
CHANGED = ("src/hpcdask/__init__.py", b"containerised", b"Containerised")


def _build_cmd(module: str) -> tuple[list[str], dict[str, str]]:
    return ([sys.executable, "-m", f"imagebuild.{module}", "build"],
            {**os.environ, "PYTHONPATH": str(REPO / "containers")})


def prebuild(items) -> None:
    """Start building the SIF (and its sandbox) in the background when the session's tests will
    need it: the first ones in order (tests/compose) wait for podman's and Docker's builds of the
    same lock, each of which keeps about one of two cores busy (podman's: 152 s of CPU in 140 s),
    so the builds overlap instead of following each other. ``_built`` waits for it, then reuses its
    result (or builds again, failing as before)."""
    for name, fixture in (("same", "rebuilt_sif_cache"), ("changed", "changed_sif_build")):
        if any(fixture in item.fixturenames for item in items):
            _start_rebuild(name)
    if _BACKGROUND or not any({"sif", "image"} & set(item.fixturenames) for item in items):
        return
    cmd, env = _build_cmd("sif")
    _BACKGROUND.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))


def _start_rebuild(name: str) -> None:
    if name in _REBUILDS:
        return
    from imagebuild.image import DEFAULT_CACHE, DEFFILE, parse_def, source_date_epoch

    DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f"hpcdask-sif-rebuild-{name}-", dir=DEFAULT_CACHE.parent))
    checkout, env = REPO, dict(os.environ)
    if name == "changed":
        checkout = cache / "checkout"
        for part in ("containers", "src"):
            shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copyfile(REPO / "pyproject.toml", checkout / "pyproject.toml")
        path, old, new = CHANGED
        text = (checkout / path).read_bytes()
        assert text.count(old) >= 1 and len(old) == len(new)
        (checkout / path).write_bytes(text.replace(old, new, 1))
        # The commit's time, as this checkout's build has it (the copy has no git history).
        env["SOURCE_DATE_EPOCH"] = str(source_date_epoch(parse_def(DEFFILE.read_text()), DEFFILE, REPO))
    env["PYTHONPATH"] = str(checkout / "containers")
    cmd = ["ionice", "-c", "3", "nice", "-n", "19", sys.executable, "-m", "imagebuild.sif", "build",
           "--cache", str(cache / "build"), "--base-cache", str(DEFAULT_CACHE)]
    log = open(cache / "build.log", "w")
    _REBUILDS[name] = dict(cache=cache / "build", env=env, log=log,
                           proc=subprocess.Popen(cmd, env=env, cwd=checkout,
                                                 stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))


def _rebuilt(name: str) -> dict:
    _start_rebuild(name)
    build = _REBUILDS[name]
    proc = build["proc"]
    try:
        proc.wait(3600)
    except subprocess.TimeoutExpired:
        stop_group(proc)
    if proc.returncode != 0:
        tail = "\n".join(Path(build["log"].name).read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"the {name!r} build of the image exited {proc.returncode}\n{tail}", pytrace=False)
    return build


@pytest.fixture(scope="session")
def rebuilt_sif_cache() -> Path:
    """A fresh cache holding a second, independent build of the image (sandbox and SIF), made
    while the session ran; removed at the session's end."""
    return _rebuilt("same")["cache"]


@pytest.fixture(scope="session")
def changed_sif_build() -> dict:
    """A build, made while the session ran, of a copy of this checkout with one byte of src/
    changed (:data:`CHANGED`): its ``cache`` (sandbox and SIF) and the ``env`` that runs the
    copy's image builder at this checkout's SOURCE_DATE_EPOCH."""
    return _rebuilt("changed")


def end_prebuild() -> None:
    """At the session's end: a build nobody waited for (every test that needed it deselected or
    interrupted) is stopped, never left running."""
    while _BACKGROUND:
        stop_group(_BACKGROUND.pop())
    for build in _REBUILDS.values():
        stop_group(build["proc"])
        build["log"].close()
        shutil.rmtree(build["cache"].parent, ignore_errors=True)
    _REBUILDS.clear()


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a background build started with start_new_session, its helpers with it."""
    if proc.poll() is None:  # the build and its helpers (bwrap, pip, mksquashfs): one group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _built(module: str, what: str, ok) -> Path:
    """``python -m imagebuild.MODULE build`` (cached): the path it prints last, checked by OK.
    Fails, never skips, when nothing is built: these tests run in CI."""
    while _BACKGROUND:  # its result lands in the cache, which the build below then reuses
        proc = _BACKGROUND.pop()
        try:
            proc.wait(3600)
        except subprocess.TimeoutExpired:  # never left running beside the build below
            stop_group(proc)
    cmd, env = _build_cmd(module)
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=REPO,
            capture_output=True, text=True, timeout=3600, check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"building {what} failed: {exc}", pytrace=False)
    lines = proc.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if proc.returncode != 0 or path is None or not ok(path):
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        pytest.fail(f"python -m imagebuild.{module} build exited {proc.returncode} without {what} "
                    f"(required: these tests run in CI)\n{tail}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def image() -> Path:
    """The test image (a sandbox folder): ``python -m imagebuild.image build`` (cached), its path."""
    return _built("image", "an image", Path.is_dir)


@pytest.fixture(scope="session")
def sif() -> Path:
    """The image as a SIF file: ``python -m imagebuild.sif build`` (the sandbox of ``image``,
    assembled like ``apptainer build`` does; cached under $HPCDASK_TEST_CACHE by the same input
    key), its path."""
    return _built("sif", "a SIF", Path.is_file)


@pytest.fixture(scope="session")
def slurm_cluster(sif: Path) -> Iterator[SlurmCluster]:
    """The running Slurm test cluster (started once per session, stopped at its end), whose
    users get the session's test image, as a SIF file, as HPCDASK_IMAGE."""
    was_up = cluster_sh("status", check=False).returncode == 0
    try:
        up = cluster_sh("up", image=sif)
    except (ClusterError, subprocess.TimeoutExpired, OSError) as exc:
        cluster_sh("down", check=False)
        pytest.fail(f"the Slurm test cluster did not start:\n{exc}", pytrace=False)
    print(up.stderr, end="")
    try:
        cluster = SlurmCluster(exports("env"))
        yield cluster
    finally:
        if "cluster" in locals():
            shutil.rmtree(cluster.workdir, ignore_errors=True)
        if not was_up and os.environ.get("HPCDASK_CLUSTER_KEEP") != "1":
            cluster_sh("down", check=False)


@pytest.fixture
def udir(slurm_cluster) -> Path:
    """A new folder of hpcuser's in its home (the shared filesystem): a job's working directory."""
    return slurm_cluster.mkdtemp("t-")


@pytest.fixture
def job_env(slurm_cluster, sif) -> dict[str, str]:
    """What every test job adds to hpcuser's login environment: the image (the SIF), and a private
    shared folder of its own for the cluster folders (so a test can check it is left empty)."""
    return {"HPCDASK_IMAGE": str(sif),
            "HPCDASK_SHARED_DIR": str(slurm_cluster.mkdtemp("clusters-"))}
