"""The ``hpcdask`` command: one thin subcommand per role over the library, in the style of
distributed's ``dask scheduler`` / ``dask worker``: scheduler (:mod:`hpcdask.scheduler`), worker
(:mod:`hpcdask.worker`), client (:mod:`hpcdask.script`), run (:mod:`hpcdask.local` or a cluster),
mpi (:mod:`hpcdask.mpi`). The library raises hpcdask's own exceptions (:mod:`hpcdask.errors`);
only here do they become one line on stderr and an exit code (2 bad input, 3 refused, 1 else).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

import hpcdask
from hpcdask import checks, config, connect, files
from hpcdask.cli_image import image
from hpcdask.cli_options import (CONTEXT, _timeout, scheduler_file_option, tls_option,
                                 wait_options)
from hpcdask.errors import BadInput, HpcdaskError
from hpcdask.script import output_folder, run_script

def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    log = logging.getLogger("hpcdask")
    if not log.handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _OneLineErrors(click.Group):
    """Every error is one line on stderr: click's usage errors too (no usage block)."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            rv = super().main(args, prog_name or "hpcdask", standalone_mode=False, **extra)
        except HpcdaskError as e:
            click.echo(e.one_line(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            where = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
            click.echo(f"hpcdask: error: {e.format_message()}{where}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("hpcdask: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group("hpcdask", cls=_OneLineErrors, context_settings=CONTEXT)
@click.version_option(hpcdask.__version__, prog_name="hpcdask")
def main() -> None:
    """Containerised, reproducible Dask on HPC clusters.

    Every role runs from one image built from one lock; roles whose Python, packages or
    image differ from the scheduler's are refused. Settings: hpcdask.yaml, overridden by
    DASK_HPCDASK__KEY or HPCDASK_KEY environment variables.
    """
    _logging()
    _private_scratch()


def _private_scratch() -> None:
    """Every distributed server of this process (the scheduler's too) keeps its workspace in a
    private folder of node-local scratch ($TMPDIR, else /tmp), removed when the command ends:
    distributed's own default leaves lock files behind in a folder that jobs and users share."""
    import dask.config

    ctx = click.get_current_context()
    if ctx.resilient_parsing or "--help" in sys.argv or "-h" in sys.argv:
        return
    d = ctx.with_resource(files.scratch(files.local_directory(None)))
    dask.config.set({"temporary-directory": d})


@main.command(context_settings=CONTEXT)
@click.option("--workload", "-w", default=None, help="Workload to run (see --list); default: the configured one.")
@click.option("--list", "list_", is_flag=True, help="List the workloads and exit.")
@click.option("--size", type=click.Choice(["small", "medium", "large"]), default=None,
              help="Data size (default from config: small).")
@click.option("--seed", type=int, default=0, help="Random seed of the generated data and models.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder, refused if it holds an earlier run (default: hpcdask-output/"
                   "WORKLOAD-SIZE[-jobID], or -2, -3, ... after it when that holds one).")
@scheduler_file_option()
@click.option("--address", default=None, help="Scheduler address (plain tcp:// only with --no-tls).")
@click.option("--n-workers", type=click.IntRange(min=1), default=None,
              help="LocalCluster workers (default: sized to the machine).")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="LocalCluster threads per worker.")
@click.option("--memory-limit", default=None,
              help="LocalCluster memory per worker, e.g. 2GiB (default: 90% of the machine / workers).")
@wait_options
@tls_option
def run(workload, list_, size, seed, output, scheduler_file, address, n_workers,
        threads_per_worker, memory_limit, wait_workers, wait_timeout, tls) -> None:
    """Run a workload (the main job): on a LocalCluster, or on the cluster given.

    Writes metrics.json (scores, baseline, timings, versions of every role, cluster
    shape) and Dask's performance report into the output folder.
    """
    from hpcdask import workloads

    if list_:
        for name, description in workloads.describe().items():
            click.echo(f"{name:12s} {description}")
        return
    name = workloads.resolve(workload or config.get("workload"))
    if scheduler_file and address:
        raise BadInput("give either --scheduler-file or --address, not both")
    if wait_workers and not (scheduler_file or address):
        raise BadInput("--wait-workers waits for a cluster's workers; give --scheduler-file F too "
                       "(a LocalCluster has its workers at once)")
    wait_s = _timeout(wait_timeout, "--wait-timeout")
    size = config.get("size", size)
    if memory_limit:  # bad input before a new output folder is made
        from hpcdask.memory import parse_bytes
        parse_bytes(memory_limit)
    output = output or output_folder(f"{name}-{size}")
    from hpcdask.local import run_workload

    path = run_workload(name, size, seed, output, scheduler_file, address, tls,
                        wait_workers, wait_s, n_workers, threads_per_worker, memory_limit)
    click.echo(f"metrics: {path}")


@main.command(context_settings=CONTEXT)
@scheduler_file_option("Where to write the scheduler file; its folder gets the TLS credentials (0700).",
                       required=True)
@click.option("--interface", default=None,
              help="Interface to bind (default: hpcdask.scheduler-interface, else hpcdask.interface = ib0).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=None,
              help="Port (default 0: a free one, published in the scheduler file).")
@click.option("--dashboard", type=click.Choice(["loopback", "interface", "off"]), default=None,
              help="Where the dashboard listens (default: loopback).")
@click.option("--job-end", type=float, default=None,
              help="The job's end time (Unix seconds): the credentials expire soon after it "
                   "(default $HPCDASK_JOB_END; none: 30 days).")
@tls_option
def scheduler(scheduler_file, interface, port, dashboard, job_end, tls) -> None:
    """Start a scheduler on INTERFACE and write the scheduler file."""
    from hpcdask.scheduler import run_scheduler

    run_scheduler(scheduler_file, interface, port, dashboard, tls, job_end)


@main.command(context_settings=CONTEXT)
@scheduler_file_option("The cluster's scheduler file (waited for up to "
                       "hpcdask.scheduler-file-timeout).", required=True)
@click.option("--interface", default=None, help="Interface to bind (default: hpcdask.interface = ib0).")
@click.option("--nthreads", type=int, default=None, help="Threads per worker process (default: from the allocation).")
@click.option("--nworkers", type=int, default=None, help="Worker processes on this node (default 1).")
@click.option("--memory-limit", default=None, help="Memory per worker process, e.g. 4GiB (default: allocation / nworkers).")
@click.option("--local-directory", default=None, help="Scratch folder (default: $TMPDIR, else /tmp).")
@click.option("--memory-preset", default=None, help="default, or no-local-storage (no spilling; pause 0.80, terminate 0.95).")
@click.option("--lifetime", default=None, help="Retire after this long (e.g. 55m), or auto: before the job's end time.")
@click.option("--job-end", type=float, default=None, help="The job's end time (Unix seconds), for --lifetime auto.")
@click.option("--name", default=None, help="Worker name (default: host-pid).")
@click.option("--dashboard", type=click.Choice(["loopback", "interface", "off"]), default=None,
              help="The workers' HTTP endpoints: off (none), else on loopback (default: "
                   "hpcdask.dashboard).")
@click.option("--gpus/--no-gpus", default=None,
              help="One worker process per GPU of this node (CUDA_VISIBLE_DEVICES each; dask-cuda's "
                   "worker when installed); default: hpcdask.gpu (HPCDASK_GPU).")
@click.option("--with-scheduler", is_flag=True, default=False,
              help="Started together with its scheduler (the all-in-one job): look at the "
                   "interface only once the scheduler file exists, so a wrong interface that "
                   "both share is reported once, by the scheduler.")
@tls_option
def worker(scheduler_file, interface, nthreads, nworkers, memory_limit, local_directory,
           memory_preset, lifetime, job_end, name, dashboard, gpus, with_scheduler, tls) -> None:
    """Start worker process(es) on this node that join the cluster in SCHEDULER_FILE."""
    from hpcdask.worker import WorkerSpec, run_worker

    run_worker(WorkerSpec(
        scheduler_file=scheduler_file, interface=interface, nthreads=nthreads,
        nworkers=nworkers, memory_limit=memory_limit, local_directory=local_directory,
        memory_preset=memory_preset, lifetime=lifetime, job_end=job_end, name=name,
        dashboard=dashboard, tls=tls, gpus=gpus, with_scheduler=with_scheduler))


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@scheduler_file_option("The cluster's scheduler file.", required=True)
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where provenance.json goes (default: hpcdask-output/SCRIPT[-jobID], or -2, -3, ... "
                   "after it when that holds an earlier run).")
@wait_options
@tls_option
def client(script, args, scheduler_file, output, wait_workers, wait_timeout, tls) -> None:
    """Run a Python SCRIPT with a Client already connected (distributed.get_client())."""
    if not script.is_file():
        raise BadInput(f"script {script} does not exist; give the path of your Python script, "
                       f"e.g. hpcdask client ./my_analysis.py --scheduler-file F")
    run_script(script, args, scheduler_file, output, tls, wait_workers,
               _timeout(wait_timeout, "--wait-timeout"))


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@scheduler_file_option("Where rank 0 writes the scheduler file; its folder gets the TLS credentials.",
                       required=True)
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the client rank writes provenance.json (default: hpcdask-output/SCRIPT[-jobID]).")
@tls_option
def mpi(script, args, scheduler_file, output, tls) -> None:
    """dask-mpi's layout, one MPI rank each: rank 0 the scheduler, rank 1 runs SCRIPT with a
    connected Client, the other ranks are workers (srun --mpi=pmi2 ... hpcdask mpi SCRIPT)."""
    from hpcdask import mpi as mpi_

    sys.exit(mpi_.run(script, args, scheduler_file, output, tls))


@main.command("wait", context_settings=CONTEXT)
@scheduler_file_option("The cluster's scheduler file (waited for up to "
                       "hpcdask.scheduler-file-timeout).", required=True)
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=1,
              help="Return once this many workers are registered.")
@click.option("--timeout", default="300s", help="Give up after this long (exit 1).")
@tls_option
def wait_(scheduler_file, n_workers, timeout, tls) -> None:
    """Wait until N workers have joined the cluster: the jobscripts' readiness check."""
    with connect.connect(scheduler_file, tls=tls, check=False, wait_workers=n_workers,
                        wait_timeout=_timeout(timeout, "--timeout"),
                        wait_hint="--timeout; HPCDASK_READY_TIMEOUT in the jobscripts"):
        pass


@main.command("versions", context_settings=CONTEXT)
@scheduler_file_option()
@click.option("--lock", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Check this environment against a lock file instead (exit 1 on any difference).")
@click.option("--against", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check the cluster (or this environment) against an earlier run's provenance.json.")
@click.option("--all", "show_all", is_flag=True,
              help="Show every package, not only the differences (without a cluster: every Debian package).")
@tls_option
def versions_(scheduler_file, lock, against, show_all, tls) -> None:
    """Python, packages and image of every role; exit 1 on any mismatch."""
    if against:
        lines = checks.against(against, scheduler_file, tls)
    elif lock:
        lines = checks.lock(lock)
    elif scheduler_file:
        lines = checks.cluster(scheduler_file, tls, show_all)
    else:
        lines = checks.this_environment(show_all)
    failed = False
    for line, err in lines:
        click.echo(line, err=err)
        failed = failed or err
    if failed:
        raise click.exceptions.Exit(1)


@main.command(context_settings=CONTEXT)
@scheduler_file_option("The cluster's scheduler file; the token goes into its folder (0600).",
                       required=True)
@click.option("--port", type=click.IntRange(min=0, max=65535), default=None,
              help="Port on this node's loopback (default: hpcdask.jupyter-port = 8888; 0: a free one).")
@click.option("--root-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="The lab's file browser root (default: the current folder).")
@click.option("--ip", default=None,
              help="Address or host name to listen on (default: hpcdask.jupyter-ip = 127.0.0.1; "
                   "behind Open OnDemand: the node's name, $host).")
@click.option("--base-url", default=None,
              help="The lab's URL prefix (default: hpcdask.jupyter-base-url = /; behind Open "
                   "OnDemand: /node/$host/$port/).")
def jupyter(scheduler_file, port, root_dir, ip, base_url) -> None:
    """JupyterLab on this node's loopback next to the cluster; prints the ssh -L line.

    In a notebook, hpcdask.client() returns a Client of the cluster (TLS, identity checked).
    Behind Open OnDemand it listens on the node's name under /node/HOST/PORT/ with the token
    OnDemand made (JUPYTER_TOKEN): see ondemand/.
    """
    from hpcdask import jupyter as lab

    lab.serve(scheduler_file, port, root_dir, ip, base_url)


@main.command(context_settings=CONTEXT)
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def clean(folders, dry_run) -> None:
    """Remove stale per-cluster folders (credentials, scheduler files) left by ended clusters.

    Looks at every folder in hpcdask.shared-dir, or at the FOLDERS given; never touches
    another user's folder or a live cluster's (refusing, exit 2, when one is named).
    """
    from hpcdask import clean as cleaning

    for line in cleaning.run(folders, dry_run):
        click.echo(line)


@main.command(context_settings=CONTEXT)
@click.option("--image", required=True, type=click.Path(dir_okay=True, path_type=Path),
              help="The image the module runs (\"$HPCDASK_IMAGE\").")
@click.option("--prefix", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The module folder to write in (then: module use PREFIX).")
@click.option("--name", default="hpcdask", show_default=True, help="The module's name.")
@click.option("--version", "version_", default=None,
              help="The module's version (default: hpcdask's version and the SIF's ID).")
def module(image, prefix, name, version_) -> None:
    """An Lmod module for the image: python, hpcdask, dask and jupyter run inside it.

    Then: module use PREFIX && module load hpcdask. Run it from the image, in the image's
    folder: apptainer exec dask.sif hpcdask module --image dask.sif --prefix ~/modulefiles
    """
    from hpcdask import module as lmod

    made = lmod.write(image, prefix, name, version_)
    click.echo(f"{made.modulefile}: module {made.name}/{made.version} running {made.bin}/run; "
               f"load it with: module use {made.modulefile.parent.parent} && module load "
               f"{made.name}")


@main.command(context_settings=CONTEXT)
@click.option("--interface", default=None, help="Interface to check (default: hpcdask.interface).")
@scheduler_file_option()
@click.option("--memory-limit", default=None, help="Memory per worker to check.")
@click.option("--nworkers", type=int, default=None, help="Worker processes per node to check.")
@click.option("--local-directory", default=None, help="Scratch folder to check.")
def preflight(interface, scheduler_file, memory_limit, nworkers, local_directory) -> None:
    """Check this node's settings before a job: one line per check, exit 2 on the first failure."""
    for line in checks.preflight(interface, scheduler_file, memory_limit, nworkers, local_directory):
        click.echo(line)


main.add_command(image)
