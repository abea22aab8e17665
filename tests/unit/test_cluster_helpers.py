"""hpcdask.cluster: the dask-jobqueue clusters' job scripts as text (like dask-jobqueue's own
test_job_script), with the scheduler on loopback (the host has no ib0)."""

from __future__ import annotations

import os
import re
import stat

import pytest

from hpcdask import batch, cluster
from hpcdask.errors import BadInput


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCDASK_SHARED_DIR", str(tmp_path / "shared"))
    from hpcdask import config
    config.reconfigure()
    yield tmp_path / "shared"
    monkeypatch.delenv("HPCDASK_SHARED_DIR")
    config.reconfigure()


def test_slurm_job_script_runs_the_worker_in_the_image_over_tls(shared):
    with cluster.slurm_cluster("/img/hpcdask.sif", cores=2, memory="4GiB", walltime="00:10:00",
                               scheduler_interface="lo", interface="ib0", require_image=False,
                               dashboard="off") as c:
        script = c.job_script()
        (top,) = shared.iterdir()
        assert top.name.startswith("jobqueue-") and stat.S_IMODE(top.stat().st_mode) == 0o700
        assert sorted(p.name for p in top.iterdir() if not p.name.startswith(".tls-")) == [
            "owner.json", "tls"]
        folder = (top / "tls").resolve()  # the credentials set the job script names
        assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "cluster.key", "cluster.pem"]
        assert c.scheduler_address.startswith("tls://127.0.0.1:")
    assert not top.exists(), "the cluster's folder goes with the cluster"
    lines = script.splitlines()
    assert "#SBATCH -t 00:10:00" in lines and "#SBATCH --mem=4G" in lines
    # Scratch: a private folder in the node-local $TMPDIR, removed when the job script ends.
    assert 'HPCDASK_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/hpcdask-XXXXXX")' in lines
    assert """trap 'rm -rf -- "$HPCDASK_SCRATCH"' EXIT""" in lines
    cmd = lines[-1]
    assert cmd.startswith(f'apptainer exec --bind {folder} --bind "${{TMPDIR:-/tmp}}" '
                          f"/img/hpcdask.sif python -m distributed.cli.dask_worker tls://127.0.0.1:")
    for part in ("--interface ib0", "--protocol tls://", f"--tls-ca-file {folder}/ca.pem",
                 f"--tls-cert {folder}/cluster.pem", f"--tls-key {folder}/cluster.key",
                 "--local-directory $HPCDASK_SCRATCH",
                 # 600 s walltime - 120 s margin - 30 s stagger: retire before the limit
                 "--lifetime 450s --lifetime-stagger 30s"):
        assert part in cmd, part


def test_submit_prefix_and_memory_preset(shared, monkeypatch):
    monkeypatch.setenv("HPCDASK_MEMORY_PRESET", "no-local-storage")
    from hpcdask import config
    config.reconfigure()
    with cluster.slurm_cluster("/img", cores=1, memory="1GiB", scheduler_interface="lo",
                               require_image=False, dashboard="off",
                               submit_prefix="ssh login1") as c:
        script = c.job_script()
        assert c.job_cls.submit_command == "ssh login1 sbatch"
        assert c.job_cls.cancel_command == "ssh login1 scancel"
    assert "export DASK_DISTRIBUTED__WORKER__MEMORY__SPILL=False" in script
    assert "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=0.8" in script
    assert "--lifetime" not in script  # no walltime, no retirement


def test_pbs_gadi_directives(shared):
    with cluster.pbs_cluster("/img", cores=48, memory="192GB", walltime="00:20:00",
                             queue="normal", project="vp91", ncpus=48, mem="192GB",
                             jobfs="100GB", scheduler_interface="lo", require_image=False,
                             dashboard="off") as c:
        script = c.job_script()
    d = [ln for ln in script.splitlines() if ln.startswith("#PBS")]
    assert d == ["#PBS -N dask-worker", "#PBS -q normal", "#PBS -l walltime=00:20:00",
                 "#PBS -P vp91", "#PBS -l ncpus=48", "#PBS -l mem=192GB", "#PBS -l jobfs=100GB"]
    assert script.startswith("#!/usr/bin/env bash\n")
    assert re.search(r'--bind "\$PBS_JOBFS" /img python -m distributed.cli.dask_worker', script)
    assert "--local-directory $HPCDASK_SCRATCH" in script
    assert 'HPCDASK_SCRATCH=$(mktemp -d "$PBS_JOBFS/hpcdask-XXXXXX")' in script


