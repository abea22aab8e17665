"""What listens, on the strict Slurm test cluster: every listening socket in every node's
network namespace and in the login node's, while an all-in-one job (with a user script) and a
scheduler job + worker job run, and while ``slurm_cluster()`` (dask-jobqueue's plain ``dask
worker``s) is scaled from the login node. The only listeners not on loopback must be the
scheduler's, the workers' and the nannies' TLS comm ports (README: Security)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from test_slurm_cluster_helper import JOBS, cancel_leftovers, scale_command
from test_slurm_jobs import jobscript, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Runs under `hpcdask client`: publishes the cluster's comm addresses, then holds the cluster up
# while the test lists the sockets.
HOLD_SCRIPT = """
import json, sys, time
from pathlib import Path
import distributed
from hpcdask.connect import cluster_info
c = distributed.get_client()
c.wait_for_workers(int(sys.argv[3]), timeout=200)
info = cluster_info(c)
comms = {info["address"]: "scheduler", **{a: "worker" for a in info["workers"]},
         **{w["nanny"]: "nanny" for w in info["workers"].values() if w["nanny"]}}
Path(sys.argv[1]).write_text(json.dumps(comms))
while not Path(sys.argv[2]).exists():
    time.sleep(0.2)
print("HOLD done")
"""


# The batch system's own listeners (slurmd's port, srun's and slurmstepd's I/O ports): a site
# has them with or without hpcdask.
SLURM = frozenset({"slurmd", "slurmstepd", "srun", "slurmctld", "sbatch"})


def listeners(slurm_cluster) -> dict[str, set[tuple[str, int, str]]]:
    """(address, port, process name) of every listening TCP socket, by node (and login)."""
    out = {}
    for where in ["login", *slurm_cluster.nodes]:
        ns = slurm_cluster.netns(where)
        text = subprocess.run(["ip", "netns", "exec", ns, "ss", "-H", "-ltnp"],
                              capture_output=True, text=True, check=True).stdout
        out[where] = set()
        for line in text.splitlines():
            fields = line.split()
            host, port = fields[3].rsplit(":", 1)
            m = re.search(r'users:\(\("([^"]+)"', line)
            out[where].add((host.strip("[]"), int(port), m.group(1) if m else "?"))
    return out


def exposed(found: dict[str, set[tuple[str, int, str]]]) -> set[tuple[str, int]]:
    """Every listener not on loopback, except the batch system's own."""
    return {(h, p) for socks in found.values() for h, p, name in socks
            if not h.startswith("127.") and h != "::1" and name not in SLURM}


def _port(address: str) -> tuple[str, int]:
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


def table(found: dict[str, set[tuple[str, int, str]]], roles: dict[tuple[str, int], str]) -> str:
    """The README's listening-socket table: per node, what listens where (ports as P)."""
    rows = []
    for where, socks in found.items():
        kinds: dict[tuple[str, str], int] = {}
        for host, port, name in socks:
            if (host, port) in roles:
                what = f"{roles[host, port]} (TLS comm)"
            elif name in SLURM:
                what = f"{name} (Slurm's own)"
            elif host.startswith("127.") or host == "::1":
                what = "dashboard" if port == 8787 else "HTTP (worker)"
            else:
                what = f"{name}: NOT EXPECTED"
            kinds[host, what] = kinds.get((host, what), 0) + 1
        listed = ", ".join(f"{what} {host}:P" + (f" x{k}" if k > 1 else "")
                           for (host, what), k in sorted(kinds.items(), key=lambda x: x[0][1]))
        rows.append(f"| {where} | {listed or 'nothing'} |")
    return "\n".join(rows)


