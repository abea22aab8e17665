"""Your project in the one image (issue 31), on the Slurm test cluster, as hpcuser.

A project folder as the tutorials' users keep one, in hpcuser's home (the shared filesystem):
`analysis.py`, a helper module beside it used in tasks, a local package `./mypkg`, and one PyPI
package the image's lock lacks (xarray), served from a wheelhouse in the user's home with
PIP_NO_INDEX=1 (no index reachable, as on a site's login node without internet). The commands
are those of docs/project.md, word for word: the project's SIF is built on the login node as the
user, never root (containers/imagebuild/userlayer.py: the base SIF plus a layer holding
exactly hpcdask.lock), then the all-in-one job runs on 3 nodes with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdask import sif as sifmod
from test_slurm_jobs import assert_clean, jobscript, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(2400)]

CACHE = Path(os.environ.get("HPCDASK_TEST_CACHE", "/var/cache/hpcdask-test"))
RUNNER = Path(__file__).resolve().parents[1] / "testcluster" / "bin" / "apptainer"
XARRAY = "xarray==2026.9.0"  # pure Python; its dependencies (numpy, pandas, packaging) are locked

MYPKG = {
    "pyproject.toml": '[build-system]\nrequires = ["setuptools"]\n'
                      'build-backend = "setuptools.build_meta"\n\n'
                      '[project]\nname = "mypkg"\nversion = "0.3.1"\n',
    "mypkg/__init__.py": "def times(x, k):\n    return x * k\n",
}

HELPERS = """\
import importlib.metadata as md
import os
import socket
import sys

import mypkg


def triple(x):
    return mypkg.times(x, 3)


def where():
    import xarray
    total = float(xarray.DataArray([1.5, 2.5]).sum())
    return (f"{socket.gethostname()} xarray={xarray.__version__} mypkg={md.version('mypkg')} "
            f"sum={total} helpers={os.path.realpath(__file__)} python={sys.executable}")
"""

ANALYSIS = """\
import sys
import dask.bag as db
import distributed
import helpers  # beside the script
import xarray   # the project's PyPI package, in the project's image

client = distributed.get_client()
print(f"PATH0 {sys.path[0]}")
print(f"TOTAL {sum(db.from_sequence(range(30), npartitions=6).map(helpers.triple).compute())}")
for addr, w in sorted(client.run(helpers.where).items()):
    print(f"WORKER {w}")
"""


@pytest.fixture(scope="module")
def wheel() -> Path:
    """xarray's wheel, fetched once from PyPI by the test (root, on the host) into the cache."""
    folder = CACHE / "wheelhouse"
    found = sorted(folder.glob("xarray-2026.9.0-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary=:all:", "--disable-pip-version-check", "-d",
                            str(folder), XARRAY], capture_output=True, text=True, timeout=600,
                           check=False)
        found = sorted(folder.glob("xarray-2026.9.0-*.whl"))
        if r.returncode != 0 or not found:
            pytest.fail(f"pip download {XARRAY} failed (needs PyPI):\n{r.stderr[-2000:]}")
    return found[-1]


def _project(cluster, wheel: Path, requirements: str) -> tuple[Path, dict[str, str]]:
    """A project folder and a wheelhouse of hpcuser's; the environment of a login shell with no
    package index (PIP_NO_INDEX) and the wheelhouse (PIP_FIND_LINKS)."""
    home = cluster.mkdtemp("proj-")
    proj, wheels = home / "myproject", home / "wheelhouse"
    (proj / "mypkg" / "mypkg").mkdir(parents=True)
    wheels.mkdir()
    shutil.copy(wheel, wheels)
    for name, text in MYPKG.items():
        (proj / "mypkg" / name).write_text(text)
    (proj / "helpers.py").write_text(HELPERS)
    (proj / "analysis.py").write_text(ANALYSIS)
    (proj / "requirements.txt").write_text(requirements)
    cluster.give(home)
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
           "PYTHONPATH": str(cluster.src / "containers")}
    return proj, env


def _build(cluster, proj: Path, env: dict[str, str], base: Path):
    # docs/project.md's command for a login node without a host install of hpcdask.
    return cluster.run(["/usr/bin/python3", "-m", "imagebuild.userlayer", "build", "-r",
                        "requirements.txt", "--base", str(base), "-o", "myproject.sif"],
                       env=env, cwd=proj, check=False, timeout=1800)


@pytest.fixture(scope="module")
def built(slurm_cluster, sif, wheel) -> dict:
    proj, env = _project(slurm_cluster, wheel, "xarray\n./mypkg\n")
    t0 = time.monotonic()
    r = _build(slurm_cluster, proj, env, sif)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = proj / "myproject.sif"
    assert r.stdout.strip().splitlines()[-1] == str(out.resolve()), r.stdout
    print(f"\nproject image built as hpcuser in {took:.1f} s: "
          f"{out.stat().st_size / 2**20:.0f} MiB (base {sif.stat().st_size / 2**20:.0f} MiB)")
    return {"proj": proj, "env": env, "sif": out, "log": r.stderr}