@pytest.fixture
def qsub(tmp_path, monkeypatch):
    """A stand-in for Grid Engine's qsub on PATH: prints $FAKE_QSUB_OUT, exits $FAKE_QSUB_RC
    (by default qsub -w v's approval), and records its arguments in $FAKE_QSUB_ARGS."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "qsub").write_text('#!/bin/sh\necho "$@" >"$FAKE_QSUB_ARGS"\n'
                               'printf "%s\\n" "$FAKE_QSUB_OUT"\nexit "$FAKE_QSUB_RC"\n')
    (bin_ / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setenv("SGE_ROOT", "/var/lib/gridengine")
    monkeypatch.setenv("FAKE_QSUB_ARGS", str(tmp_path / "qsub.args"))
    monkeypatch.setenv("FAKE_QSUB_OUT", "verification: found suitable queue(s)")
    monkeypatch.setenv("FAKE_QSUB_RC", "0")
    return tmp_path / "qsub.args"


def test_sge_directives_and_worker_in_the_image(shared, qsub):
    """sge_cluster: dask-jobqueue's SGECluster, memory asked as h_vmem in Grid Engine's whole MiB
    (it refuses "MiB"), h_rt from walltime, the queue, the worker under apptainer exec over TLS;
    Grid Engine verified the request first (qsub -w v)."""
    with cluster.sge_cluster("/img", cores=1, memory="3000MiB", walltime="00:20:00", queue="all.q",
                             scheduler_interface="lo", require_image=False, dashboard="off") as c:
        script = c.job_script()
        assert c.job_cls.submit_command == "qsub"
    d = [ln for ln in script.splitlines() if ln.startswith("#$")]
    assert "#$ -q all.q" in d and "#$ -l h_vmem=3000M" in d and "#$ -l h_rt=00:20:00" in d, d
    assert qsub.read_text().split() == ["-w", "v", "-b", "y", "-q", "all.q", "-l", "h_vmem=3000M",
                                        "-l", "h_rt=00:20:00", "true"]
    assert re.search(r"apptainer exec --bind \S+ --bind \"\$\{TMPDIR:-/tmp\}\" /img python -m "
                     r"distributed.cli.dask_worker tls://127.0.0.1:", script), script
    assert "--lifetime" in script  # retires before h_rt
    # qdel of a retiring worker's job warns first (-notify), and the warning is ignored: the
    # worker ends by itself (tests/sge/test_sge_cluster_helper.py checks it on Grid Engine).
    assert "#$ -notify" in d, d
    assert script.index("trap '' USR1 USR2") < script.index("distributed.cli.dask_worker"), script


def test_sge_without_sge_root_is_one_line(shared, monkeypatch):
    monkeypatch.delenv("SGE_ROOT", raising=False)
    with pytest.raises(BadInput, match=r"SGE_ROOT is not set.*settings\.sh.*submit_prefix"):
        cluster.sge_cluster("/img", cores=1, memory="1GiB", scheduler_interface="lo",
                            require_image=False)
    assert not shared.exists() or not list(shared.iterdir())  # nothing half-made


# Grid Engine 8.1.9's own refusals (qsub -w v on the test cluster), and the line each becomes.
REFUSALS = [
    ('Unable to run job: Job was rejected because job requests unknown queue "nosuchq".\nExiting.',
     dict(queue="nosuchq"),
     r"^queue 'nosuchq' does not exist on this Grid Engine cluster; list its queues with "
     r"`qstat -g c` and name one: sge_cluster\(queue='all\.q', \.\.\.\)$"),
    ("Unable to run job: Job 36 does not request 'forced' resource \"h_vmem\" of host node1\n"
     "Job 36 does not request 'forced' resource \"h_vmem\" of host node2\n"
     "verification: no suitable queues\nExiting.",
     dict(resource_spec="mem_free=1G"),
     r"^this site requires every job to ask for h_vmem .*; ask for it: "
     r"sge_cluster\(resource_spec='mem_free=1G,h_vmem=\.\.\.', \.\.\.\)$"),
    ('Unable to run job: attribute "h_vmem" is not a memory value\nExiting.',
     dict(resource_spec="h_vmem=3GiB"),
     r"^h_vmem in resource_spec='h_vmem=3GiB' is not a Grid Engine memory value; use K, M or G: "
     r"sge_cluster\(resource_spec='h_vmem=4G', \.\.\.\)$"),
]


@pytest.mark.parametrize("said, kwargs, line", REFUSALS, ids=["queue", "forced", "unit"])
def test_sge_request_grid_engine_refuses_is_one_line(shared, qsub, monkeypatch, said, kwargs, line):
    monkeypatch.setenv("FAKE_QSUB_OUT", said)
    monkeypatch.setenv("FAKE_QSUB_RC", "1")
    with pytest.raises(BadInput) as err:
        cluster.sge_cluster("/img", cores=1, memory="1GiB", scheduler_interface="lo",
                            require_image=False, **kwargs)
    assert re.match(line, str(err.value)) and "\n" not in str(err.value), str(err.value)
    assert not shared.exists() or not list(shared.iterdir())  # nothing half-made


def test_outside_the_image_is_refused(shared):
    with pytest.raises(BadInput, match="runs outside the image"):
        cluster.job_kwargs("/img", scheduler_interface="lo")


def test_a_scheduler_outside_the_workers_sif_is_refused(shared, monkeypatch, tmp_path):
    """Workers report their SIF's ID: the scheduler started here must run from the same SIF."""
    import subprocess

    from hpcdask import sif, versions

    img, other = tmp_path / "dask.sif", tmp_path / "other.sif"
    for p in (img, other):
        subprocess.run(["siftool", "new", str(p)], check=True)
    monkeypatch.setattr(versions, "image_info", lambda: {"lock_sha256": "ab" * 32})
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    monkeypatch.setattr(sif, "IMAGE_SIF", str(other))
    with pytest.raises(BadInput) as e:
        cluster.job_kwargs(str(img), scheduler_interface="lo")
    msg = e.value.format_message()
    assert "\n" not in msg and sif.read_header(img).id in msg and sif.read_header(other).id in msg
    assert f"--bind {img}:{sif.IMAGE_SIF}:ro" in msg
    monkeypatch.setattr(sif, "IMAGE_SIF", str(img))
    kw = cluster.job_kwargs(str(img), scheduler_interface="lo")
    assert f"--bind {img}:{sif.IMAGE_SIF}:ro {img} python" in kw["python"]


