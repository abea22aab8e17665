"""The image as an Lmod module (issue 25, item 3), with Debian's real Lmod on the Slurm test
cluster's login node, as hpcuser.

The module is written the way docs/modules.md says, from the image in the image's folder
(`apptainer exec dask.sif hpcdask module --image dask.sif --prefix ~/modulefiles`); a login
shell (/etc/profile.d/lmod.sh sets `module` up, as on a site) then loads it: the wrapped `python`
and `hpcdask` run in the image with its SIF ID bound (the jobs' identity), the all-in-one job
submitted from that shell runs the module's image, `hpcdask versions --against` the job's
provenance.json passes through the module, and `module unload` gives the shell back.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from test_slurm_jobs import assert_clean, jobscript

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

CHECK = """\
import sys
import dask
import distributed
from hpcdask import versions

client = distributed.get_client()
print(f"JOB {sys.executable} {dask.__version__} {versions.image_label()}")
print(f"WORKERS {sorted(set(client.run(versions.image_label).values()))}")
"""


def login_shell(slurm_cluster, script: str, env: dict, cwd: Path):
    """SCRIPT in hpcuser's login shell (bash -l: /etc/profile, Lmod's profile.d, ~/.profile)."""
    return slurm_cluster.run(["bash", "-l", "-c", script], env=env, cwd=cwd, check=False,
                             timeout=300)


def test_the_image_as_an_lmod_module(slurm_cluster, job_env, udir):
    image = Path(job_env["HPCDASK_IMAGE"])
    mods = udir / "modulefiles"
    # Written from the image itself, in the image's folder (bound as the working directory).
    r = slurm_cluster.run(["apptainer", "exec", image.name, "hpcdask", "module", "--image",
                           image.name, "--prefix", str(mods)], cwd=image.parent, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.fullmatch(r"(\S+\.lua): module hpcdask/(\S+) running .*; load it with: module use "
                     rf"{re.escape(str(mods))} && module load hpcdask\n", r.stdout)
    assert m, r.stdout
    version = m.group(2)

    (udir / "check.py").write_text(CHECK)
    before = "/nonexistent/an-older.sif"  # the module's pushenv sets its own, unload gives it back
    env = {**job_env, "HPCDASK_IMAGE": before}
    q = shlex.quote
    script = f"""
        set -e
        path0=$PATH
        module use {q(str(mods))}
        module -t avail hpcdask 2>&1 | sed 's/^/AVAIL /'
        module load hpcdask
        module -t list 2>&1 | sed 's/^/LOADED /'
        echo "IMAGE $HPCDASK_IMAGE"
        echo "PYTHON_IS $(command -v python)"
        python -c 'import sys, dask; from hpcdask import versions; print("MOD", sys.executable, dask.__version__, versions.image_label())'
        hpcdask versions | head -1 | sed 's/^/VERSIONS /'
        echo "JOBID $(sbatch --parsable -N2 --mem=1500M --time=5 --output=slurm-%j.out --error=slurm-%j.err {q(str(jobscript(slurm_cluster, "dask-cluster.sbatch")))} check.py)"
        module unload hpcdask
        echo "AFTER_IMAGE $HPCDASK_IMAGE"
        [ "$PATH" = "$path0" ] && echo PATH_RESTORED
        HPCDASK_APPTAINER=no-such-apptainer {q(str(mods / ('.hpcdask/' + version + '/bin/python')))} -c pass || echo "NO_APPTAINER_EXIT $?"
    """
    r = login_shell(slurm_cluster, script, env, udir)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(rf"^AVAIL hpcdask/{re.escape(version)}$", out, re.M), out
    assert re.search(rf"^LOADED hpcdask/{re.escape(version)}$", out, re.M), out
    # Only the module's files: its wrappers' folder is hidden from Lmod.
    assert not re.search(r"^AVAIL .*\.hpcdask", out, re.M), out
    assert f"IMAGE {image}\n" in out, out
    assert f"PYTHON_IS {mods}/.hpcdask/{version}/bin/python\n" in out, out
    mod = re.search(r"^MOD (\S+) (\S+) (.+)$", out, re.M)
    assert mod and mod.group(1) == "/opt/hpcdask/venv/bin/python", out
    # Its SIF ID too: the image is bound onto the placeholder, as the jobs bind it.
    assert re.search(r"sif:[0-9a-f-]{36}$", mod.group(3)), out
    assert re.search(rf"^VERSIONS python \S+\s+image {re.escape(mod.group(3))}$", out, re.M), out
    assert f"AFTER_IMAGE {before}\n" in out and "PATH_RESTORED\n" in out, out
    assert "NO_APPTAINER_EXIT 2\n" in out, out
    assert "'no-such-apptainer' not found on PATH" in r.stderr, r.stderr

    # The job submitted from the module's shell ran the module's image on every role.
    job_id = re.search(r"^JOBID (\d+)$", out, re.M).group(1)
    res = slurm_cluster.wait(job_id, timeout=300, workdir=udir)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert f"JOB {mod.group(1)} {mod.group(2)} {mod.group(3)}\n" in res.stdout, str(res)
    assert f"WORKERS {[mod.group(3)]}\n" in res.stdout, str(res)
    assert_clean(slurm_cluster, res, Path(job_env["HPCDASK_SHARED_DIR"]))

    # Through the module, this login node's environment is the job's (every role's) exactly.
    prov = next(udir.glob(f"hpcdask-output/check-job{job_id}/provenance.json"))
    assert json.loads(prov.read_text())["roles"], prov
    r = login_shell(slurm_cluster, f"module use {q(str(mods))} && module load hpcdask && "
                                   f"hpcdask versions --against {q(str(prov))}", env, udir)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_module_inputs_are_one_line_errors(slurm_cluster, job_env, udir):
    """No image, a prefix the user cannot write, a bad version: exit 2, one line naming the fix,
    nothing written."""
    image = Path(job_env["HPCDASK_IMAGE"])
    base = ["apptainer", "exec", image.name, "hpcdask", "module"]
    cases = [
        (["--image", "missing.sif", "--prefix", str(udir / "m1")],
         "image missing.sif does not exist", udir / "m1"),
        # The image's own folder (the test cache: root's, read-only to the user).
        (["--image", image.name, "--prefix", str(image.parent / "m2")],
         f"cannot write in --prefix {image.parent / 'm2'}", None),
        (["--image", image.name, "--prefix", str(udir / "m3"), "--version", "1/2"],
         "--version '1/2' is not a module name part", udir / "m3"),
    ]
    for args, says, folder in cases:
        r = slurm_cluster.run([*base, *args], cwd=image.parent, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hpcdask: error: ") and says in lines[0], (
            args, r.stderr)
        assert folder is None or not folder.exists(), folder
