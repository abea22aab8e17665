"""The ``hpcdask`` command: one subcommand per role, in the style of ``dask scheduler``."""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
from pathlib import Path

import click

import hpcdask
from hpcdask import config, launch, project, provenance, shutdown, versions
from hpcdask.errors import BadInput, Refused

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}

scheduler_file_option = click.option(
    "--scheduler-file", type=click.Path(dir_okay=False, path_type=Path),
    help="The cluster's scheduler file on the shared filesystem; its folder holds the TLS credentials.")
tls_option = click.option("--tls/--no-tls", default=True,
                          help="TLS with the cluster's credentials; --no-tls only knowingly.")


def wait_options(f):
    """--wait-workers/--wait-timeout: start a client together with the workers, and let it wait."""
    f = click.option("--wait-timeout", default="300s", show_default=True,
                     help="How long --wait-workers waits (exit 1 after it).")(f)
    return click.option("--wait-workers", type=click.IntRange(min=0), default=0,
                        help="First wait until this many workers have joined (0: do not wait).")(f)


def _timeout(value: str, option: str) -> float:
    import dask.utils

    try:
        return dask.utils.parse_timedelta(value)
    except (ValueError, KeyError):
        raise BadInput(f"{option} {value!r} is not a duration; give e.g. {option} 300s or 10m") from None


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
        except (BadInput, Refused) as e:
            e.show()
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
    d = ctx.with_resource(launch.scratch(launch.local_directory(None)))
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
@scheduler_file_option
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
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    if memory_limit:
        from hpcdask.memory import parse_bytes
        parse_bytes(memory_limit)
    # A named --output holding an earlier run is refused; the default is a new folder each run.
    if output is None:
        output = provenance.run_folder(
            Path(config.get("output")) / f"{name}-{size}{f'-job{job}' if job else ''}")
    workloads.check_output(output)
    if scheduler_file or address:
        from hpcdask import compat
        compat.apply()  # imports dask-ml (~2 s): now, while the workers start, not after they have
    with provenance.Recorder(output, provenance.command_line()) as record, \
            _terminate_cleanly() as term:
        if scheduler_file or address:
            with launch.connect(scheduler_file, address, tls=tls, check=False,
                                wait_workers=wait_workers, wait_timeout=wait_s) as client:
                record.cluster(client)
                path = term.run(client, workloads.execute, client, name, size, seed, output)
        else:
            with launch.local_cluster(n_workers, threads_per_worker, tls=tls,
                                      memory_limit=memory_limit) as cluster, \
                    launch.Client(cluster) as client:
                record.cluster(client)
                path = term.run(client, workloads.execute, client, name, size, seed, output,
                                local=True)
    click.echo(f"metrics: {path}")


class _Terminated(BaseException):
    pass


class _terminate_cleanly:
    """SIGTERM (Slurm's time limit) becomes an orderly stop with one line and exit code 143."""

    MESSAGE = ("hpcdask: interrupted by SIGTERM (the job's time limit?); no results were written "
               "(provenance.json records the interruption): rerun with more time (sbatch --time) "
               "or --size small")

    def __enter__(self):
        self.fired = False

        def handler(signum, frame):
            # Once: a batch system signals every process of the step, and the runner and the
            # jobscript pass it on too. The line first: KillWait may not leave time for more.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.fired = True
            shutdown.quiet()
            click.echo(self.MESSAGE, err=True)
            raise _Terminated()
        self._old = signal.signal(signal.SIGTERM, handler)
        return self

    @staticmethod
    def run(client, fn, *args, local: bool = False):
        """``fn(*args)``; interrupted, a LocalCluster of ours (which got no signal itself) goes
        quiet before it is closed under its running tasks."""
        try:
            return fn(*args)
        except _Terminated:
            if local:
                shutdown.quiet_cluster(client)
            raise

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._old)
        # Whatever the unwinding raised after the signal (a cluster going away under a context
        # manager's exit), the outcome is the signal's: exit 143, the one line already printed.
        if exc_type is _Terminated or (self.fired and exc_type is not None
                                       and not issubclass(exc_type, SystemExit)):
            sys.exit(143)
        return False


@main.command(context_settings=CONTEXT)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the scheduler file; its folder gets the TLS credentials (0700).")
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
    launch.run_scheduler(scheduler_file, interface, port, dashboard, tls, job_end)


@main.command(context_settings=CONTEXT)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's scheduler file (waited for up to hpcdask.scheduler-file-timeout).")
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
    launch.run_worker(launch.WorkerSpec(
        scheduler_file=scheduler_file, interface=interface, nthreads=nthreads,
        nworkers=nworkers, memory_limit=memory_limit, local_directory=local_directory,
        memory_preset=memory_preset, lifetime=lifetime, job_end=job_end, name=name,
        dashboard=dashboard, tls=tls, gpus=gpus, with_scheduler=with_scheduler))


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's scheduler file.")
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


