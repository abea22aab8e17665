"""Distributed's scheduler and worker without any HTTP listener, for ``--dashboard off``.

``Scheduler(dashboard=False)`` and ``dask worker --no-dashboard`` only drop the Bokeh pages:
distributed still serves its other HTTP routes (info pages with logs and call stacks, JSON,
Prometheus, health) on a port of its own. These subclasses start no HTTP server at all; the
rest of distributed finds an empty application where it looks for one.
"""

from __future__ import annotations

from distributed import Scheduler, Worker
from distributed.http.routing import RoutingApplication


class _NoHTTP:
    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        self.http_application = RoutingApplication([])  # nothing listens


class NoHTTPScheduler(_NoHTTP, Scheduler):
    """A ``Scheduler`` with no HTTP listener (pass ``dashboard=False``)."""


class NoHTTPWorker(_NoHTTP, Worker):
    """A ``Worker`` with no HTTP listener: ``dask worker --no-dashboard --worker-class
    hpcdask.servers.NoHTTPWorker``, or ``Nanny(worker_class=NoHTTPWorker, dashboard=False)``."""