def test_the_build_runs_as_the_user_and_records_the_project(built, sif):
    out, proj = built["sif"], built["proj"]
    st = out.stat()
    assert st.st_uid != 0 and (st.st_uid, st.st_gid) == (proj.stat().st_uid, proj.stat().st_gid)
    lock = (proj / "hpcdask.lock").read_text()
    assert re.search(r"^xarray==2026\.9\.0 \\$", lock, re.M) and "--hash=sha256:" in lock, lock
    assert re.search(r"^mypkg==0\.3\.1\s+# local: ", lock, re.M), lock
    # Nothing of the build left beside the SIF.
    assert sorted(p.name for p in proj.iterdir()) == [
        "analysis.py", "helpers.py", "hpcdask.lock", "mypkg", "myproject.sif", "requirements.txt"]
    # The labels name the base and both locks.
    r = subprocess.run([str(RUNNER), "inspect", "--json", "--labels", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    labels = json.loads(r.stdout)["data"]["attributes"]["labels"]
    assert labels["org.hpcdask.user-lock-sha256"] == lock_sha(proj)
    assert labels["org.hpcdask.base-sif-id"] == sifmod.read_header(sif).id
    assert sifmod.read_header(out).id != sifmod.read_header(sif).id


def test_the_project_image_runs_the_users_code_on_three_nodes(slurm_cluster, built, job_env):
    proj = built["proj"]
    env = {**job_env, "HPCDASK_IMAGE": str(built["sif"])}
    res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N3", "--mem=1500M", "--time=5"], ["analysis.py"], env, proj, timeout=300)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    real = os.path.realpath(proj)
    assert re.search(rf"^PATH0 {re.escape(real)}$", res.stdout, re.M), str(res)
    assert re.search(r"^TOTAL 1305$", res.stdout, re.M), str(res)
    workers = re.findall(r"^WORKER (\S+) (.*)$", res.stdout, re.M)
    assert len({h for h, _ in workers}) == 3, str(res)
    assert {w for _, w in workers} == {
        f"xarray=2026.9.0 mypkg=0.3.1 sum=4.0 helpers={real}/helpers.py "
        f"python=/opt/hpcdask/venv/bin/python"}, workers
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))
    # provenance.json: the project's lock, its local package and the code folder's digest.
    prov = next((proj / "hpcdask-output").rglob("provenance.json"))
    rec = json.loads(prov.read_text())["project"]
    assert rec["local_packages"] == {"mypkg": "0.3.1"}, rec
    assert rec["lock_sha256"] == lock_sha(proj), rec
    assert rec["code"]["folder"] == real and len(rec["code"]["py_sha256"]) == 64, rec


def lock_sha(proj: Path) -> str:
    return hashlib.sha256((proj / "hpcdask.lock").read_bytes()).hexdigest()


def test_a_worker_from_the_base_image_is_refused(slurm_cluster, built, sif):
    """The scheduler from the project's image, a worker from the bare base image: refused, with
    the differing image and packages named."""
    home = built["proj"].parent
    folder = slurm_cluster.mkdtemp("refuse-")
    path = folder / "scheduler.json"

    def role(image: Path, *args: str) -> list[str]:
        return ["apptainer", "exec", "--bind", f"{image}:{sifmod.IMAGE_SIF}:ro", str(image),
                "hpcdask", *args, "--scheduler-file", str(path), "--interface", "eth0"]

    log = (home / "scheduler.log").open("w")
    sched = slurm_cluster.popen(role(built["sif"], "scheduler", "--dashboard", "off"),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not path.exists():
            assert sched.poll() is None, (home / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "no scheduler file"
            time.sleep(0.2)
        r = slurm_cluster.run(role(sif, "worker", "--nworkers", "1", "--nthreads", "1"),
                              check=False, timeout=600)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "hpcdask: refused:" in r.stderr and "Traceback" not in r.stderr, r.stderr
        refusal = next(ln for ln in r.stderr.splitlines() if "hpcdask: refused:" in ln)
        assert "xarray" in refusal and "mypkg" in refusal, refusal
    finally:
        sched.terminate()
        sched.wait(120)
        log.close()


@pytest.mark.parametrize("requirement, says", [
    ("numpy<2", r"requirements\.txt asks for numpy<2 but the image pins numpy==\S+"),
    ("nosuchpkg-hpcdask-test", r"nosuchpkg-hpcdask-test"),
])
def test_a_conflict_or_an_unknown_package_is_one_line_and_no_image(
        slurm_cluster, sif, wheel, requirement, says):
    proj, env = _project(slurm_cluster, wheel, f"xarray\n{requirement}\n")
    r = _build(slurm_cluster, proj, env, sif)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("hpcdask: ")]
    assert len(errors) == 1 and re.search(says, errors[0]), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in proj.iterdir()) == [
        "analysis.py", "helpers.py", "mypkg", "requirements.txt"], "something was left behind"