def test_no_image_is_one_line(shared, monkeypatch):
    monkeypatch.delenv("HPCDASK_IMAGE", raising=False)
    with pytest.raises(BadInput, match="export HPCDASK_IMAGE="):
        cluster.job_kwargs(None, scheduler_interface="lo", require_image=False)


def test_walltime_too_short_for_the_margin(shared):
    with pytest.raises(BadInput, match="leaves no time"):
        cluster.job_kwargs("/img", walltime="00:02:00", scheduler_interface="lo",
                           require_image=False)


def _listening_ports_of_this_process() -> set[tuple[str, int]]:
    import os

    import psutil
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(os.getpid()).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("mode", ["off", "loopback"])
def test_dashboard_modes(shared, mode):
    """off: the scheduler listens only on its TLS port and workers get no HTTP server at all;
    loopback: the scheduler's dashboard and the workers' HTTP endpoints on 127.0.0.1 only."""
    before = _listening_ports_of_this_process()
    with cluster.slurm_cluster("/img", cores=1, memory="1GiB", scheduler_interface="lo",
                               require_image=False, dashboard=mode) as c:
        script = c.job_script()
        ports = _listening_ports_of_this_process() - before
        sched = ("127.0.0.1", int(c.scheduler_address.rsplit(":", 1)[1]))
        if mode == "off":
            assert ports == {sched}
        else:
            assert sched in ports and len(ports) == 2
            assert all(ip == "127.0.0.1" for ip, _ in ports)
    if mode == "off":
        assert "--no-dashboard --worker-class hpcdask.servers.NoHTTPWorker" in script
    else:
        assert "--dashboard-address 127.0.0.1:0" in script


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("90", 5400), ("10:30", 630), ("01:00:00", 3600), ("36:00:00", 129600),
    ("2-12", 2 * 86400 + 12 * 3600), ("1-00:30", 86400 + 1800), ("0-01:02:03", 3723),
])
def test_every_slurm_time_format(text, seconds):
    assert batch.walltime_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["1h", "1:2:3:4", "1-", "-5", "a-b", "1-2:3:4:5", "1.5"])
