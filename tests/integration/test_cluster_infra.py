"""The Slurm test cluster itself: nodes in their own network namespaces, a shared filesystem,
the runner on PATH, batch jobs with exit codes and time limits, and a clean `down`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

RUNNER_BIN = Path(__file__).resolve().parents[1] / "cluster" / "bin"


def _by_task(output: str) -> dict[int, list[str]]:
    """`srun -l` output grouped by task rank."""
    tasks: dict[int, list[str]] = {}
    for line in output.splitlines():
        rank, _, rest = line.partition(": ")
        tasks.setdefault(int(rank), []).append(rest.strip())
    return tasks


def test_three_nodes_each_with_its_own_ib0_address(slurm_cluster):
    assert len(slurm_cluster.nodes) >= 3
    out = slurm_cluster.srun(
        "-N3", "-l", "sh", "-c", 'echo "$SLURMD_NODENAME $(ip -4 -o addr show ib0)"'
    ).stdout
    seen = {}
    for lines in _by_task(out).values():
        node, rest = lines[0].split(" ", 1)
        seen[node] = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", rest).group(1)
    assert len(seen) == 3
    assert len(set(seen.values())) == 3
    for node, addr in seen.items():
        assert slurm_cluster.addresses[node] == addr


def test_node_namespace_has_only_lo_and_ib0(slurm_cluster):
    out = slurm_cluster.srun("-N3", "-l", "ip", "-o", "link").stdout
    tasks = _by_task(out)
    assert len(tasks) == 3
    for lines in tasks.values():
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in lines)
        assert names == ["ib0", "lo"]


def test_nodes_reach_each_other_and_the_controller(slurm_cluster):
    addrs = sorted(slurm_cluster.addresses.values())
    # Every node opens a TCP connection to every node's slurmd on ib0; squeue reaches slurmctld.
    cmd = " && ".join(f"exec 3<>/dev/tcp/{a}/6818 && exec 3>&-" for a in addrs)
    out = slurm_cluster.srun(
        "-N3", "bash", "-c", f"{cmd} && squeue -h -j $SLURM_JOB_ID -o %i"
    ).stdout
    assert len(set(out.split())) == 1


def test_filesystem_is_shared_between_nodes(slurm_cluster, tmp_path):
    marker = tmp_path / "from-node"
    slurm_cluster.srun("-N1", "-w", slurm_cluster.nodes[0], "sh", "-c", f"hostname > {marker}")
    out = slurm_cluster.srun("-N1", "-w", slurm_cluster.nodes[-1], "cat", str(marker)).stdout
    assert out.strip() == marker.read_text().strip()


def test_tasks_have_the_runner_first_on_path(slurm_cluster):
    # Even when the submitter's PATH lacks it, the TaskProlog puts tests/cluster/bin first.
    out = slurm_cluster.srun(
        "-N3", "-l", "sh", "-c", 'echo "${PATH%%:*}"', env={"PATH": "/usr/bin:/bin"}
    ).stdout
    firsts = {lines[0] for lines in _by_task(out).values()}
    assert firsts == {str(RUNNER_BIN)}
    if (RUNNER_BIN / "apptainer").exists():
        out = slurm_cluster.srun("-N1", "sh", "-c", "command -v apptainer").stdout
        assert out.strip() == str(RUNNER_BIN / "apptainer")


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


@pytest.mark.slow
def test_job_over_its_time_limit_is_killed(slurm_cluster):
    # Slurm counts limits in minutes and checks them every 30 s: this takes 60-100 s.
    res = slurm_cluster.sbatch(
        "#!/bin/sh\necho started\nsleep 600\n", "--time=00:00:10", timeout=200
    )
    assert res.state == "TIMEOUT", res
    assert "DUE TO TIME LIMIT" in res.stderr


def _live_processes(*names: str) -> list[str]:
    """Non-zombie processes with one of these command names (PID 1 here reaps zombies late)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        state = text[text.rindex(")") + 2]
        if comm in names and state != "Z":
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
        assert "hpcd-" not in netns
        links = subprocess.run(
            ["ip", "-o", "link"], check=False, capture_output=True, text=True
        ).stdout
        assert "hpcd-" not in links
        assert not [line for line in links.splitlines() if ": ib0" in line]
        assert _live_processes("slurmd", "slurmctld", "slurmstepd", "munged") == []
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
