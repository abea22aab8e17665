"""The jobscripts' recipes (issue 14) as text and as runs with stand-ins for srun, squeue,
pbsdsh, qstat and apptainer (no Slurm, PBS or GPU needed): GPU workers, Jupyter next to the
cluster, worker job arrays (Slurm --array, PBS -J)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBSCRIPTS = REPO / "jobscripts"
LIB = JOBSCRIPTS / "lib" / "hpcdask-job.sh"
RECIPES = JOBSCRIPTS / "lib" / "hpcdask-recipes.sh"
NEW = [RECIPES, JOBSCRIPTS / "pbs" / "dask-scheduler.pbs", JOBSCRIPTS / "pbs" / "dask-workers.pbs"]


@pytest.mark.parametrize("path", NEW, ids=lambda p: p.name)
def test_new_scripts_parse_and_pass_shellcheck(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is missing: apt-get install shellcheck (required in CI)"
    proc = subprocess.run([exe, "-x", "-s", "bash", str(path)], capture_output=True, text=True,
                          cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if path.suffix == ".pbs":
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/bin/bash\n")


def fakes(tmp_path: Path, **bodies: str) -> dict[str, str]:
    """Executables NAME (a shell body each) first on PATH; every call is logged to $LOG."""
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (b / name).write_text(f'#!/bin/bash\necho "{name} $*" >>"$LOG"\n{body}\n')
        (b / name).chmod(0o755)
    return {"PATH": f"{b}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"),
            "HOME": str(tmp_path / "home")}


def lib(snippet: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}"; {snippet}', "x", *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


# --- GPUs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", ["1", "true", "yes"])
def test_gpu_workers_run_with_nv_and_gpus(tmp_path, gpu):
    env = {**fakes(tmp_path, srun=""), "HPCDASK_IMAGE": "/img.sif", "HPCDASK_GPU": gpu}
    proc = lib(f'hj_cluster_dir "{tmp_path}/c" 1; hj_srun_workers F 1700000000 2; wait "$HJ_WORKERS"',
               env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=0 --no-kill apptainer exec --nv --bind "
        f"{tmp_path}/c /img.sif hpcdask worker --scheduler-file F --lifetime auto --job-end "
        f"1700000000 --gpus"]


@pytest.mark.parametrize("gpu", ["", "0", "false"])
def test_cpu_workers_unchanged_without_hpcdask_gpu(tmp_path, gpu):
    env = {**fakes(tmp_path, srun=""), "HPCDASK_IMAGE": "/img.sif", "HPCDASK_GPU": gpu}
    proc = lib(f'hj_cluster_dir "{tmp_path}/c" 1; hj_srun_workers F "" 1; wait "$HJ_WORKERS"', env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        f"srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=0 --no-kill apptainer exec --bind "
        f"{tmp_path}/c /img.sif hpcdask worker --scheduler-file F"]


def test_pbs_gpu_workers_env_file(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("g1\n")
    env = {**fakes(tmp_path, pbsdsh=""), "HPCDASK_IMAGE": "/img.sif", "HPCDASK_GPU": "1",
           "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "9.pbs"}
    proc = lib(f'hj_cluster_dir "{tmp_path}/c" 1; hj_pbsdsh_workers F "" 1; wait "$HJ_WORKERS"', env)
    assert proc.returncode == 0, proc.stderr
    last = (tmp_path / "c" / "worker-env-9.pbs.sh").read_text().splitlines()[-1]
    assert last == (f"exec apptainer exec --nv --bind {tmp_path}/c /img.sif hpcdask worker "
                    f"--scheduler-file F --gpus")


# --- Jupyter ----------------------------------------------------------------------------------

def test_all_in_one_jupyter_is_the_jobs_client(tmp_path):
    proc = lib('HJ_EXEC=(echo); hj_start_client F 0 "$@"; wait "$HJ_CLIENT"', {}, "--jupyter")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hpcdask jupyter --scheduler-file F"


def scheduler_job(tmp_path: Path, script: Path, env_extra: dict[str, str], *args: str):
    """Run a scheduler jobscript with an apptainer stand-in whose scheduler writes its file and
    waits for SIGTERM, and whose jupyter ends at once (the user shut it down)."""
    apptainer = (
        'while [ "$1" != hpcdask ]; do shift; done; shift\n'
        'case $1 in\n'
        '  scheduler) echo \'{"address": "tls://x"}\' >"$3"; trap "exit 0" TERM; '
        'while :; do sleep 0.1; done ;;\n'
        '  jupyter) exit 0 ;;\n'
        'esac')
    img = tmp_path / "img.sif"
    img.write_text("")
    env = {**os.environ, **fakes(tmp_path, apptainer=apptainer), "HPCDASK_IMAGE": str(img),
           "HPCDASK_JOBSCRIPTS": str(JOBSCRIPTS), "HPCDASK_CLUSTER_DIR": str(tmp_path / "c"),
           **env_extra}
    proc = subprocess.Popen(["bash", str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_scheduler_job_keeps_the_scheduler_when_jupyter_ends(tmp_path, kind):
    import time

    if kind == "slurm":
        proc = scheduler_job(tmp_path, JOBSCRIPTS / "slurm" / "dask-scheduler.sbatch",
                             {"SLURM_JOB_ID": "5"}, "--jupyter")
    else:
        proc = scheduler_job(tmp_path, JOBSCRIPTS / "pbs" / "dask-scheduler.pbs",
                             {"PBS_JOBID": "5.pbs", "HPCDASK_ARGS": "--jupyter"})
    log = tmp_path / "log"
    deadline = time.time() + 30
    while "hpcdask jupyter" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    assert proc.poll() is None  # jupyter ended; the scheduler job goes on
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "jupyter ended (exit 0); the scheduler stays" in err
    assert "stopped by SIGTERM" in err
    calls = log.read_text()
    assert f"hpcdask jupyter --scheduler-file {tmp_path}/c/scheduler.json" in calls


# --- job arrays -------------------------------------------------------------------------------

def test_slurm_array_task_retires_before_its_own_end(tmp_path):
    """An array task (sbatch --array=1-3) is a job of its own: its end time is asked of Slurm by
    its own name (ARRAYID_TASKID), not the array's ID, and its workers retire before that end."""
    (tmp_path / "c").mkdir(mode=0o700)  # the scheduler job's folder
    # Asked by the array's ID, squeue lists every task; by the task's own name, just its end.
    squeue = ('[ "$3" = 1000_2 ] && echo 2030-01-01T10:00:00 || '
              'printf "2030-01-01T23:00:00\\n2030-01-01T10:00:00\\n"')
    # The array's first task shares its ID: scontrol shows every task's record then.
    record = f"JobId=%s ArrayJobId=1000 Command={JOBSCRIPTS}/slurm/dask-workers.sbatch Foo=1"
    scontrol = "; ".join(f'echo "{record % i}"' for i in (1000, 1001, 1002))
    env = {**os.environ, **fakes(tmp_path, srun="", squeue=squeue, apptainer="",
                                 scontrol=scontrol)}
    img = tmp_path / "img.sif"
    img.write_text("")
    env.pop("HPCDASK_JOBSCRIPTS", None)  # found through scontrol, as in a real job
    env.update(HPCDASK_IMAGE=str(img), TZ="UTC",
               HPCDASK_CLUSTER_DIR=str(tmp_path / "c"), SLURM_JOB_ID="1002",
               SLURM_ARRAY_JOB_ID="1000", SLURM_ARRAY_TASK_ID="2", SLURM_JOB_NUM_NODES="1")
    proc = subprocess.run(["bash", str(JOBSCRIPTS / "slurm" / "dask-workers.sbatch")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert "squeue -h -j 1000_2 -o %e" in calls
    end = 1893492000  # 2030-01-01T10:00:00Z
    assert calls[-1] == (f"srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=0 --no-kill apptainer exec "
                         f"--bind {tmp_path}/c --bind {img}:/opt/hpcdask/image.sif:ro {img} "
                         f"hpcdask worker --scheduler-file "
                         f"{tmp_path}/c/scheduler.json --lifetime auto --job-end {end}")


def test_pbs_array_subjobs_each_have_their_own_env_file(tmp_path):
    """qsub -J 1-3 dask-workers.pbs: subjobs share the cluster folder; each writes its own
    worker file and retires before its own walltime."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\n")
    (tmp_path / "c").mkdir(mode=0o700)  # the scheduler job's folder
    qstat = 'echo "    Resource_List.walltime = 00:30:00"'
    img = tmp_path / "img.sif"
    img.write_text("")
    for task in (1, 2):
        env = {**os.environ, **fakes(tmp_path, pbsdsh="", qstat=qstat, apptainer="")}
        env.update(HPCDASK_IMAGE=str(img), HPCDASK_JOBSCRIPTS=str(JOBSCRIPTS),
                   HPCDASK_CLUSTER_DIR=str(tmp_path / "c"), PBS_JOBID=f"77[{task}].pbs",
                   PBS_ARRAY_INDEX=str(task), PBS_NODEFILE=str(nodefile), PBS_VMEM="1000000000",
                   PBS_JOBFS=str(tmp_path))
        proc = subprocess.run(["bash", str(JOBSCRIPTS / "pbs" / "dask-workers.pbs")], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "c").glob("worker-env-*"))
    assert files == ["worker-env-77[1].pbs.sh", "worker-env-77[2].pbs.sh"]
    text = (tmp_path / "c" / "worker-env-77[2].pbs.sh").read_text()
    assert "export HPCDASK_NTHREADS=2" in text and "export HPCDASK_NODE_MEMORY=1000000000" in text
    assert "HPCDASK_MEMORY_LIMIT" not in text  # hpcdask.memory sizes it, with the headroom
    assert "--lifetime auto --job-end " in text.splitlines()[-1]
    calls = (tmp_path / "log").read_text()
    assert "qstat -f 77[2].pbs" in calls
    assert f"pbsdsh -n 0 -- /bin/bash {tmp_path}/c/worker-env-77[2].pbs.sh" in calls


# --- dask-mpi ---------------------------------------------------------------------------------

MPI_SBATCH = JOBSCRIPTS / "slurm" / "dask-mpi.sbatch"


def test_mpi_jobscript_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(MPI_SBATCH)], capture_output=True).returncode == 0
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is missing: apt-get install shellcheck (required in CI)"
    proc = subprocess.run([exe, "-x", "-P", str(JOBSCRIPTS / "lib"), "-s", "bash", str(MPI_SBATCH)],
                          capture_output=True, text=True, cwd=MPI_SBATCH.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(MPI_SBATCH, os.X_OK)


def _mpi_job(tmp_path, *args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**fakes(tmp_path, srun='echo "UCX_TLS=$UCX_TLS LOCAL=${HPCDASK_LOCAL_DIRECTORY:-}" >>"$LOG"'),
           "HPCDASK_IMAGE": str(tmp_path / "img"), "HPCDASK_JOBSCRIPTS": str(JOBSCRIPTS),
           "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "TMPDIR": str(tmp_path / "tmp"),
           "HPCDASK_SHARED_DIR": str(tmp_path / "shared"), **env_extra}
    (tmp_path / "img").mkdir(exist_ok=True)
    fakes(tmp_path, apptainer="")
    proc = subprocess.run(["bash", str(MPI_SBATCH), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=tmp_path, timeout=60)
    return proc, env


def test_mpi_job_is_one_srun_pmi2_step_of_hpcdask_mpi_ranks(tmp_path):
    (tmp_path / "job.py").write_text("print(1)\n")
    proc, _ = _mpi_job(tmp_path, "job.py", "--arg", "1")
    assert proc.returncode == 0, proc.stderr
    srun, env = (tmp_path / "log").read_text().splitlines()
    d = srun.split("--bind ")[1].split()[0]
    assert d.startswith(f"{tmp_path}/shared/job-42."), srun
    assert srun == (f"srun --mpi=pmi2 --kill-on-bad-exit=1 apptainer exec --bind {d} --bind "
                    f"{tmp_path}/tmp {tmp_path}/img hpcdask mpi --scheduler-file "
                    f"{d}/scheduler-42.json job.py --arg 1")
    # UCX over TCP unless the user says otherwise; each node's own $TMPDIR is the ranks' scratch.
    assert env == "UCX_TLS=tcp,self LOCAL="
    # The job's cluster folder and the batch node's scratch are gone at the end.
    assert list((tmp_path / "shared").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_mpi_job_options_pass_through(tmp_path):
    (tmp_path / "job.py").write_text("print(1)\n")
    proc, _ = _mpi_job(tmp_path, "job.py", HPCDASK_SRUN_MPI="--mpi=pmix --cpu-bind=none",
                       UCX_TLS="rc,sm,self")
    assert proc.returncode == 0, proc.stderr
    srun, env = (tmp_path / "log").read_text().splitlines()
    assert srun.startswith("srun --mpi=pmix --cpu-bind=none --kill-on-bad-exit=1 apptainer exec")
    assert env.startswith("UCX_TLS=rc,sm,self ")


@pytest.mark.parametrize("args, says", [
    ((), "give your Python script after the jobscript"),
    (("missing.py",), "script missing.py does not exist"),
])
def test_mpi_job_without_a_script_is_one_line_exit_2(tmp_path, args, says):
    proc, _ = _mpi_job(tmp_path, *args)
    _one_line_exit_2(tmp_path, proc, says)


def test_mpi_job_of_fewer_than_3_ranks_is_one_line_exit_2(tmp_path):
    (tmp_path / "job.py").write_text("print(1)\n")
    proc, _ = _mpi_job(tmp_path, "job.py", SLURM_NTASKS="2")
    _one_line_exit_2(tmp_path, proc, "needs at least 3 MPI ranks (scheduler, client, one worker), "
                     "this job has 2; submit with more, e.g. sbatch -N 2 -n 4 dask-mpi.sbatch job.py")


def _one_line_exit_2(tmp_path, proc, says):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert not (tmp_path / "log").exists() or "srun" not in (tmp_path / "log").read_text()
    assert list((tmp_path / "shared").iterdir()) == []