def test_a_malformed_walltime_is_one_line(bad, shared):
    with pytest.raises(BadInput) as e:
        cluster.job_kwargs("/img", walltime=bad, scheduler_interface="lo", require_image=False)
    assert e.value.exit_code == 2 and "\n" not in e.value.format_message()
    assert "is not a Slurm time; write MM, MM:SS, HH:MM:SS" in e.value.format_message()


def test_a_walltime_in_minutes_is_not_read_as_seconds(shared):
    kw = cluster.job_kwargs("/img", walltime="30", scheduler_interface="lo", require_image=False)
    # 30 minutes - 120 s margin - 30 s stagger
    args = kw["worker_extra_args"]
    assert args[args.index("--lifetime") + 1] == "1650s"


def test_workers_bind_the_schedulers_network_where_the_fabric_is_missing(shared, caplog):
    """A login node without ib0 cannot reach workers on ib0: unless interface= is given, they
    bind the scheduler's interface, and the log line says why and what to do for ib0."""
    kw = cluster.job_kwargs("/img", scheduler_interface="lo", require_image=False)
    assert kw["interface"] == "lo"
    assert "has no ib0: the workers bind lo too" in caplog.text
    assert "dask-scheduler.sbatch" in caplog.text
    kw = cluster.job_kwargs("/img", scheduler_interface="lo", interface="ib0", require_image=False)
    assert kw["interface"] == "ib0"  # asked for explicitly: kept


def test_slurm_gpu_job_script_one_gpu_per_worker_job(shared):
    """No GPU here: the job script as text (dask-jobqueue's job_script())."""
    with cluster.slurm_cluster("/img/hpcdask.sif", cores=4, memory="8GiB", gpus=1,
                               scheduler_interface="lo", require_image=False,
                               dashboard="off") as c:
        script = c.job_script()
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    cmd = lines[-1]
    assert cmd.startswith("apptainer exec --nv --bind ")
    assert "--resources GPU=1" in cmd and "--nworkers" not in cmd  # one worker process


def test_slurm_cpu_job_script_has_no_gpu_parts(shared):
    with cluster.slurm_cluster("/img/hpcdask.sif", cores=1, memory="1GiB",
                               scheduler_interface="lo", require_image=False,
                               dashboard="off") as c:
        script = c.job_script()
    assert "--gres" not in script and "--nv" not in script and "GPU=1" not in script


@pytest.mark.parametrize("kwargs", [{"gpus": 2}, {"gpus": 1, "processes": 2}])
def test_slurm_gpu_more_than_one_per_job_is_one_line(shared, kwargs):
    with pytest.raises(BadInput, match=r"use gpus=1 and cluster.scale\(jobs=N\)"):
        cluster.slurm_cluster("/img/hpcdask.sif", cores=2, memory="1GiB",
                              scheduler_interface="lo", require_image=False, dashboard="off",
                              **kwargs)
