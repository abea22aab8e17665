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


def test_a_nanny_is_seen_to_answer_while_busy_and_to_stop_once_it_has(tmp_path):
    """The scheduler's last wait (hpcdask.scheduler._gone) asks each nanny on a new connection.
    Asked on the scheduler's pooled one, a nanny still busy with the scheduler's ``terminate``
    did not answer, and a stopped one was retried as unanswered (distributed's connect retries a
    refused port): every stop waited 3 x 2 s, so at a Slurm time limit the scheduler was
    SIGKILLed still waiting. Real TLS servers on loopback: a busy one answers, a stopped one is
    refused, a silent one (TCP accepted, no TLS) is 'no answer'. The probes leave no warning in
    the server's log (a nanny's)."""
    from distributed.core import Server

    from hpcdask import security

    sec = security.create(tmp_path / "tls", "t").security()
    args = sec.get_connection_args("scheduler")

    async def busy(comm=None):  # a nanny's terminate: closing its worker takes seconds
        await asyncio.sleep(3)

    async def main():
        server = Server({"busy": busy}, connection_args=sec.get_connection_args("worker"))
        await server.listen("tls://127.0.0.1:0", **sec.get_listen_args("worker"))
        addr = server.address
        from distributed.core import ConnectionPool

        rpc = await ConnectionPool(connection_args=args)
        try:
            await rpc(addr).busy(reply=False)  # the pooled comm is now busy for 3 s
            assert await scheduler.answers_at(addr, args) is True
            server.stop()  # its listener closes (on the loop), as a stopping nanny's does
            await asyncio.sleep(0.2)
            assert await scheduler.answers_at(addr, args) is False
        finally:
            await rpc.close()
            await server.close()
        held: list[asyncio.StreamWriter] = []

        async def hold(reader, writer):  # accepts, never answers
            held.append(writer)

        silent = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            assert await scheduler.answers_at(f"tls://127.0.0.1:{port}", args, timeout=0.5) is None
        finally:
            silent.close()
            for w in held:
                w.close()
                await w.wait_closed()
            await silent.wait_closed()

    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("distributed").addHandler(catch)
    try:
        asyncio.run(main())
    finally:
        logging.getLogger("distributed").removeHandler(catch)
    assert not records, [r.getMessage() for r in records]
