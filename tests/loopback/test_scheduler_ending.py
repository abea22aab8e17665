"""The scheduler's word that the cluster is ending (hpcdask.scheduler.end_clients) with a real
distributed Scheduler and Client in this process, on loopback."""

from __future__ import annotations

import asyncio
import logging

import dask.config
import pytest
from distributed import Client, Scheduler

from hpcdask import scheduler, signals

pytestmark = pytest.mark.timeout(120)


def test_a_client_gone_before_the_word_costs_no_traceback():
    """Grid Engine's -notify signals every process of the job at once: the client may be gone
    (its comm closed, the scheduler not yet told) when the scheduler tells the clients that the
    cluster is ending. That send must not log distributed's CRITICAL 'Closed comm' traceback."""

    async def main() -> list[logging.LogRecord]:
        records: list[logging.LogRecord] = []
        catch = logging.Handler(logging.ERROR)
        catch.emit = records.append  # type: ignore[method-assign]
        log = logging.getLogger("distributed.scheduler")
        log.addHandler(catch)
        try:
            async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as s:
                async with Client(s.address, asynchronous=True) as c:
                    c.subscribe_topic(signals.ENDING_TOPIC, lambda event: None)
                    topic = s._broker._topics[signals.ENDING_TOPIC]
                    while not topic.subscribers:
                        await asyncio.sleep(0.01)
                    (name,) = [k for k in s.client_comms if k != "fire-and-forget"]
                    s.client_comms[name].comm.abort()  # gone; the scheduler has not noticed yet
                    with dask.config.set({"hpcdask.drain-timeout": "1s"}):  # it waits for clients
                        await scheduler.end_clients(s, "its scheduler's job got SIGUSR2")
        finally:
            log.removeHandler(catch)
        return records

    records = asyncio.run(main())
    assert [r.getMessage() for r in records] == []
