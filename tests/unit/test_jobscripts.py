"""The jobscripts as text, like dask-jobqueue's test_header / test_job_script: the key lines are
there exactly, every script parses (bash -n) and passes shellcheck, and the shared library's
checks fail with one line before anything starts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBSCRIPTS = REPO / "jobscripts"
LIB = JOBSCRIPTS / "lib" / "hpcdask-job.sh"
ALL_IN_ONE = JOBSCRIPTS / "slurm" / "dask-cluster.sbatch"
SCHEDULER = JOBSCRIPTS / "slurm" / "dask-scheduler.sbatch"
WORKERS = JOBSCRIPTS / "slurm" / "dask-workers.sbatch"
PBS = JOBSCRIPTS / "pbs" / "dask-cluster.pbs"
SCRIPTS = [ALL_IN_ONE, SCHEDULER, WORKERS, PBS]
SGE = [JOBSCRIPTS / "sge" / "dask-scheduler.sge", JOBSCRIPTS / "sge" / "dask-workers.sge"]


def directives(path: Path, prefix: str = "#SBATCH") -> list[str]:
    return [line[len(prefix):].strip() for line in path.read_text().splitlines()
            if line.startswith(prefix + " ")]


def code(path: Path) -> str:
    """The script without its comments (so the assertions look at what runs)."""
    return "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("path", [*SCRIPTS, *SGE, LIB], ids=lambda p: p.name)
def test_bash_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", [*SCRIPTS, *SGE, LIB], ids=lambda p: p.name)
def test_shellcheck_clean(path):
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is missing: apt-get install shellcheck (required in CI)"
    proc = subprocess.run([exe, "-x", "-s", "bash", str(path)], capture_output=True, text=True,
                          cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [*SCRIPTS, *SGE], ids=lambda p: p.name)
def test_scripts_are_executable_bash_with_strict_mode(path):
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in text
    # Big core, tiny variants: every script sources the one library and stays short.
    assert re.search(r'^source "\$jobscripts/lib/hpcdask-job\.sh"$', text, re.M)
    assert len(code(path).splitlines()) < 30


def test_all_in_one_sbatch_defaults():
    assert directives(ALL_IN_ONE) == [
        "--job-name=hpcdask",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=00:30:00",
        "--output=hpcdask-%j.out",
        "--no-kill",  # a crashed node ends its own worker only (docs/slurm.md)
    ]


def test_scheduler_and_worker_job_defaults():
    assert directives(SCHEDULER) == ["--job-name=hpcdask-scheduler", "--nodes=1",
                                     "--ntasks-per-node=1", "--time=04:00:00",
                                     "--output=hpcdask-scheduler-%j.out"]
    assert directives(WORKERS) == ["--job-name=hpcdask-workers", "--nodes=1",
                                   "--ntasks-per-node=1", "--time=00:30:00",
                                   "--output=hpcdask-workers-%j.out", "--no-kill"]


def test_all_in_one_folder_and_scheduler_file_are_per_job():
    text = code(ALL_IN_ONE)
    assert 'hj_new_cluster_dir "$SLURM_JOB_ID"' in text  # made exclusively, removed at the end
    assert 'hj_all_in_one "$HJ_DIR/scheduler-$SLURM_JOB_ID.json" "$SLURM_JOB_NUM_NODES" "$@"' in text


def test_scheduler_and_workers_meet_in_the_cluster_dir():
    named = 'hj_cluster_dir "${HPCDASK_CLUSTER_DIR:-${HPCDASK_SHARED_DIR:-$HOME/.hpcdask/clusters}/default}"'
    assert named + " 1\n" in code(SCHEDULER)  # the scheduler job may create it (then removes it)
    assert named + "\n" in code(WORKERS)  # worker jobs only use it
    assert 'hj_start_scheduler "$HJ_DIR/scheduler.json"' in code(SCHEDULER)
    assert 'file=$HJ_DIR/scheduler.json' in code(WORKERS)
    assert 'hj_srun_workers "$file" "$(hj_job_end)" "$SLURM_JOB_NUM_NODES"' in code(WORKERS)


def test_library_key_lines():
    text = code(LIB)
    # The interface is hpcdask's setting (ib0 by default in hpcdask.yaml): the jobscripts never
    # set it, so ~/.config/dask/*.yaml and DASK_HPCDASK__INTERFACE reach the roles.
    assert "HPCDASK_INTERFACE=" not in text
    # Workers: one srun task per node, never an apptainer instance.
    assert ('HPCDASK_LOCAL_DIRECTORY=$HJ_USER_LOCAL srun --nodes="$nodes" --ntasks-per-node=1 '
            '"${cpt[@]}" \\\n        --kill-on-bad-exit=0 --no-kill "${HJ_WORKER_ARGV[@]}" &') in text
    # This node's roles keep their scratch in HJ_SCRATCH, removed even after a SIGKILL.
    assert '[ -z "$HJ_SCRATCH" ] || rm -rf -- "$HJ_SCRATCH"' in text
    assert 'HJ_WORKER_ARGV=("${HJ_EXEC[@]}" hpcdask worker --scheduler-file "$1")' in text
    assert 'HJ_WORKER_ARGV+=(--lifetime auto --job-end "$2")' in text
    assert "instance" not in text
    # The job's end time for --lifetime auto comes from Slurm itself.
    assert 'squeue -h -j "$id" -o %e' in text  # the job's, or the array task's own (ID_TASK)
    # Every role: apptainer exec IMAGE hpcdask ROLE.
    assert 'HJ_EXEC=("$HJ_APPTAINER" exec --bind "$HJ_DIR")' in text
    assert 'HJ_EXEC+=("$HPCDASK_IMAGE")' in text
    # The scheduler's credentials expire soon after the job's end (30 days when it has none).
    assert ('"${HJ_EXEC[@]}" hpcdask scheduler --scheduler-file "$file" ${end:+--job-end "$end"} &'
            in text)
    assert 'rm -rf -- "$HJ_DIR"/tls "$HJ_DIR"/.tls-*' in text
    # Readiness is real: the client waits for N registered workers (Jupyter: hpcdask wait).
    assert 'wait=(--wait-workers "$n" --wait-timeout "$HJ_READY_TIMEOUT")' in text
    assert ('"${HJ_EXEC[@]}" hpcdask wait --scheduler-file "$file" --workers "$n" '
            '--timeout "$HJ_READY_TIMEOUT" &') in text
    # The client: hpcdask run, or the user's script after "--" (its options stay its own).
    assert '"${HJ_EXEC[@]}" hpcdask run --scheduler-file "$file" "${wait[@]}" "$@" &' in text
    assert ('"${HJ_EXEC[@]}" hpcdask client --scheduler-file "$file" "${wait[@]}" -- "$@" &'
            in text)
    # Orderly end: SIGTERM to the scheduler, which retires the workers; cleanup on any exit.
    assert 'kill -TERM "$HJ_SCHED"' in text
    assert "trap hj_cleanup EXIT" in text
    # Private per-cluster folders, created exclusively; an existing scheduler file is never removed.
    assert 'HJ_DIR=$(mktemp -d "$parent/job-$1.XXXXXX")' in text
    assert 'mkdir "$HJ_DIR"' in text
    assert 'rm -f "$file"' not in text


def test_pbs_script_in_gadi_style():
    d = directives(PBS, "#PBS")
    assert d == ["-N hpcdask", "-q normal", "-l ncpus=96", "-l mem=380GB", "-l jobfs=100GB",
                 "-l walltime=00:30:00", "-l wd", "-j oe"]
    text = code(PBS)
    assert 'export HPCDASK_LOCAL_DIRECTORY=${HPCDASK_LOCAL_DIRECTORY:-${PBS_JOBFS:-${TMPDIR:-/tmp}}}' in text
    assert 'hj_all_in_one "$HJ_DIR/scheduler-$PBS_JOBID.json"' in text
    lib = code(LIB)
    assert 'pbsdsh -n "$i" -- /bin/bash "$envfile" &' in lib
    assert "ssh" not in lib and "mpirun" not in lib


def run_lib(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{LIB}"; {snippet}'],
                          capture_output=True, text=True, env=full, timeout=30)


def test_missing_image_is_one_line_exit_2():
    proc = run_lib("hj_require", {})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hpcdask-job: error: HPCDASK_IMAGE is not set; export HPCDASK_IMAGE=/path/to/hpcdask.sif "
        "before sbatch/qsub (the job inherits it)"]


def test_absent_image_is_one_line_exit_2(tmp_path):
    proc = run_lib("hj_require", {"HPCDASK_IMAGE": str(tmp_path / "nope.sif")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.sif does not exist" in lines[0]


def test_missing_apptainer_is_one_line_exit_2(tmp_path):
    img = tmp_path / "img.sif"
    img.write_text("")
    proc = run_lib("hj_require", {"HPCDASK_IMAGE": str(img), "HPCDASK_APPTAINER": "no-such-apptainer"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'no-such-apptainer' not found on PATH" in lines[0]


@pytest.mark.parametrize("name, value, example", [
    ("HPCDASK_KILL_GRACE", "4.5", 4), ("HPCDASK_KILL_GRACE", "abc", 4),
    ("HPCDASK_STOP_TIMEOUT", "60s", 60), ("HPCDASK_STOP_TIMEOUT", "060", 60)])
def test_a_timeout_that_is_not_whole_seconds_is_one_line_exit_2(tmp_path, name, value, example):
    """Bash's arithmetic would read 'abc' as 0 and '060' as octal, or stop the job mid-cleanup."""
    img = tmp_path / "img.sif"
    img.write_text("")
    proc = run_lib("hj_require", {"HPCDASK_IMAGE": str(img), "HPCDASK_APPTAINER": "true",
                                  name: value})
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [
        f"hpcdask-job: error: {name}={value} is not a whole number of seconds; "
        f"e.g. {name}={example}"]
    ok = run_lib("hj_require", {"HPCDASK_IMAGE": str(img), "HPCDASK_APPTAINER": "true",
                                name: str(example)})
    assert ok.returncode == 0 and not ok.stderr, ok


