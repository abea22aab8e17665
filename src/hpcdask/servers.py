"""Where the roles' HTTP endpoints listen (``--dashboard loopback|interface|off``), and
distributed's scheduler and worker without any HTTP listener, for ``--dashboard off``.

``Scheduler(dashboard=False)`` and ``dask worker --no-dashboard`` only drop the Bokeh pages:
distributed still serves its other HTTP routes (info pages with logs and call stacks, JSON,
Prometheus, health) on a port of its own. These subclasses start no HTTP server at all; the
rest of distributed finds an empty application where it looks for one.
"""

from __future__ import annotations

import socket
from typing import Any

from distributed import Scheduler, Worker
from distributed.http.routing import RoutingApplication

from hpcdask import batch
from hpcdask.errors import BadInput


class _NoHTTP:
    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        self.http_application = RoutingApplication([])  # nothing listens


class NoHTTPScheduler(_NoHTTP, Scheduler):
    """A ``Scheduler`` with no HTTP listener (pass ``dashboard=False``)."""


class NoHTTPWorker(_NoHTTP, Worker):
    """A ``Worker`` with no HTTP listener: ``dask worker --no-dashboard --worker-class
    hpcdask.servers.NoHTTPWorker``, or ``Nanny(worker_class=NoHTTPWorker, dashboard=False)``."""


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
    login = batch.job().submit_host or "LOGIN"
    if mode == "loopback":
        return (f"dashboard: http://localhost:{port}/status after: "
                f"ssh -N -L {port}:127.0.0.1:{port} -J {login} {node}")
    return f"dashboard: http://localhost:{port}/status after: ssh -N -L {port}:{node}:{port} {login}"


def worker_http(mode: str) -> dict[str, Any]:
    """Nanny arguments for the workers' HTTP endpoints: loopback only, or none at all (off).
    Workers never serve them on the interface, whatever the scheduler's dashboard does."""
    dashboard_address(mode, "", 0)  # refuses an unknown mode
    if mode == "off":
        return {"dashboard": False, "worker_class": NoHTTPWorker}
    return {"dashboard_address": "127.0.0.1:0"}
