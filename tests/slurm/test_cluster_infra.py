"""The Slurm test cluster itself, as strict as a site: jobs of an ordinary user from a login node
without ib0, nodes with their own network, hostname, /tmp and node-local $TMPDIR, memory enforced,
a shared home, the runner on PATH, exit codes, and a clean `down`. (Time limits: Slurm ends a job
at its limit in test_slurm_jobs.py::test_a_job_at_its_time_limit_ends_cleanly_within_killwait,
which asserts TIMEOUT and slurmstepd's "DUE TO TIME LIMIT".)"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

def _by_task(output: str) -> dict[int, list[str]]:
    """`srun -l` output grouped by task rank."""
    tasks: dict[int, list[str]] = {}
    for line in output.splitlines():
        rank, _, rest = line.partition(": ")
        tasks.setdefault(int(rank), []).append(rest.strip())
    return tasks


def test_three_nodes_each_with_its_own_ib0_and_eth0_address(slurm_cluster):
    assert len(slurm_cluster.nodes) >= 3
    out = slurm_cluster.srun(
        "-N3", "-l", "sh", "-c",
        'echo "$SLURMD_NODENAME $(hostname) $(ip -4 -o addr show ib0) $(ip -4 -o addr show eth0)"'
    ).stdout
    seen = {}
    for lines in _by_task(out).values():
        node, host, rest = lines[0].split(" ", 2)
        assert host == node  # its own hostname (UTS namespace)
        seen[node] = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", rest)
    assert len(seen) == 3
    for node, (ib, eth) in seen.items():
        assert slurm_cluster.addresses[node] == ib
        assert slurm_cluster.eth_addresses[node] == eth
    assert len({ib for ib, _ in seen.values()}) == 3


def test_node_namespace_has_lo_ib0_and_eth0(slurm_cluster):
    out = slurm_cluster.srun("-N3", "-l", "ip", "-o", "link").stdout
    tasks = _by_task(out)
    assert len(tasks) == 3
    for lines in tasks.values():
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in lines)
        assert names == ["eth0", "ib0", "lo"]


def test_login_node_has_no_ib0_and_cannot_reach_the_fabric(slurm_cluster):
    out = slurm_cluster.run(["sh", "-c", "hostname; ip -o link | cut -d: -f2"]).stdout.split()
    assert out[0] == "login"
    assert sorted(n.split("@")[0] for n in out[1:]) == ["eth0", "lo"]
    ib = slurm_cluster.addresses[slurm_cluster.nodes[0]]
    eth = slurm_cluster.eth_addresses[slurm_cluster.nodes[0]]
    probe = "exec 3<>/dev/tcp/{}/6818"
    assert slurm_cluster.run(["timeout", "5", "bash", "-c", probe.format(ib)],
                             check=False).returncode != 0
    slurm_cluster.run(["timeout", "5", "bash", "-c", probe.format(eth)])


def test_nodes_reach_each_other_and_the_controller(slurm_cluster):
    addrs = sorted([*slurm_cluster.addresses.values(), *slurm_cluster.eth_addresses.values()])
    # Every node opens a TCP connection to every node's slurmd on ib0 and eth0; squeue works.
    cmd = " && ".join(f"exec 3<>/dev/tcp/{a}/6818 && exec 3>&-" for a in addrs)
    out = slurm_cluster.srun(
        "-N3", "bash", "-c", f"{cmd} && squeue -h -j $SLURM_JOB_ID -o %i"
    ).stdout
    assert len(set(out.split())) == 1


def test_jobs_run_as_the_ordinary_user(slurm_cluster):
    out = slurm_cluster.srun("-N3", "-l", "sh", "-c", "id -u; id -un; echo $HOME").stdout
    for lines in _by_task(out).values():
        uid, name, home = lines
        assert int(uid) >= 1000 and name == "hpcuser" and home == str(slurm_cluster.home)


def test_home_is_shared_but_tmp_is_node_local(slurm_cluster):
    first, last = slurm_cluster.nodes[0], slurm_cluster.nodes[-1]
    marker = slurm_cluster.workdir / "from-node"
    slurm_cluster.srun("-N1", "-w", first, "sh", "-c",
                       f"hostname > {marker}; echo x > /tmp/hpcdask-marker-$SLURM_JOB_ID; "
                       f"echo $SLURM_JOB_ID > {marker}.job")
    job = marker.with_suffix(".job").read_text().strip()
    out = slurm_cluster.srun("-N1", "-w", last, "sh", "-c",
                             f"cat {marker}; ls /tmp/hpcdask-marker-{job} 2>&1 || true").stdout
    assert out.splitlines()[0] == first  # the home folder is shared
    assert "No such file" in out  # /tmp is not
    assert (slurm_cluster.node_tmp(first) / f"hpcdask-marker-{job}").exists()
    assert not Path(f"/tmp/hpcdask-marker-{job}").exists()  # nor the host's
    (slurm_cluster.node_tmp(first) / f"hpcdask-marker-{job}").unlink()


def test_every_job_gets_a_private_node_local_tmpdir_that_goes_away(slurm_cluster):
    res = slurm_cluster.sbatch(
        "#!/bin/sh\nsrun -l sh -c 'echo $TMPDIR; stat -c \"%a %U\" $TMPDIR; touch $TMPDIR/left'\n",
        "-N2", "--mem=100M", env={"TMPDIR": "/tmp/from-login"})
    assert res.state == "COMPLETED", res
    tasks = _by_task(res.stdout)
    dirs = {lines[0] for lines in tasks.values()}
    assert dirs == {f"{slurm_cluster.state_dir}/local/job-{res.job_id}"}  # not the submitter's
    assert {lines[1] for lines in tasks.values()} == {"700 hpcuser"}
    nodes = res.info["NodeList"]
    for node in slurm_cluster.nodes:
        assert not (slurm_cluster.state_dir / "nodes" / node / "local" / f"job-{res.job_id}").exists()
    # The Epilog recorded what the job left (the tests of hpcdask's jobs assert there is none).
    left = {k: v for k, v in slurm_cluster.leftovers().items() if k.endswith(f"-job-{res.job_id}.txt")}
    assert len(left) == 2 and all(v.strip().endswith("/left") for v in left.values()), (left, nodes)
    for name in left:
        (slurm_cluster.state_dir / "leftovers" / name).unlink()


def test_a_step_over_its_memory_is_killed(slurm_cluster):
    grab = ("import time; a = bytearray(600 * 2**20)\n"
            "for i in range(0, len(a), 4096): a[i] = 1\n"
            "time.sleep(10); print('survived')")
    proc = slurm_cluster.srun("-N1", "--mem=200M", "python3", "-c", grab, check=False,
                              timeout=60)
    assert proc.returncode != 0 and "survived" not in proc.stdout, proc
    assert "exceeded memory limit" in proc.stderr, proc.stderr
    # Without --mem a job gets DefMemPerCPU, visible to the job as on a site.
    res = slurm_cluster.sbatch("#!/bin/sh\necho $SLURM_MEM_PER_CPU\n", "-N1", "-c1")
    assert res.stdout.strip() == "1000", res


def test_otheruser_cannot_read_hpcusers_home(slurm_cluster):
    proc = slurm_cluster.run(["ls", str(slurm_cluster.workdir)], user=slurm_cluster.OTHER_USER,
                             check=False)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_tasks_have_the_runner_first_on_path(slurm_cluster):
    # Even when the submitter's PATH lacks it, the TaskProlog puts tests/testcluster/bin first.
    runner_bin = slurm_cluster.src / "tests" / "testcluster" / "bin"
    out = slurm_cluster.srun(
        "-N3", "-l", "sh", "-c", 'echo "${PATH%%:*}"', env={"PATH": "/usr/bin:/bin"}
    ).stdout
    firsts = {lines[0] for lines in _by_task(out).values()}
    assert firsts == {str(runner_bin)}
    out = slurm_cluster.srun("-N1", "sh", "-c", "command -v apptainer").stdout
    assert out.strip() == str(runner_bin / "apptainer")


def test_a_login_shell_on_the_login_node_finds_apptainer(slurm_cluster):
    """make cluster-login's shell is a login shell: /etc/profile resets PATH, the user's
    ~/.profile (written by cluster-up, like a site's `module load apptainer`) puts the runner
    back, so the README's `apptainer exec $HPCDASK_IMAGE ...` works there."""
    from testcluster.cluster import CLUSTER_SH

    out = subprocess.run(["bash", str(CLUSTER_SH), "login", "bash", "-l", "-c",
                          "command -v apptainer; hostname"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == [str(slurm_cluster.src / "tests" / "testcluster" / "bin" / "apptainer"), "login"]


def _make_cluster_login(cmd: str, as_user: str | None) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["make", "-s", "-C", str(repo), "cluster-login", f"CMD={cmd}",
         *([f"AS={as_user}"] if as_user else [])],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("as_user", [None, "otheruser"])
def test_make_cluster_login_runs_one_command_and_passes_its_exit_on(slurm_cluster, as_user):
    """`make cluster-login CMD=...` runs CMD as hpcuser (AS=otheruser: that user) in a login
    shell on the login node (the runner on PATH), and make fails when CMD does; quotes survive."""
    user = as_user or slurm_cluster.USER
    runner = slurm_cluster.src / "tests" / "testcluster" / "bin" / "apptainer"
    proc = _make_cluster_login("""echo "$(id -un) $(hostname) $(command -v apptainer)" 'it''s'; exit 7""",
                               as_user)
    assert proc.stdout.split() == [user, "login", str(runner), "its"], proc
    assert proc.returncode != 0 and "Error 7" in proc.stderr, proc
    proc = _make_cluster_login('test "$(pwd)" = "$HOME" && test -O "$HOME"', as_user)
    assert proc.returncode == 0, proc


def test_sbatch_reports_exit_code_and_outputs(slurm_cluster):
    res = slurm_cluster.sbatch(
        "#!/bin/sh\necho out-$SLURM_JOB_NUM_NODES\necho err >&2\nexit 3\n", "-N2"
    )
    assert res.state == "FAILED", res
    assert res.exit_code == 3, res
    assert res.stdout.strip() == "out-2"
    assert res.stderr.strip() == "err"


def test_batch_job_runs_multinode_steps(slurm_cluster):
    res = slurm_cluster.sbatch(
        "#!/bin/sh\nsrun -l sh -c 'echo $SLURMD_NODENAME' | sort\n", "-N3", "--time=00:05:00"
    )
    assert res.state == "COMPLETED", res
    assert res.exit_code == 0
    assert sorted(line.split(": ")[1] for line in res.stdout.splitlines()) == sorted(
        slurm_cluster.nodes[:3]
    )


def test_job_time_limit_is_visible_inside_the_job(slurm_cluster):
    # Workers derive their lifetime from the job's time limit.
    res = slurm_cluster.sbatch(
        "#!/bin/sh\nsqueue -h -j $SLURM_JOB_ID -o %l\n"
        "scontrol show job $SLURM_JOB_ID | grep -o 'TimeLimit=[^ ]*'\n",
        "--time=00:05:00",
    )
    assert res.state == "COMPLETED", res
    assert res.stdout.split() == ["5:00", "TimeLimit=00:05:00"]


def _other_instances_live(state_dir: Path) -> bool:
    """Another test-cluster instance (HPCDASK_CLUSTER_INSTANCE) is up on this machine."""
    for pidfile in state_dir.parent.glob("*/run/slurmctld.pid"):
        if pidfile.parents[1] == state_dir:
            continue
        try:
            os.kill(int(pidfile.read_text().split()[0]), 0)
            return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _mentions(pid: str, needle: bytes) -> bool:
    """The process's command line or environment names NEEDLE (an instance's state folder)."""
    for part in ("cmdline", "environ"):
        try:
            if needle in (Path("/proc") / pid / part).read_bytes():
                return True
        except OSError:
            continue
    return False


def _live_processes(*names: str, users: tuple[str, ...] = (), only: Path | None = None) -> list[str]:
    """Non-zombie processes with one of these command names, or of one of these USERS (PID 1
    here reaps zombies late); with ONLY, those whose command line or environment names that
    state folder (other instances of the test cluster may be up beside this one)."""
    uids = {pwd.getpwnam(u).pw_uid for u in users}
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            uid = stat.parent.stat().st_uid
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state = text[text.rindex(")") + 2]
        if (comm in names or uid in uids) and state != "Z":
            if only is None or _mentions(stat.parent.name, f"{only}/".encode()):
                found.append(f"{stat.parent.name} {comm}")
    return found


def test_down_leaves_nothing_behind_and_up_restores(slurm_cluster):
    """Runs last in this module: takes the cluster down, checks, brings it back."""
    we_mounted = (slurm_cluster.state_dir / "netns-mounted-by-us").exists()
    down = slurm_cluster.cluster_sh("down")
    try:
        netns = subprocess.run(
            ["ip", "netns", "list"], check=False, capture_output=True, text=True
        ).stdout
        assert slurm_cluster.prefix not in netns
        links = subprocess.run(
            ["ip", "-o", "link"], check=False, capture_output=True, text=True
        ).stdout
        assert slurm_cluster.prefix not in links
        assert not [line for line in links.splitlines() if ": ib0" in line]
        # Alone on the machine (CI), every such process counts; beside other instances, this
        # instance's (named by its state folder in their command line or environment).
        only = slurm_cluster.state_dir if _other_instances_live(slurm_cluster.state_dir) else None
        assert _live_processes("slurmd", "slurmctld", "slurmstepd", "munged", only=only) == []
        # No process of the cluster's users survives.
        assert _live_processes(users=("hpcuser", "otheruser"), only=only) == []
        assert not (slurm_cluster.state_dir / "nodes").exists()  # node-local folders gone
        if we_mounted:
            # `ip netns add` made /run/netns a mount point; down undid it.
            assert subprocess.run(["mountpoint", "-q", "/run/netns"], check=False).returncode != 0
        assert "down in" in down.stderr
        assert slurm_cluster.cluster_sh("status", check=False).returncode != 0
    finally:
        slurm_cluster.cluster_sh("up")
    # Up again: a quick step on every node.
    out = slurm_cluster.srun("-N3", "hostname").stdout
    assert len(out.splitlines()) == 3
