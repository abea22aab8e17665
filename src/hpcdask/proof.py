"""A client's proof of identity, as a Dask client preload (``distributed.client.preload``).

The scheduler's guard (:mod:`hpcdask.guard`) runs no graph from a client that has not proven
its full identity (:func:`hpcdask.versions.identity`: Python, every package, the image). A client
cannot be asked (it serves nothing), so it tells: distributed runs this module's
:func:`dask_setup` inside every ``Client(...)`` once it has registered, before the constructor
returns, so the proof reaches the scheduler before any graph can.

The image's and the lock venv's Dask configuration name this module (``etc/dask/hpcdask.yaml``
under the environment's prefix, installed with hpcdask, and hpcdask's own defaults), so a plain
``Client(scheduler_file=...)`` in a user script there proves itself without the user doing
anything. A client from another environment proves a different identity, or none at all; the
guard then refuses each of its graphs with one line naming the difference or the missing proof.
"""

from __future__ import annotations

import logging

from hpcdask import versions

logger = logging.getLogger(__name__)

MODULE = __name__
HANDLER = "hpcdask_prove_client"


async def dask_setup(client) -> None:
    """Send this client's identity to an hpcdask scheduler; nothing for any other scheduler."""
    info = await client.scheduler.identity(n_workers=0)
    if not info.get("hpcdask"):  # a scheduler without the guard asks for no proof
        return
    why = await client.scheduler.hpcdask_prove_client(client=client.id,
                                                      identity=versions.identity())
    if why:  # the guard says it once, on the first graph; here only for the curious
        logger.debug("hpcdask: the scheduler refuses this client's graphs: %s", why)
