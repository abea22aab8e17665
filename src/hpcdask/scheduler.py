"""The scheduler role: ``hpcdask scheduler`` (and rank 0 of ``hpcdask mpi``).

A thin layer over distributed's ``Scheduler``: hpcdask picks the interface, makes the
per-cluster TLS credentials, runs the identity guard, writes the scheduler file, and at the end
(a signal, or the caller's ``until``) retires the workers in order before it closes. At the
batch system's warning signal it first tells the clients that the cluster is ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path

import dask.utils
from distributed import Scheduler
from distributed.comm import Comm, parse_address, registry
from distributed.core import Status, send_recv
from distributed.security import Security

from hpcdask import batch, config, drain, netif, schedfile, security, servers, signals
from hpcdask.guard import IdentityGuard
from hpcdask.servers import NoHTTPScheduler
from hpcdask.taskstream import TaskStream

logger = logging.getLogger("hpcdask")


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
    daddr = servers.dashboard_address(dmode, host, dport)
    if daddr:
        dhost = daddr.rsplit(":", 1)[0]
        if netif.port_or_any(dhost, dport) != dport:
            daddr = f"{dhost}:0"  # taken (another user's dashboard?): a free one, said below
    made_folder = not Path(scheduler_file).expanduser().absolute().parent.exists()
    path, token = schedfile.claim(scheduler_file, tls)
    creds = None
    try:
        cluster_id = batch.job_id() or uuid.uuid4().hex[:8]
        if tls:
            end = batch.job_end(job_end)
            margin = dask.utils.parse_timedelta(config.get("credentials-margin"))
            creds = security.create(path.parent, cluster_id, security.not_after(end, margin))
            sec = creds.security()
        else:
            security.warn_no_tls("the scheduler")
            sec = Security()
        asyncio.run(_serve_scheduler(path, token, host, port, dmode, daddr, dport, tls, sec,
                                     until))
    finally:
        # Only this scheduler's own files: its claim, and the credentials it made under it;
        # then the folder, if it made it and nothing else is in it.
        if schedfile.remove_if_ours(path, token):
            if creds is not None:
                security.remove(creds)
            schedfile.release(path, token)
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
        schedfile.write(path, s.identity(), token, tls,
                        daddr.rsplit(":", 1)[0] if daddr else None)
        logger.info("hpcdask scheduler at %s, scheduler file %s, image %s", s.address, path,
                    guard.identity["image"])
        if daddr:
            if dport and s.http_server.port != dport:
                logger.info("hpcdask: dashboard port %s is taken (another cluster?); using %s",
                            dport, s.http_server.port)
            logger.info(servers.tunnel_hint(dmode, s.http_server.port))
        finished = asyncio.ensure_future(s.finished())
        asked = asyncio.ensure_future(until()) if until else None
        ends = [finished, asked] if asked else [finished]
        why = await signals.until_signalled(asyncio.Event(), asyncio.wait(
            ends, return_when=asyncio.FIRST_COMPLETED))
        if asked and asked.done() and why == "finished" and s.status == Status.running:
            why = asked.result()
        for f in ends:
            f.cancel()
        if why != "finished":
            if why == signals.warning_signal().name:
                await end_clients(s, f"its scheduler's job got {why} (its end is near)")
            logger.info("hpcdask scheduler stopping (%s): retiring %d worker(s)", why,
                        len(s.workers))
            await retire_all(s)


async def end_clients(s: Scheduler, why: str) -> None:
    """Tell every client that the cluster is ending (hpcdask's clients stop in order: one line,
    exit 143, nothing written), and give them until ``hpcdask.drain-timeout`` to leave."""
    logger.info("hpcdask scheduler: telling %d client(s) that the cluster is ending", _clients(s))
    # A client may have gone already, its comm closed before the scheduler removed it: Grid
    # Engine's -notify signals every process of the job at once, the client too. Sending to it
    # would log a CRITICAL traceback (distributed's send_all); unsubscribed, it gets nothing.
    for client, comm in list(s.client_comms.items()):
        if comm.closed():
            s.unsubscribe_topic(signals.ENDING_TOPIC, client)
    s.log_event(signals.ENDING_TOPIC, {"why": why})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain.timeout()
    while _clients(s) and loop.time() < deadline:
        await asyncio.sleep(0.1)


def _clients(s: Scheduler) -> int:
    return sum(1 for c in s.clients if c != "fire-and-forget")


async def retire_all(s: Scheduler, timeout: float = 30) -> None:
    """Orderly end: every nanny stops its worker (through the nanny's own stop queue, which
    distributed's worker processes expect), then the scheduler closes once all have left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Also the nannies whose worker left (killed for memory, being restarted): none may start a
    # worker again, and the credentials stay until every one of them has gone.
    guards = [g for g in s.plugins.values() if isinstance(g, IdentityGuard)]
    known = set().union(*[g.nannies for g in guards])
    restarting = set().union(*[g.restarting for g in guards])
    try:
        nannies = sorted({ws.nanny for ws in s.workers.values() if ws.nanny} | known)
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
        await asyncio.wait_for(_gone(s, nannies, restarting), max(0.1, deadline - loop.time()))
    except asyncio.TimeoutError:
        logger.warning("hpcdask: workers did not stop within %ss; closing anyway", timeout)
    await s.close(reason="hpcdask-shutdown")


async def _gone(s: Scheduler, nannies: list[str], restarting: set[str] = frozenset()) -> None:
    """Until no nanny answers any more: it refuses (stopped), or did not answer three times in a
    row (its node is gone). One busy restarting its worker still answers, if slowly. All are
    asked at once: a gone node costs its 2 s timeouts once, not once per nanny (compose's stopped
    containers, a time limit's short grace).

    A nanny stops listening before it stops the worker process it may be starting (after its
    worker died), which reads the credential files the scheduler removes once this returns: one
    of ``restarting`` that refuses is asked again, 2 s apart, three times (as a silent one)."""
    missed = dict.fromkeys(nannies, 0)

    async def ask(nanny: str) -> int:
        try:
            comm = await _connect_once(s, nanny, 2)
        except asyncio.TimeoutError:
            return missed[nanny] + 1
        except OSError:  # refused: it has stopped (or is stopping the worker it starts)
            if nanny in restarting:
                await asyncio.sleep(2)
                return missed[nanny] + 1
            return 3
        try:
            await asyncio.wait_for(send_recv(comm, op="identity"), 2)
            return 0
        except asyncio.TimeoutError:
            return missed[nanny] + 1
        except Exception:  # noqa: BLE001 - closed: it is stopping
            return 3
        finally:
            comm.abort()

    while missed:
        answers = await asyncio.gather(*[ask(n) for n in missed])
        missed = {n: k for n, k in zip(missed, answers) if k < 3}
        if missed:
            await asyncio.sleep(0.2)


async def _terminate(s: Scheduler, nanny: str) -> None:
    # Seconds, not distributed's connect timeout: at a time limit or scancel the nanny may be gone
    # already, and Slurm's KillWait is short.
    try:
        comm = await _connect_once(s, nanny, 3)
    except (OSError, asyncio.TimeoutError):  # already gone
        return
    try:
        await asyncio.wait_for(comm.write({"op": "terminate", "reply": False,
                                           "reason": "hpcdask-shutdown"}), 3)
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        await comm.close()


async def _connect_once(s: Scheduler, addr: str, timeout: float) -> Comm:
    """distributed's ``connect()`` without its retries. It retries a refused connection until
    its own timeout (30 s), so a nanny that has stopped looked like a silent one: every stopped
    nanny cost the scheduler's stop seconds (9.6 s for one nanny, most of a job's end). The same
    steps, once: the address's backend connects, then the comm's own handshake."""
    scheme, loc = parse_address(addr)
    connector = registry.get_backend(scheme).get_connector()
    comm = await asyncio.wait_for(connector.connect(loc, deserialize=True, **s.connection_args),
                                  timeout)
    try:
        local = comm.handshake_info()
        await comm.write(local)
        remote = await asyncio.wait_for(comm.read(), timeout)
        comm.remote_info = {**remote, "address": comm.peer_address}
        comm.local_info = {**local, "address": comm.local_address}
        comm.handshake_options = comm.handshake_configuration(comm.local_info, comm.remote_info)
    except BaseException:
        comm.abort()
        raise
    return comm