def run_script(script: Path, args, scheduler_file: Path, output: Path | None, tls: bool,
               wait_workers: int = 0, wait_timeout: float = 300.0,
               wait_hint: str = launch.READY_HINT) -> None:
    """SCRIPT as ``__main__`` with a connected, identity-checked Client, provenance.json
    written: ``hpcdask client``'s body, also the client rank of ``hpcdask mpi``."""
    from hpcdask import compat

    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    if output is None:  # a new folder each run (provenance.run_folder); a named one as given
        output = provenance.run_folder(
            Path(config.get("output")) / f"{script.stem}{f'-job{job}' if job else ''}")
    # Not dask-ml's import (2-4 s in the image) before the script's first line: the patch it
    # needs comes when the script imports dask-ml, if it ever does.
    compat.apply(defer=True)
    folder = project.script_folder(script)
    project.put_first(str(folder))  # as `python SCRIPT`: its helper modules import
    with provenance.Recorder(output, provenance.command_line()) as record, \
            _terminate_cleanly(), launch.connect(scheduler_file, tls=tls, wait_workers=wait_workers,
                                                 wait_timeout=wait_timeout,
                                                 wait_hint=wait_hint) as c:
        record.cluster(c)
        project.share(c, folder)  # and on every worker, from the shared filesystem
        sys.argv = [str(script), *args]
        with c.as_current(), compat.session(c, defer=True):  # dask-ml works in the script too
            runpy.run_path(str(script), run_name="__main__")


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where rank 0 writes the scheduler file; its folder gets the TLS credentials.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the client rank writes provenance.json (default: hpcdask-output/SCRIPT[-jobID]).")
@tls_option
def mpi(script, args, scheduler_file, output, tls) -> None:
    """dask-mpi's layout, one MPI rank each: rank 0 the scheduler, rank 1 runs SCRIPT with a
    connected Client, the other ranks are workers (srun --mpi=pmi2 ... hpcdask mpi SCRIPT)."""
    from hpcdask import mpi as mpi_

    sys.exit(mpi_.run(script, args, scheduler_file, output, tls))


@main.command("wait", context_settings=CONTEXT)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's scheduler file (waited for up to hpcdask.scheduler-file-timeout).")
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=1,
              help="Return once this many workers are registered.")
@click.option("--timeout", default="300s", help="Give up after this long (exit 1).")
@tls_option
def wait_(scheduler_file, n_workers, timeout, tls) -> None:
    """Wait until N workers have joined the cluster: the jobscripts' readiness check."""
    with launch.connect(scheduler_file, tls=tls, check=False, wait_workers=n_workers,
                        wait_timeout=_timeout(timeout, "--timeout"),
                        wait_hint="--timeout; HPCDASK_READY_TIMEOUT in the jobscripts"):
        pass


