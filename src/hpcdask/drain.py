"""Drain: a node's workers hand their results over before they go.

When the batch system tells a worker job to end (``scancel``, preemption, the time limit's
SIGTERM, or the early warning ``hpcdask.warning-signal``), ``hpcdask worker`` asks the scheduler to
retire its workers: distributed's graceful retirement (``Scheduler.retire_workers(...,
close_workers=True)``, what ``Worker.close_gracefully`` asks for) stops new tasks on them,
replicates every key only they hold to the workers that stay, then closes them. The drain is
bounded by ``hpcdask.drain-timeout`` (inside the batch system's grace: Slurm's KillWait, 30 s by
default). What could not be handed over (no other worker left, no room on the others, the
timeout) is said in one line per worker; the scheduler recomputes it when it is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import dask.utils

from hpcdask import config

logger = logging.getLogger("hpcdask")
ASK_TIMEOUT = 3  # seconds for each question to the scheduler (what a worker holds), beside the drain


def timeout() -> float:
    """``hpcdask.drain-timeout`` in seconds."""
    return dask.utils.parse_timedelta(config.get("drain-timeout"))


async def drain(nannies, why: str, limit: float | None = None) -> dict[str, bool]:
    """Retire the workers of ``nannies`` through their scheduler within ``limit`` seconds (default
    ``hpcdask.drain-timeout``); log one line per worker; return {worker address: drained}."""
    limit = timeout() if limit is None else limit
    addrs = {n.worker_address: n for n in nannies if n.worker_address}
    if not addrs:
        return {}
    sched = next(iter(addrs.values())).scheduler
    try:
        held = await asyncio.wait_for(_unique(sched, list(addrs)), ASK_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        for addr in addrs:
            logger.warning("hpcdask: worker %s could not drain: the scheduler does not answer (%s); "
                           "whatever it held is lost", addr, type(e).__name__)
        return dict.fromkeys(addrs, False)
    except Exception:  # noqa: BLE001 - what a worker holds only sizes the log lines: drain anyway
        held = dict.fromkeys(addrs, (0, 0))
    logger.info("hpcdask: draining %d worker(s) (%s): %s to hand over, within %ss", len(addrs),
                why, _amount(*map(sum, zip(*held.values()))), limit)
    retired: dict = {}
    reason = "no other worker could take them"
    t0 = time.monotonic()
    try:
        retired = await asyncio.wait_for(sched.retire_workers(
            workers=list(addrs), close_workers=False, remove=False,
            stimulus_id=f"hpcdask-drain-{time.time()}"), limit)
    except asyncio.TimeoutError:
        reason = f"the drain timeout ({limit:g}s) passed"
    except OSError as e:
        reason = f"the scheduler stopped answering ({type(e).__name__})"
    took = time.monotonic() - t0
    undrained = [a for a in addrs if a not in retired]
    lost: dict = {}
    if undrained:
        try:
            lost = await asyncio.wait_for(_unique(sched, undrained), ASK_TIMEOUT)
        except Exception:  # noqa: BLE001 - as above: only the log line's amount
            lost = {a: held[a] for a in undrained}
    out = {}
    for addr in addrs:
        out[addr] = addr in retired
        if out[addr]:
            logger.info("hpcdask: worker %s drained in %.1fs: %s handed over", addr, took,
                        _amount(*held[addr]))
        else:
            logger.warning("hpcdask: worker %s could not drain: %s left (%s); the scheduler "
                           "recomputes them when needed", addr, _amount(*lost.get(addr, (0, 0))),
                           reason)
    return out


async def _unique(sched, workers: list[str]) -> dict[str, tuple[int, int]]:
    """{worker: (keys, bytes)} of the results only that worker holds, from the scheduler."""
    has = await sched.has_what(workers=workers)
    keys = list({k for ks in has.values() for k in ks})
    who = await sched.who_has(keys=keys) if keys else {}
    # Every task's size, not the keys': a key released between these questions would make the
    # scheduler raise KeyError (distributed's get_nbytes looks each key up).
    nbytes = await sched.nbytes(summary=False) if keys else {}
    out = {}
    for w in workers:
        mine = [k for k in has.get(w, ()) if list(who.get(k, ())) == [w]]
        out[w] = (len(mine), sum(max(0, nbytes.get(k, 0)) for k in mine))
    return out


def _amount(keys: int = 0, nbytes: int = 0) -> str:
    return f"{keys} key(s), {dask.utils.format_bytes(nbytes)}"
