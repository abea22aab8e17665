"""The client's side: connect to a cluster through its scheduler file, identity checked.

Every role that talks to a running scheduler (a client, a worker before it registers,
``hpcdask wait`` and ``versions``) reads the scheduler file, loads the cluster's TLS credentials
from its folder, and compares its own environment with the scheduler's; a role that differs is
refused (:class:`~hpcdask.errors.Refused`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import dask.config
import dask.utils
from distributed import Client
from distributed.core import rpc
from distributed.security import Security

from hpcdask import config, proof, schedfile, security, signals, versions
from hpcdask.errors import BadInput, NotReady, Refused

# How to wait longer for workers, as hpcdask run/client and the jobscripts offer it.
READY_HINT = "--wait-timeout; HPCDASK_READY_TIMEOUT in the jobscripts"


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
    security.warn_no_tls(f"the {role}")
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


def with_proof() -> list[str]:
    """The client preloads configured, and hpcdask's proof of identity (:mod:`hpcdask.proof`)
    even when a user's own Dask configuration names other preloads."""
    preload = list(dask.config.get("distributed.client.preload") or [])
    return preload if proof.MODULE in preload else [*preload, proof.MODULE]


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
        security.warn_no_tls("the client")
        sec = Security()
    try:
        with dask.config.set({"distributed.client.preload": with_proof()}):
            client = Client(address, security=sec, timeout=timeout)
    except (OSError, asyncio.TimeoutError) as e:
        hint = schedfile.stale_hint(path) if path else f"the scheduler at {address} does not answer"
        raise BadInput(f"{hint} ({type(e).__name__})") from None
    except ImportError as e:  # how distributed's Client reports the guard's refusal
        raise Refused(str(e).removeprefix("hpcdask: ")) from None
    # The scheduler's word that the cluster is ending (its job got the warning signal).
    client.subscribe_topic(signals.ENDING_TOPIC, signals.cluster_ending)
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