def held_cluster(slurm_cluster, udir: Path, start) -> tuple[set, set]:
    """Start a cluster through ``start(comms_file, release_file)``, list the sockets while the
    hold script runs, release it. Returns (non-loopback listeners, the cluster's comm ports)."""
    comms_file, release = udir / "comms.json", udir / "release"
    (udir / "hold.py").write_text(HOLD_SCRIPT)
    finish = start(comms_file, release)
    try:
        deadline = time.monotonic() + 240
        while not comms_file.exists():
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        roles = {_port(a): role for a, role in json.loads(comms_file.read_text()).items()}
        comms = set(roles)
        socks = listeners(slurm_cluster)
        print("LISTENERS", json.dumps({k: sorted(v) for k, v in socks.items()}))
        print(f"LISTENING-TABLE\n{table(socks, roles)}")
        found = exposed(socks)
    finally:
        release.write_text("")
        finish()
    return found, comms


def test_all_in_one_job_exposes_only_tls_ports(slurm_cluster, job_env, udir):
    def start(comms_file, release):
        res = submit(slurm_cluster, jobscript(slurm_cluster, "dask-cluster.sbatch"),
                     ["-N2", "--time=5"], ["hold.py", str(comms_file), str(release), "2"], job_env,
                     udir, wait=False)
        return lambda: slurm_cluster.wait(res.job_id, timeout=240, workdir=udir)

    found, comms = held_cluster(slurm_cluster, udir, start)
    assert len(comms) == 1 + 2 + 2  # scheduler, two workers, their nannies
    assert found == comms, (found, comms)


def test_scheduler_job_and_worker_job_expose_only_tls_ports(slurm_cluster, job_env, udir):
    cdir = Path(job_env["HPCDASK_SHARED_DIR"]) / "session"
    env = {**job_env, "HPCDASK_CLUSTER_DIR": str(cdir)}

    def start(comms_file, release):
        # The scheduler on eth0, which the login node (no ib0) reaches; the workers on ib0.
        sched = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-scheduler.sbatch"), "--time=5",
                                     "--mem=1000M", wait=False, workdir=udir,
                                     env={**env, "HPCDASK_SCHEDULER_INTERFACE": "eth0"})
        workers = slurm_cluster.sbatch(jobscript(slurm_cluster, "dask-workers.sbatch"), "--time=5",
                                       "--mem=1000M", f"--dependency=after:{sched.job_id}",
                                       env=env, wait=False, workdir=udir)
        client = slurm_cluster.popen(
            ["apptainer", "exec", job_env["HPCDASK_IMAGE"], "hpcdask", "client",
             "--scheduler-file", str(cdir / "scheduler.json"), "--", "hold.py", str(comms_file),
             str(release), "1"], env=env, cwd=udir)

        def finish():
            client.wait(120)
            for j in (workers.job_id, sched.job_id):
                slurm_cluster.run(["scancel", j], check=False)
            slurm_cluster.wait(sched.job_id, timeout=90, workdir=udir)
        return finish

    found, comms = held_cluster(slurm_cluster, udir, start)
    assert len(comms) == 1 + 1 + 1
    assert found == comms, (found, comms)


def test_slurm_cluster_exposes_only_tls_ports(slurm_cluster, sif, udir):
    """dask-jobqueue's workers (plain ``dask worker``) bind their HTTP endpoints to loopback:
    nothing of theirs but the TLS comm ports is reachable from the network."""
    def start(comms_file, release):
        cmd, env = scale_command(slurm_cluster, sif, udir, str(comms_file), str(release))
        log = udir / "scale.log"
        with log.open("w") as f:  # a file, not a pipe: nothing blocks while the cluster is held
            proc = slurm_cluster.popen(cmd, env=env, cwd=udir, stdout=f, stderr=subprocess.STDOUT)

        def finish():
            try:
                proc.wait(timeout=300)
            finally:
                cancel_leftovers(slurm_cluster, udir)
            assert proc.returncode == 0, log.read_text()[-6000:]
        return finish

    found, comms = held_cluster(slurm_cluster, udir, start)
    assert len(comms) == 1 + 2 * JOBS  # scheduler, the workers and their nannies
    assert found == comms, (found, comms)
