"""The all-in-one job with --jupyter on the Slurm test cluster (issue 25, item 1): JupyterLab on
the batch node's loopback, and through the lab's own address and token the scheduler's
dashboard (one tunnel for both). Requests are made on the batch node itself, as the tunnel would
carry them, as hpcuser with the host's /usr/bin/python3; the lab is shut down through its API
(File > Shut Down), and the job then ends in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_slurm_jobs import assert_clean, jobscript, submit, wait_for_text

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

# Run on the batch node: GET each path with the token (or without), print "PATH CODE".
PROBE = """\
import sys, urllib.error, urllib.request
base, token = sys.argv[1], sys.argv[2]
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
opener = urllib.request.build_opener(NoRedirect)
for path in sys.argv[3:]:
    auth = not path.startswith("!")
    req = urllib.request.Request(base + path.lstrip("!"),
                                 headers={"Authorization": "token " + token} if auth else {})
    try:
        with opener.open(req, timeout=30) as r:
            body = r.read().decode(errors="replace")
            code = r.status
    except urllib.error.HTTPError as e:
        code, body = e.code, ""
    print(path, code, "bokeh" in body.lower())
"""


def test_jupyter_job_serves_the_dashboard_through_the_lab(slurm_cluster, job_env, udir):
    shared = Path(job_env["HPCDASK_SHARED_DIR"])
    job = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                 ["-N2", "--mem=1500M", "--time=10"], ["--jupyter"], job_env, udir, wait=False)
    err = udir / f"slurm-{job.job_id}.err"
    try:
        m = wait_for_text(err, r"jupyter: the dashboard, through the lab: http://localhost:(\d+)"
                               r"/proxy/127\.0\.0\.1:(\d+)/status \(the same tunnel and token\)",
                          300)
        lab_port, dash_port = m.group(1), m.group(2)
        wait_for_text(err, r"Jupyter Server .* is running at", 120)
        node = re.search(r"ssh -N -L \d+:127\.0\.0\.1:\d+ -J \S+ (\S+)", err.read_text()).group(1)
        token = next(shared.glob("job-*/jupyter-token")).read_text().strip()
        (udir / "probe.py").write_text(PROBE)
        base = f"http://127.0.0.1:{lab_port}"
        paths = [f"/proxy/127.0.0.1:{dash_port}/status", f"!/proxy/127.0.0.1:{dash_port}/status",
                 "/proxy/127.0.0.1:6818/", "/proxy/6818/", f"/proxy/10.253.71.12:{dash_port}/",
                 "/lab/api/settings/dask-labextension:plugin"]
        r = slurm_cluster.run(["/usr/bin/python3", str(udir / "probe.py"), base, token, *paths],
                              where=node, user=slurm_cluster.USER, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        got = dict((line.split()[0], line.split()[1:]) for line in r.stdout.splitlines())
        assert got[paths[0]] == ["200", "True"], r.stdout  # the dashboard's page, with the token
        assert got[paths[1]][0] in ("302", "403"), r.stdout  # nothing without it
        # slurmd's port on the batch node, another node's address: refused.
        assert got[paths[2]][0] == got[paths[3]][0] == got[paths[4]][0] == "403", r.stdout
        assert got[paths[5]][0] == "200", r.stdout
        # File > Shut Down: the lab ends, and with it the job, in order.
        shut = slurm_cluster.run(
            ["/usr/bin/python3", "-c",
             "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
             "sys.argv[1] + '/api/shutdown', method='POST', headers={'Authorization': "
             "'token ' + sys.argv[2]}), timeout=30)", base, token],
            where=node, user=slurm_cluster.USER, check=False)
        assert shut.returncode == 0, shut.stderr
        res = slurm_cluster.wait(job.job_id, timeout=300, workdir=udir)
    finally:
        slurm_cluster.run(["scancel", job.job_id], check=False)
    assert res.state == "COMPLETED" and res.exit_code == 0, str(res)
    assert_clean(slurm_cluster, res, shared)
    assert token not in res.stdout + res.stderr