@main.command("versions", context_settings=CONTEXT)
@scheduler_file_option
@click.option("--lock", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Check this environment against a lock file instead (exit 1 on any difference).")
@click.option("--against", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check the cluster (or this environment) against an earlier run's provenance.json.")
@click.option("--all", "show_all", is_flag=True, help="Show every package, not only the differences.")
@tls_option
def versions_(scheduler_file, lock, against, show_all, tls) -> None:
    """Python, packages and image of every role; exit 1 on any mismatch."""
    if against:
        _versions_against(against, scheduler_file, tls)
        return
    if lock:
        diffs = versions.lock_differences(lock)
        for line in diffs:
            click.echo(f"lock mismatch: {line}", err=True)
        if diffs:
            raise click.exceptions.Exit(1)
        click.echo(f"installed set equals {lock} ({len(versions.read_lock(lock))} packages); "
                   f"image {versions.image_label()}")
        return
    if not scheduler_file:
        ident = versions.identity()
        click.echo(f"python {ident['python']}  image {ident['image']}")
        for name in versions.KEY_PACKAGES:
            click.echo(f"{name} {ident['packages'].get(name, '-')}")
        return
    sched = launch.scheduler_identity_of(scheduler_file, tls)
    rows = versions.differences(sched, {"client": versions.report()})
    if not rows:  # the scheduler refuses a differing client, so compare with it first
        with launch.connect(scheduler_file, tls=tls, check=False) as c:
            reports = launch.cluster_reports(c)
        sched = reports.pop("scheduler")
        rows = versions.differences(sched, reports)
    else:
        reports = {"client": versions.report()}
    if show_all or not rows:
        keys = ["python", "image", *versions.KEY_PACKAGES]
        shown = [(k, versions._flat(sched).get(k, "-"),
                  {r: versions._flat(v).get(k, "-") for r, v in reports.items()}) for k in keys]
        click.echo(versions.table(shown))
    if rows:
        click.echo(f"MISMATCH: {versions.summary(rows)}", err=True)
        click.echo(versions.table(rows), err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"all {len(reports) + 1} roles identical ({len(sched['packages'])} packages)")


def _versions_against(path: Path, scheduler_file: Path | None, tls: bool) -> None:
    old = provenance.load(path)
    if scheduler_file:
        with launch.connect(scheduler_file, tls=tls, check=False) as c:
            now = launch.cluster_reports(c)
    else:
        now = {"this environment": versions.report()}
    rows = provenance.against(old, now)
    ref = provenance.reference(old)
    if rows:
        click.echo(f"DIFFERENT from {path} (run of {old.get('started', '?')}): "
                   f"{versions.summary(rows)}", err=True)
        click.echo(versions.table(rows, ref_name="recorded"), err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"same as {path}: {len(now)} role(s), python {ref['python']}, image {ref.get('image')}, "
               f"{len(ref['packages'])} packages")


@main.command(context_settings=CONTEXT)
@click.option("--scheduler-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The cluster's scheduler file; the token goes into its folder (0600).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=None,
              help="Port on this node's loopback (default: hpcdask.jupyter-port = 8888; 0: a free one).")
@click.option("--root-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="The lab's file browser root (default: the current folder).")
def jupyter(scheduler_file, port, root_dir) -> None:
    """JupyterLab on this node's loopback next to the cluster; prints the ssh -L line.

    In a notebook, hpcdask.client() returns a Client of the cluster (TLS, identity checked).
    """
    from hpcdask import jupyter as lab

    lab.serve(scheduler_file, port, root_dir)


@main.command(context_settings=CONTEXT)
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def clean(folders, dry_run) -> None:
    """Remove stale per-cluster folders (credentials, scheduler files) left by ended clusters.

    Looks at every folder in hpcdask.shared-dir, or at the FOLDERS given; never touches
    another user's folder or a live cluster's (refusing, exit 2, when one is named).
    """
    from hpcdask import clean as cleaning

    if folders:
        found = []
        for f in folders:
            if not f.is_dir():
                raise BadInput(f"{f} is not a folder; give a cluster folder, e.g. "
                               f"{config.get('shared-dir')}/JOBID")
            found.append(cleaning.judge(f.expanduser().absolute()))
        refused = [f for f in found if f.state != "stale"]
        if refused:
            f = refused[0]
            raise BadInput(f"refusing to remove {f.path}: {f.state}, {f.why}")
    else:
        found = cleaning.survey(Path(config.get("shared-dir")).expanduser())
    for f in found:
        if f.state != "stale":
            click.echo(f"kept {f.path}: {f.state}: {f.why}")
        elif dry_run:
            click.echo(f"stale {f.path}: {f.why} (not removed: --dry-run)")
        else:
            cleaning.remove(f)
            click.echo(f"removed {f.path}: {f.why}")
    if not found:
        click.echo("no cluster folders")


@main.command(context_settings=CONTEXT)
@click.option("--interface", default=None, help="Interface to check (default: hpcdask.interface).")
@scheduler_file_option
@click.option("--memory-limit", default=None, help="Memory per worker to check.")
@click.option("--nworkers", type=int, default=None, help="Worker processes per node to check.")
@click.option("--local-directory", default=None, help="Scratch folder to check.")
def preflight(interface, scheduler_file, memory_limit, nworkers, local_directory) -> None:
    """Check this node's settings before a job: one line per check, exit 2 on the first failure."""
    from hpcdask import memory, netif
    from hpcdask.files import private_dir

    iface = config.get("interface", interface)
    click.echo(f"ok interface {iface}: {netif.address_of(iface)}")
    if scheduler_file:
        folder = private_dir(Path(scheduler_file).expanduser().absolute().parent,
                             what="scheduler file folder")
        click.echo(f"ok scheduler file folder {folder}: private and writable")
    alloc = memory.allocation()
    threads, mem = memory.worker_sizing(config.get("nworkers", nworkers), None,
                                        config.get("memory-limit", memory_limit), alloc,
                                        **memory.reserves())
    if mem > alloc.memory:
        raise BadInput(f"memory limit {mem} B per worker exceeds this node's allocation "
                       f"({alloc.memory} B from {alloc.source}); lower --memory-limit")
    click.echo(f"ok sizing from {alloc.source}: {threads} thread(s), {mem // 2**20} MiB per worker")
    click.echo(f"ok local directory {launch.local_directory(local_directory)}: writable")
    click.echo(f"ok image {versions.image_label()}")