def test_a_role_that_outlives_the_grace_is_killed_and_named():
    """The cleanup sends SIGTERM, waits HPCDASK_KILL_GRACE (whole, not cut by $SECONDS' ticks),
    then SIGKILLs what is left and says which role it was; a role that stops is not named."""
    snippet = ('bash -c \'trap "" TERM; while :; do sleep 0.1; done\' & HJ_SCHED=$!; '
               'sleep 30 & HJ_WORKERS=$!; sleep 0.3; '
               't0=$(date +%s%N); hj_cleanup; t1=$(date +%s%N); '
               'hj_alive "$HJ_SCHED" && echo alive || echo dead; echo $(( (t1 - t0) / 1000000 ))')
    proc = run_lib(snippet, {"HPCDASK_KILL_GRACE": "1"})
    assert proc.returncode == 0, proc
    assert proc.stderr.strip().splitlines() == [
        "hpcdask-job: scheduler still running 1s after SIGTERM: killed (HPCDASK_KILL_GRACE)"]
    state, ms = proc.stdout.split()
    assert state == "dead" and int(ms) >= 1000, proc.stdout


def test_job_cluster_dirs_are_private_exclusive_and_bind_tmpdir(tmp_path):
    shared = tmp_path / "shared"
    scratch = tmp_path / "local" / "job-1"
    scratch.mkdir(parents=True)
    env = {"HPCDASK_IMAGE": "/img", "HPCDASK_BIND": "/scratch,/project:/p:ro",
           "HPCDASK_SHARED_DIR": str(shared), "TMPDIR": str(scratch)}
    snippet = 'hj_new_cluster_dir 1; echo "$HJ_OWN_DIR"; printf "%s\\n" "${HJ_EXEC[@]}"'
    first, second = run_lib(snippet, env), run_lib(snippet, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    d1, d2 = Path(first.stdout.split()[4]), Path(second.stdout.split()[4])
    # Two jobs with the same id (a restarted cluster's, or another user's) never share a folder.
    assert d1 != d2 and d1.parent == d2.parent == shared
    assert d1.name.startswith("job-1.") and (d1.stat().st_mode & 0o777) == 0o700
    assert first.stdout.split() == ["1", "apptainer", "exec", "--bind", str(d1),
                                    "--bind", str(scratch), "--bind", "/scratch",
                                    "--bind", "/project:/p:ro", "/img"]
    # /tmp itself is bound by Apptainer by default.
    proc = run_lib(snippet, {**env, "TMPDIR": "/tmp"})
    assert "--bind /tmp " not in " ".join(proc.stdout.split()) + " "


def test_named_cluster_dir_is_made_only_by_the_scheduler_job(tmp_path):
    d = tmp_path / "clusters" / "session"
    # A worker job never creates it: one line naming the fix.
    proc = run_lib(f'hj_cluster_dir "{d}"', {"HPCDASK_IMAGE": "/img"})
    assert proc.returncode == 2 and not d.exists()
    assert proc.stderr.strip().splitlines() == [
        f"hpcdask-job: error: cluster folder {d} does not exist; submit the scheduler job first "
        f"(sbatch dask-scheduler.sbatch) with the same HPCDASK_CLUSTER_DIR"]
    # The scheduler job creates it (private) and then owns it; an existing one is only used.
    proc = run_lib(f'hj_cluster_dir "{d}" 1; echo "$HJ_OWN_DIR"', {"HPCDASK_IMAGE": "/img"})
    assert proc.returncode == 0 and proc.stdout.split() == ["1"], proc.stderr
    assert (d.stat().st_mode & 0o777) == 0o700
    proc = run_lib(f'hj_cluster_dir "{d}" 1; echo "$HJ_OWN_DIR"', {"HPCDASK_IMAGE": "/img"})
    assert proc.stdout.split() == ["0"], proc.stderr


def test_a_sif_file_is_bound_onto_the_image_placeholder(tmp_path):
    """Every role reads the ID of its .sif from /opt/hpcdask/image.sif (hpcdask.sif)."""
    img = tmp_path / "dask.sif"
    img.write_bytes(b"")
    d = tmp_path / "c"
    proc = run_lib(f'hj_cluster_dir "{d}" 1; printf "%s\\n" "${{HJ_EXEC[@]}}"',
                   {"HPCDASK_IMAGE": str(img)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["--bind", f"{img}:/opt/hpcdask/image.sif:ro", str(img)]


def test_all_in_one_starts_its_workers_with_the_scheduler():
    """The workers' srun starts right after the scheduler, before its file exists; only they get
    --with-scheduler (interface checked after the file); the worker jobs' workers do not."""
    body = re.search(r"^hj_all_in_one\(\) \{\n(.*?)^\}", LIB.read_text(), re.M | re.S).group(1)
    calls = [ln.strip() for ln in body.splitlines()
             if re.match(r"\s*(HJ_WITH_SCHEDULER=1 )?hj_(spawn|wait|launch|start)_", ln)]
    assert calls[:3] == ['hj_spawn_scheduler "$file"',
                         'HJ_WITH_SCHEDULER=1 hj_launch_workers "$file" "" "$nodes"',
                         'hj_wait_scheduler "$file"'], calls
    show = 'printf "%s\\n" "${HJ_WORKER_ARGV[*]}"'
    together = run_lib(f"HJ_EXEC=(x); HJ_WITH_SCHEDULER=1 hj_worker_argv F ''; {show}", {})
    alone = run_lib(f"HJ_EXEC=(x); hj_worker_argv F 1700000000; {show}", {})
    assert together.stdout.strip() == "x hpcdask worker --scheduler-file F --with-scheduler", \
        together.stderr
    assert alone.stdout.strip() == ("x hpcdask worker --scheduler-file F --lifetime auto "
                                    "--job-end 1700000000"), alone.stderr


def test_client_choice(tmp_path):
    script = tmp_path / "my.py"
    script.write_text("")
    # Replace the apptainer prefix by echo: what would run?
    snippet = ('HJ_EXEC=(echo); hj_start_client F "$@"; wait "$HJ_CLIENT"')
    wait = "--wait-workers 3 --wait-timeout 300s"
    cases = {("3",): f"hpcdask run --scheduler-file F {wait}",
             ("0",): "hpcdask run --scheduler-file F",
             ("3", "--workload", "smoke"): f"hpcdask run --scheduler-file F {wait} --workload smoke",
             ("3", str(script), "--arg", "1"):
                 f"hpcdask client --scheduler-file F {wait} -- {script} --arg 1",
             ("0", str(script)): f"hpcdask client --scheduler-file F -- {script}"}
    for args, want in cases.items():
        proc = subprocess.run(["bash", "-c", f'source "{LIB}"; {snippet}', "x", *args],
                              capture_output=True, text=True)
        assert proc.stdout.strip() == want, proc.stderr
    proc = subprocess.run(["bash", "-c", f'source "{LIB}"; {snippet}', "x", "3", "absent.py"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "script absent.py does not exist" in proc.stderr


def test_pbs_workers_go_through_an_env_file(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\nn3\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pbsdsh").write_text('#!/bin/sh\necho "pbsdsh $*" >>"$LOG"\n')
    (bindir / "pbsdsh").chmod(0o755)
    log = tmp_path / "log"
    proc = run_lib(f'hj_cluster_dir "{tmp_path}/c" 1; hj_pbsdsh_workers F 123 1; wait "$HJ_WORKERS"; '
                   f'cat "{tmp_path}/c/worker-env-77.pbs.sh"',
                   {"PATH": f"{bindir}:{os.environ['PATH']}", "PBS_NODEFILE": str(nodefile),
                    "PBS_JOBID": "77.pbs",
                    "LOG": str(log), "HPCDASK_IMAGE": "/img", "HPCDASK_NTHREADS": "4"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(log.read_text().split("\n")[:-1]) == [
        f"pbsdsh -n {i} -- /bin/bash {tmp_path}/c/worker-env-77.pbs.sh" for i in (0, 2, 4)]
    assert "export HPCDASK_NTHREADS=4" in proc.stdout
    assert proc.stdout.strip().endswith(
        "exec apptainer exec --bind " + str(tmp_path / "c") +
        " /img hpcdask worker --scheduler-file F --lifetime auto --job-end 123")
