"""Start the roles: scheduler, workers, and the client's connection, with hpcdask's checks.

Thin layers over distributed's ``Scheduler``, ``Nanny`` and ``Client``: hpcdask picks the
interface, TLS credentials, sizes and memory policy, writes the scheduler file, and refuses
any role whose environment differs from the scheduler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import dask.config
from distributed import Client, Nanny, Scheduler
from distributed.core import Status, rpc
from distributed.security import Security

from hpcdask import config, gpu, memory, netif, schedfile, security, shutdown, versions
from hpcdask.errors import BadInput, NotReady, Refused
from hpcdask.guard import IdentityGuard
from hpcdask.taskstream import TaskStream
from hpcdask.servers import NoHTTPScheduler, NoHTTPWorker

logger = logging.getLogger("hpcdask")


def warn_no_tls(role: str) -> None:
    click.secho(
        f"hpcdask: WARNING: {role} runs WITHOUT TLS (--no-tls): anyone who can reach its port "
        f"can run code as you. Use it only on a network nobody else shares.",
        fg="red", bold=True, err=True)


def dashboard_address(mode: str, host: str, port: int) -> str | None:
    if mode == "off":
        return None
    if mode == "loopback":
        return f"127.0.0.1:{port}"
    if mode == "interface":
        return f"{host}:{port}"
    raise BadInput(f"--dashboard {mode!r} is not one of loopback, interface, off; "
                   f"e.g. --dashboard loopback")


def tunnel_hint(mode: str, port: int) -> str:
    node = socket.gethostname()
    login = os.environ.get("SLURM_SUBMIT_HOST") or os.environ.get("PBS_O_HOST") or "LOGIN"
    if mode == "loopback":
        return (f"dashboard: http://localhost:{port}/status after: "
                f"ssh -N -L {port}:127.0.0.1:{port} -J {login} {node}")
    return f"dashboard: http://localhost:{port}/status after: ssh -N -L {port}:{node}:{port} {login}"


async def _until_signalled(stop: asyncio.Event, finished) -> str:
    """Wait for ``finished`` or SIGINT/SIGTERM (then distributed goes quiet: see shutdown.py)."""
    loop = asyncio.get_running_loop()
    got: list[str] = []

    def on_signal(sig: int) -> None:
        got.append(signal.Signals(sig).name)
        _ignore_signals()
        shutdown.quiet()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, asyncio.ensure_future(finished)],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        _ignore_signals()
    waiter.cancel()
    return got[0] if got else "finished"


def _ignore_signals() -> None:
    """Once a role stops, SIGINT/SIGTERM are ignored: the batch system signals every process of
    the step and the jobscript passes its own signal on, so a second one comes, and it changes
    nothing (SIGKILL at KillWait still ends a stuck role). It must also never reach asyncio's
    handler: when it lands while the loop closes (after its wakeup pipe, before its handlers),
    Python prints a BrokenPipeError traceback ("Exception ignored when trying to write to the
    signal wakeup fd"), seen at a Slurm time limit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


# --- scheduler ---------------------------------------------------------------------------------

def run_scheduler(scheduler_file: Path, interface: str | None, port: int | None,
                  dashboard: str | None, tls: bool, job_end: float | None = None,
                  until=None) -> None:
    """Serve until the scheduler closes or SIGINT/SIGTERM, or until the coroutine function
    ``until`` returns (its result says why); then the workers retire and the scheduler closes."""
    iface = interface or config.get("scheduler-interface") or config.get("interface")
    host = netif.address_of(iface)
    port = config.get("scheduler-port", port)
    netif.check_port_free(host, port, "--port")
    dmode = config.get("dashboard", dashboard)
    dport = config.get("dashboard-port")
    daddr = dashboard_address(dmode, host, dport)
    if daddr:
        dhost = daddr.rsplit(":", 1)[0]
        if netif.port_or_any(dhost, dport) != dport:
            daddr = f"{dhost}:0"  # taken (another user's dashboard?): a free one, said below
    made_folder = not Path(scheduler_file).expanduser().absolute().parent.exists()
    path, token = schedfile.claim(scheduler_file, tls)
    creds = None
    try:
        cluster_id = schedfile.job_id() or uuid.uuid4().hex[:8]
        if tls:
            end = job_end or float(os.environ.get("HPCDASK_JOB_END") or 0) or None
            margin = dask.utils.parse_timedelta(config.get("credentials-margin"))
            creds = security.create(path.parent, cluster_id, security.not_after(end, margin))
            sec = creds.security()
        else:
            warn_no_tls("the scheduler")
            sec = Security()
        asyncio.run(_serve_scheduler(path, token, host, port, dmode, daddr, dport, tls, sec,
                                     until))
    finally:
        # Only this scheduler's own files: its claim, and the credentials it made under it;
        # then the folder, if it made it and nothing else is in it.
        if schedfile.remove_if_ours(path, token) and creds is not None:
            security.remove(creds)
            if made_folder:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()


async def _serve_scheduler(path, token, host, port, dmode, daddr, dport, tls, sec,
                           until=None) -> None:
    guard = IdentityGuard()
    cls = Scheduler if daddr else NoHTTPScheduler  # off: no HTTP listener at all
    async with cls(host=host, port=port, protocol="tls" if tls else "tcp", security=sec,
                   dashboard=daddr is not None, dashboard_address=daddr, plugins=[guard]) as s:
        s.add_plugin(TaskStream(s))  # before any task: the one get_task_stream will find
        schedfile.write(path, s.identity(), token, tls)
        logger.info("hpcdask scheduler at %s, scheduler file %s, image %s", s.address, path,
                    guard.identity["image"])
        if daddr:
            if dport and s.http_server.port != dport:
                logger.info("hpcdask: dashboard port %s is taken (another cluster?); using %s",
                            dport, s.http_server.port)
            logger.info(tunnel_hint(dmode, s.http_server.port))
        finished = asyncio.ensure_future(s.finished())
        asked = asyncio.ensure_future(until()) if until else None
        ends = [finished, asked] if asked else [finished]
        why = await _until_signalled(asyncio.Event(), asyncio.wait(
            ends, return_when=asyncio.FIRST_COMPLETED))
        if asked and asked.done() and why == "finished" and s.status == Status.running:
            why = asked.result()
        for f in ends:
            f.cancel()
        if why != "finished":
            logger.info("hpcdask scheduler stopping (%s): retiring %d worker(s)", why,
                        len(s.workers))
            await retire_all(s)


async def retire_all(s: Scheduler, timeout: float = 30) -> None:
    """Orderly end: every nanny stops its worker (through the nanny's own stop queue, which
    distributed's worker processes expect), then the scheduler closes once all have left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        nannies = [ws.nanny for ws in s.workers.values() if ws.nanny]
        plain = [addr for addr, ws in s.workers.items() if not ws.nanny]
        if nannies:
            # Fire and forget (reply=False): a nanny closes its comm as it terminates, which
            # distributed's broadcast() would log as an ERROR for every worker.
            await asyncio.wait_for(asyncio.gather(*[_terminate(s, n) for n in nannies]), timeout)
        if plain:  # workers without a nanny close themselves (only they: the others are closing)
            await asyncio.wait_for(s.retire_workers(workers=plain, close_workers=True,
                                                    remove=False, stimulus_id="hpcdask-shutdown"),
                                   timeout)
        # Let each worker close its own stream, so nothing is cut mid-read.
        while s.workers and loop.time() < deadline:
            await asyncio.sleep(0.05)
    except asyncio.TimeoutError:
        logger.warning("hpcdask: workers did not stop within %ss; closing anyway", timeout)
    await s.close(reason="hpcdask-shutdown")


async def _terminate(s: Scheduler, nanny: str) -> None:
    # Seconds, not distributed's connect timeout: at a time limit or scancel the nanny may be gone
    # already, and Slurm's KillWait is short.
    try:
        await asyncio.wait_for(s.rpc(nanny).terminate(reply=False, reason="hpcdask-shutdown"), 3)
    except (OSError, asyncio.TimeoutError):  # already gone
        pass


# --- worker ------------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    scheduler_file: Path
    interface: str | None = None
    nthreads: int | None = None
    nworkers: int | None = None
    memory_limit: str | None = None
    local_directory: str | None = None
    memory_preset: str | None = None
    lifetime: str | None = None
    job_end: float | None = None
    name: str | None = None
    dashboard: str | None = None
    tls: bool = True
    gpus: bool | None = None
    with_scheduler: bool = False  # started with its scheduler: the interface checked after its file


def local_directory(given: str | None) -> str:
    """Worker scratch: given, configured, $TMPDIR, else /tmp; must be writable (never the image)."""
    d = given or config.get("local-directory") or os.environ.get("TMPDIR") or "/tmp"
    p = Path(d).expanduser()
    if not p.is_dir():
        raise BadInput(f"local directory {p} does not exist; create it or pick another with "
                       f"--local-directory (e.g. $TMPDIR or /tmp)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise BadInput(f"local directory {p} is not writable (a read-only image?); pick another "
                       f"with --local-directory (e.g. $TMPDIR or /tmp)")
    return str(p)


def connection(info: dict[str, Any], path: Path, tls: bool, role: str) -> Security:
    """The Security for talking to the scheduler in ``info`` (read from ``path``)."""
    address = info["address"]
    if address.startswith("tls://"):
        if not tls:
            raise BadInput(f"the scheduler at {address} uses TLS; drop --no-tls from the {role}")
        return security.load(path.parent).security()
    if tls:
        raise BadInput(f"the scheduler at {address} runs without TLS and hpcdask refuses plain "
                       f"connections; restart it without --no-tls (or pass --no-tls to the {role} "
                       f"too, knowingly)")
    warn_no_tls(f"the {role}")
    return Security()


async def scheduler_identity(address: str, sec: Security, role: str, path: Path | None,
                             timeout: float) -> dict[str, Any]:
    args = sec.get_connection_args(role)
    try:
        async with rpc(address, connection_args=args, timeout=timeout) as r:
            return await asyncio.wait_for(r.hpcdask_identity(), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        hint = schedfile.stale_hint(path) if path else f"the scheduler at {address} does not answer"
        raise BadInput(f"{hint} ({type(e).__name__})") from None


def scheduler_identity_of(scheduler_file: Path, tls: bool) -> dict[str, Any]:
    """The identity of the scheduler in ``scheduler_file`` (asked without registering)."""
    path = Path(scheduler_file).expanduser()
    info = schedfile.wait(path, dask.utils.parse_timedelta(config.get("scheduler-file-timeout")))
    sec = connection(info, path, tls, "client")
    timeout = dask.utils.parse_timedelta(config.get("connect-timeout"))
    return asyncio.run(scheduler_identity(info["address"], sec, "client", path, timeout))


def refuse_if_different(reference: dict[str, Any], mine: dict[str, Any], me: str) -> None:
    rows = versions.differences(reference, {me: mine})
    if rows:
        raise Refused(f"{me}'s environment differs from the scheduler's: "
                      f"{versions.summary(rows)}\n{versions.table(rows)}\n"
                      f"run every role from the same image (HPCDASK_IMAGE) or venv built from "
                      f"containers/requirements.lock")


def run_worker(spec: WorkerSpec) -> None:
    iface = config.get("interface", spec.interface)
    host = None if spec.with_scheduler else netif.address_of(iface)
    nworkers = config.get("nworkers", spec.nworkers)
    gpus = gpu.devices() if config.get("gpu", spec.gpus) else []
    if gpus:
        nworkers = len(gpus)  # one worker process per GPU
    alloc = memory.allocation()
    threads, mem = memory.worker_sizing(nworkers, config.get("nthreads", spec.nthreads),
                                        config.get("memory-limit", spec.memory_limit), alloc,
                                        **memory.reserves())
    blas = memory.blas_config(alloc.cpus, nworkers, threads)
    preset = memory.preset(config.get("memory-preset", spec.memory_preset))
    local_dir = local_directory(spec.local_directory)
    life = _lifetime(spec)
    path = Path(spec.scheduler_file).expanduser()
    timeout = dask.utils.parse_timedelta(config.get("scheduler-file-timeout"))
    info = schedfile.wait(path, timeout)
    if host is None:
        # Started with its scheduler: a wrong interface that both share fails once, in the
        # scheduler (which then never writes the file, and the job stops this worker).
        host = netif.address_of(iface)
    sec = connection(info, path, spec.tls, "worker")
    http = worker_http(config.get("dashboard", spec.dashboard))
    with dask.config.set({**preset, **blas}), scratch(local_dir) as d:
        asyncio.run(_serve_workers(info["address"], path, sec, host, nworkers, threads, mem,
                                   d, life, spec.name, http, gpus))


def worker_http(mode: str) -> dict[str, Any]:
    """Nanny arguments for the workers' HTTP endpoints: loopback only, or none at all (off).
    Workers never serve them on the interface, whatever the scheduler's dashboard does."""
    dashboard_address(mode, "", 0)  # refuses an unknown mode
    if mode == "off":
        return {"dashboard": False, "worker_class": NoHTTPWorker}
    return {"dashboard_address": "127.0.0.1:0"}


@contextlib.contextmanager
def scratch(parent: str):
    """A private folder of this process's workers inside ``parent`` (node-local $TMPDIR or /tmp),
    removed whole when they end: distributed leaves its workspace's lock files behind, and
    ``parent`` may be shared with other jobs and users."""
    d = tempfile.mkdtemp(prefix="hpcdask-", dir=parent)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _lifetime(spec: WorkerSpec) -> float | None:
    if spec.lifetime in (None, "", "none"):
        return None
    margin = dask.utils.parse_timedelta(config.get("lifetime-margin"))
    stagger = dask.utils.parse_timedelta(config.get("lifetime-stagger"))
    if spec.lifetime == "auto":
        end = spec.job_end or float(os.environ.get("HPCDASK_JOB_END") or 0) or None
        return memory.lifetime(end, margin, stagger)
    try:
        return dask.utils.parse_timedelta(spec.lifetime)
    except (ValueError, KeyError):
        raise BadInput(f"--lifetime '{spec.lifetime}' is not a duration; write it like 55m, "
                       f"3600s, or auto (from the job's end time)") from None


async def _serve_workers(address, path, sec, host, nworkers, threads, mem, local_dir, life,
                         name, http, gpus=()) -> None:
    timeout = dask.utils.parse_timedelta(config.get("connect-timeout"))
    me = f"worker {name or socket.gethostname()}"
    ref = await scheduler_identity(address, sec, "worker", path, timeout)
    refuse_if_different(ref, versions.identity(), me)
    base = name or f"{socket.gethostname()}-{os.getpid()}"
    extra = {"lifetime": life, "lifetime_restart": False} if life else {}
    if gpus and gpu.has_dask_cuda():
        from dask_cuda import CUDAWorker  # one nanny per GPU, CUDA_VISIBLE_DEVICES rotated

        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        cuda = CUDAWorker(address, host=host, nthreads=threads, name=base, memory_limit=mem,
                          security=sec, local_directory=local_dir, death_timeout=timeout,
                          preload=["hpcdask.shutdown", "hpcdask.nested"], **http, **extra)
        await cuda
        nannies = list(cuda.nannies)
    else:
        nannies = [Nanny(address, nthreads=threads, memory_limit=mem, host=host, security=sec,
                         local_directory=local_dir, name=base if nworkers == 1 else f"{base}-{i}",
                         death_timeout=timeout, preload=["hpcdask.shutdown", "hpcdask.nested"],
                         **_gpu_kwargs(i, gpus), **http, **extra)
                   for i in range(nworkers)]
        await asyncio.gather(*nannies)
    logger.info("hpcdask: %d worker(s) on %s joined %s: %d thread(s), %s each, image %s", nworkers,
                host, address, threads, dask.utils.format_bytes(mem), versions.image_label())
    finished = asyncio.gather(*[n.finished() for n in nannies])
    why = await _until_signalled(asyncio.Event(), finished)
    if why != "finished":
        logger.info("hpcdask: worker(s) on %s stopping (%s)", host, why)
        # Seconds: at a time limit Slurm's KillWait follows, and the scratch must go first.
        await asyncio.gather(*[n.close(timeout=3) for n in nannies], return_exceptions=True)


def _gpu_kwargs(i: int, gpus) -> dict[str, Any]:
    """Worker ``i`` of a GPU node: its own CUDA_VISIBLE_DEVICES order and a GPU resource."""
    if not gpus:
        return {}
    return {"env": {"CUDA_VISIBLE_DEVICES": gpu.visible_for(i, list(gpus))},
            "resources": {"GPU": 1}}


# --- client ------------------------------------------------------------------------------------

# How to wait longer for workers, as hpcdask run/client and the jobscripts offer it.
READY_HINT = "--wait-timeout; HPCDASK_READY_TIMEOUT in the jobscripts"


def connect(scheduler_file: Path | None = None, address: str | None = None,
            tls: bool = True, check: bool = True, wait_workers: int = 0,
            wait_timeout: float = 300.0, wait_hint: str = READY_HINT) -> Client:
    """A Client of the cluster in ``scheduler_file`` (or at ``address``), identity checked.

    With ``wait_workers`` it first waits until that many workers have joined (the jobscripts
    start the client together with the workers), so the identity check sees all of them."""
    timeout = dask.utils.parse_timedelta(config.get("connect-timeout"))
    path = None
    if scheduler_file:
        path = Path(scheduler_file).expanduser()
        info = schedfile.wait(path, dask.utils.parse_timedelta(config.get("scheduler-file-timeout")))
        address = info["address"]
        sec = connection(info, path, tls, "client")
    else:
        assert address
        if address.startswith("tls://"):
            raise BadInput(f"a TLS address needs the cluster's credentials: use --scheduler-file "
                           f"instead of --address {address}")
        if tls:
            raise BadInput(f"--address {address} is a plain connection and hpcdask refuses those; "
                           f"use --scheduler-file F (TLS), or add --no-tls knowingly")
        warn_no_tls("the client")
        sec = Security()
    try:
        client = Client(address, security=sec, timeout=timeout)
    except (OSError, asyncio.TimeoutError) as e:
        hint = schedfile.stale_hint(path) if path else f"the scheduler at {address} does not answer"
        raise BadInput(f"{hint} ({type(e).__name__})") from None
    except ImportError as e:  # how distributed's Client reports the guard's refusal
        raise Refused(str(e).removeprefix("hpcdask: ")) from None
    try:
        if wait_workers:
            wait_for_workers(client, wait_workers, wait_timeout, wait_hint)
        if check:
            check_cluster(client)
    except BaseException:
        client.close()
        raise
    return client


def wait_for_workers(client: Client, n: int, timeout: float, hint: str = READY_HINT) -> None:
    """Block until ``n`` workers have joined; then say so on stdout, with the Unix time (the
    jobscripts' and the tests' readiness record). ``hint`` names the setting to raise."""
    t0 = time.monotonic()
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        have = len(cluster_info(client)["workers"])
        raise NotReady(f"only {have} of {n} worker(s) joined within {timeout:g}s; see the "
                       f"worker output for why, or wait longer ({hint})") from None
    print(f"hpcdask: {n} worker(s) ready after {time.monotonic() - t0:.1f}s "
          f"(at {time.time():.3f})", flush=True)


def cluster_info(client: Client) -> dict[str, Any]:
    """The scheduler's identity with every worker, fetched now: ``Client.scheduler_info()``
    returns an attribute that the client's own periodic refresh (every
    ``distributed.client.scheduler-info-interval``, without workers) can overwrite between
    the fetch and the return, so it sometimes reports no workers at all."""
    return client.sync(client.scheduler.identity, n_workers=-1)


def cluster_reports(client: Client) -> dict[str, dict[str, Any]]:
    """versions.report() of the scheduler, every worker, and this client."""
    out = {"scheduler": client.run_on_scheduler(versions.report)}
    for addr, rep in sorted(client.run(versions.report).items()):
        out[f"worker {addr}"] = rep
    out["client"] = versions.report()
    return out


def check_cluster(client: Client) -> dict[str, dict[str, Any]]:
    """Refuse (raise Refused) when any worker or this client differs from the scheduler."""
    reports = cluster_reports(client)
    sched = reports.pop("scheduler")
    rows = versions.differences(sched, reports)
    if rows:
        raise Refused(f"the cluster's roles differ: {versions.summary(rows)}\n"
                      f"{versions.table(rows)}\nrun every role from the same image or lock")
    return {"scheduler": sched, **reports}


def local_cluster(n_workers: int | None = None, threads_per_worker: int | None = None,
                  tls: bool = True, memory_limit: str | None = None):
    """The embedded default: a LocalCluster sized to the machine, TLS on loopback; its workers'
    scratch (a private folder) is removed once it is gone, at the latest when Python exits."""
    from distributed import LocalCluster

    alloc = memory.allocation()
    n = n_workers or max(1, min(alloc.cpus, 8))
    threads = threads_per_worker or max(1, alloc.cpus // n)
    mem = memory.parse_bytes(memory_limit) if memory_limit else int(alloc.memory * 0.9) // n
    kwargs: dict[str, Any] = dict(n_workers=n, threads_per_worker=threads, memory_limit=mem,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  preload=["hpcdask.shutdown", "hpcdask.nested"],
                                  silence_logs=logging.WARNING)
    if tls:
        kwargs.update(security=Security.temporary(), protocol="tls://")
    else:
        warn_no_tls("the local cluster")
    d = tempfile.mkdtemp(prefix="hpcdask-", dir=local_directory(None))
    try:
        with dask.config.set(memory.blas_config(alloc.cpus, n, threads)):
            cluster = LocalCluster(local_directory=d, **kwargs)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    weakref.finalize(cluster, shutil.rmtree, d, True)
    return cluster
