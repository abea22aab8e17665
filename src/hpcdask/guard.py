"""The scheduler's guard: no task reaches a worker, and no client is served, whose identity
differs from the scheduler's (:func:`hpcdask.versions.identity`).

Workers: a worker cannot answer any call until its registration has completed, so the guard
first compares what it sent when registering (distributed's handful of packages and Python)
and holds it out of scheduling (paused, on the scheduler's side) until its full identity has
been proven by asking it for :func:`~hpcdask.versions.identity` right after registration. A
worker that differs, or cannot answer, is removed and the difference table goes to the
scheduler's log; a worker that matches is set running. It cannot set itself running earlier:
its status changes are held back until it has been vetted.

Clients: a client has no server to ask, so the guard first compares what every client sends
when registering (distributed's packages and Python) and refuses a differing one before serving
it; the client's own constructor then raises with one line naming the difference. Then no graph
from a client runs until that client has proven its full identity: its preload
(:mod:`hpcdask.proof`, in the image's and the venv's Dask configuration) sends it right after
registering, before ``Client(...)`` returns. Each graph of a client whose identity differs, or
that sent none (a client from an environment without hpcdask), is refused before any of its
tasks exists: its futures err with one line naming the difference or the missing proof.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.core import Status, error_message
from distributed.diagnostics.plugin import SchedulerPlugin

from hpcdask import proof, versions

logger = logging.getLogger(__name__)
_versions = versions  # the client handler's argument is called versions too

VET_TIMEOUT = 30.0


class IdentityGuard(SchedulerPlugin):
    """Scheduler plugin: answers ``hpcdask_identity`` and refuses any role that differs."""

    name = "hpcdask-identity-guard"

    def __init__(self) -> None:
        self.identity = versions.identity()
        self.refused: dict[str, str] = {}
        self.vetted: set[str] = set()
        self._held: dict[str, str] = {}  # unvetted worker -> the status it last asked for
        # Every nanny whose worker ever joined, kept after its worker left (killed for memory,
        # being restarted): at the cluster's end each is told to stop (scheduler.retire_all).
        self.nannies: set[str] = set()
        # Nannies whose worker died (its comm broke: killed for memory, crashed): each may be
        # starting a new worker process, which reads the cluster's credential files.
        self.restarting: set[str] = set()
        self._nanny_of: dict[str, str] = {}
        self._retired: set[str] = set()  # workers retired (drained): their nanny stops, not restarts
        self.proven_clients: set[str] = set()
        self.refused_clients: dict[str, str] = {}  # client -> why its graphs are refused

    async def start(self, scheduler) -> None:
        scheduler.handlers["hpcdask_identity"] = self._identity
        register_client = scheduler.handlers["register-client"]
        status_change = scheduler.stream_handlers["worker-status-change"]

        async def guarded_register_client(comm, client: str, versions: dict[str, Any]) -> None:
            rows = self._fast_differences(versions, f"client {client}")
            if rows:
                why = _versions.summary(rows)
                logger.error("hpcdask: refused client %s: %s\n%s", client, why,
                             _versions.table(rows))
                # What distributed's Client reads first; it raises ImportError(error).
                await comm.write([{"op": "stream-start",
                                  "error": f"hpcdask: refused by the scheduler: this client's "
                                           f"environment differs: {why}; run it from the "
                                           f"cluster's image or lock"}])
                await comm.close()
                return
            await register_client(comm=comm, client=client, versions=versions)

        def guarded_status_change(status, worker: str, stimulus_id: str) -> None:
            if worker in self._held:
                self._held[worker] = status
                return
            status_change(status=status, worker=worker, stimulus_id=stimulus_id)

        scheduler.handlers["register-client"] = guarded_register_client
        scheduler.stream_handlers["worker-status-change"] = guarded_status_change

        # Clients: the proof (hpcdask.proof) and no graph without it.
        identity = scheduler.handlers["identity"]
        update_graph = scheduler.stream_handlers["update-graph"]

        def guarded_identity(n_workers: int = -1) -> dict[str, Any]:
            # Tells a client's preload that this scheduler asks for its proof.
            return {**identity(n_workers=n_workers), "hpcdask": {"proof": proof.HANDLER}}

        async def guarded_update_graph(client: str, keys, **kwargs) -> None:
            why = self._unproven(client)
            if why is None:
                await update_graph(client=client, keys=keys, **kwargs)
            else:
                self._refuse_graph(scheduler, client, keys, why)

        scheduler.handlers["identity"] = guarded_identity
        scheduler.handlers[proof.HANDLER] = self._prove_client
        scheduler.stream_handlers["update-graph"] = guarded_update_graph

    def _identity(self, comm=None) -> dict[str, Any]:
        return self.identity

    def _fast_differences(self, sent: dict[str, Any] | None, role: str) -> list:
        """Rows of what differs among what a role sent when registering."""
        return versions.differences(self.identity, {role: versions.from_distributed(sent or {})},
                                    only_theirs=True)

    # --- clients -------------------------------------------------------------------------

    def _prove_client(self, client: str, identity: dict[str, Any]) -> str | None:
        """The handler of :mod:`hpcdask.proof`: None when the client's identity is the
        scheduler's, else the one line naming what differs."""
        rows = versions.differences(self.identity, {f"client {client}": identity})
        if not rows:
            self.proven_clients.add(client)
            self.refused_clients.pop(client, None)
            return None
        why = f"this client's environment differs: {versions.summary(rows)}"
        self.proven_clients.discard(client)
        self.refused_clients[client] = why
        logger.error("hpcdask: refused client %s: %s\n%s", client, why, versions.table(rows))
        return why

    def _unproven(self, client: str) -> str | None:
        """Why ``client``'s graphs are refused, or None when it has proven its identity."""
        if client in self.proven_clients:
            return None
        return self.refused_clients.get(client) or (
            "this client has not proven its identity (its Dask configuration lacks the "
            f"client preload {proof.MODULE}, so it is not from the cluster's image or lock)")

    def _refuse_graph(self, scheduler, client: str, keys, why: str) -> None:
        """Err every key of the graph for this client only; none of its tasks is created."""
        logger.error("hpcdask: refused a graph of %d key(s) from client %s: %s", len(keys),
                     client, why)
        comm = scheduler.client_comms.get(client)
        if comm is None:
            return
        err = error_message(PermissionError(
            f"hpcdask: refused by the scheduler: {why}; run the client from the cluster's image "
            f"or lock (a plain Client(scheduler_file=...) there proves itself)"))
        for key in keys:
            comm.send({"op": "task-erred", "key": key, "exception": err["exception"],
                       "traceback": None})

    # --- workers -------------------------------------------------------------------------

    def add_worker(self, scheduler, worker: str) -> None:
        ws = scheduler.workers[worker]
        if ws.nanny:
            self.nannies.add(ws.nanny)
            self._nanny_of[worker] = ws.nanny
            self.restarting.discard(ws.nanny)
        # Out of scheduling before add_worker gets to schedule anything on it.
        self._held[worker] = ws.status.name
        scheduler.handle_worker_status_change(Status.paused, ws, "hpcdask-identity-unproven")
        rows = self._fast_differences(getattr(ws, "versions", None), f"worker {worker}")
        if rows:
            self._refuse(scheduler, worker, versions.summary(rows), rows)
        else:
            asyncio.ensure_future(self._vet(scheduler, worker))

    def remove_worker(self, scheduler, worker: str, *, stimulus_id: str = "", **kwargs) -> None:
        nanny = self._nanny_of.pop(worker, None)
        retired = worker in self._retired
        self._retired.discard(worker)
        if nanny and retired:
            # Retired, then closed: its nanny closes after it (Worker.close tells it to, and
            # hpcdask worker closes its own). Asking a gone nanny to stop costs the scheduler's
            # stop seconds per nanny when its host has gone too (compose stops the workers first).
            self.nannies.discard(nanny)
        elif nanny and stimulus_id.startswith("handle-worker-cleanup"):
            self.restarting.add(nanny)
        self._held.pop(worker, None)
        self.vetted.discard(worker)

    def log_event(self, topic: str, msg) -> None:
        # A drained worker (retire_workers, hpcdask/drain.py) leaves through the same stream end
        # as a dead one; its status change to closing_gracefully tells them apart.
        if isinstance(msg, dict) and msg.get("action") == "worker-status-change":
            if msg.get("status") == "closing_gracefully":
                self._retired.add(topic)
            elif msg.get("status") in ("running", "paused"):  # a retirement that gave up
                self._retired.discard(topic)

    async def _vet(self, scheduler, worker: str) -> None:
        from distributed.protocol.pickle import dumps
        from distributed.protocol.serialize import Serialized, deserialize

        rows = None
        for _ in range(200):  # the worker answers once its registration reply has arrived
            if worker not in scheduler.workers:
                return
            if worker in scheduler.stream_comms and scheduler.stream_comms[worker].comm:
                break
            await asyncio.sleep(0.025)
        try:
            resp = await asyncio.wait_for(
                scheduler.broadcast(msg={"op": "run", "function": dumps(versions.identity),
                                         "args": dumps(()), "kwargs": dumps({})},
                                    workers=[worker]),
                VET_TIMEOUT)
            result = resp[worker]
            if result.get("status") != "OK":
                raise RuntimeError(result.get("exception_text") or "no identity")
            theirs = result["result"]  # the scheduler does not deserialize what it relays
            if isinstance(theirs, Serialized):
                theirs = deserialize(theirs.header, theirs.frames)
            rows = versions.differences(self.identity, {f"worker {worker}": theirs})
            why = versions.summary(rows) if rows else None
        except Exception as e:  # noqa: BLE001 - any failure to prove identity is a refusal
            if worker not in scheduler.workers:
                return  # it left on its own
            why = (f"could not report its identity ({type(e).__name__}: {e}); is it a worker "
                   f"from the cluster's image or lock?")
        if worker not in scheduler.workers:
            return
        if why:
            self._refuse(scheduler, worker, why, rows)
            return
        self.vetted.add(worker)
        wanted = self._held.pop(worker, "running")
        logger.info("hpcdask: worker %s proved its identity (%d packages)", worker,
                    len(self.identity["packages"]))
        scheduler.handle_worker_status_change(wanted, worker, "hpcdask-identity-proven")

    def _refuse(self, scheduler, worker: str, why: str, rows) -> None:
        self.refused[worker] = why
        detail = f"\n{versions.table(rows)}" if rows else ""
        logger.error("hpcdask: refused worker %s: %s%s", worker, why, detail)

        async def remove() -> None:
            for _ in range(200):  # until its registration has completed
                if worker not in scheduler.workers:
                    return
                if worker in scheduler.stream_comms and scheduler.stream_comms[worker].comm:
                    break
                await asyncio.sleep(0.025)
            await scheduler.remove_worker(worker, stimulus_id="hpcdask-identity-mismatch",
                                          close=True)

        asyncio.ensure_future(remove())
