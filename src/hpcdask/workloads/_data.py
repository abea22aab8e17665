"""Generated data shared by the workloads: every block is a pure function of (seed, block index),
so the cluster can generate it lazily where it is needed and the single-machine baseline can
generate exactly the same numbers block by block, without ever holding all of it.

Not a workload (not listed in ``WORKLOADS``); imported only inside ``run()``.
"""

from __future__ import annotations

import numpy as np

from hpcdask.connect import cluster_info

#: block index offset of the held-out test blocks: never overlaps the training blocks
TEST_BLOCKS = 1 << 30
#: the largest block a workload makes
BLOCK_BYTES = 64 << 20
#: features of the generated classification data (the label is one more column)
FEATURES = 20


def _params(seed: int, d: int):
    rng = np.random.default_rng([seed, 0xC0FFEE])
    w = rng.standard_normal(d)
    scale = rng.uniform(0.5, 20.0, d)  # features on very different scales: scaling matters
    offset = rng.uniform(-50.0, 50.0, d)
    return w, scale, offset


def block_xy(seed: int, block: int, rows: int, d: int) -> np.ndarray:
    """One (rows, d + 1) block: d features, then the 0/1 label in the last column.

    Features are uniform, scaled and shifted per column; the label is a noisy linear rule,
    so a linear model reaches ~90 % accuracy and not 100 %."""
    w, scale, offset = _params(seed, d)
    rng = np.random.default_rng([seed, block])
    u = rng.random((rows, d))
    z = (u - 0.5) @ w / np.sqrt(d / 12.0) + 0.4 * rng.standard_normal(rows)
    out = np.empty((rows, d + 1))
    np.multiply(u, scale, out=out[:, :d])
    out[:, :d] += offset
    out[:, d] = z > 0
    return out


def layout(rows_total: int, row_bytes: int, nworkers: int, per_worker: int = 2) -> tuple[int, int]:
    """(blocks, rows per block) for ``rows_total`` rows of ``row_bytes`` each: blocks of at most
    ~64 MiB, and at least ``per_worker`` of them per worker so every worker gets work."""
    nblocks = max(per_worker * nworkers, -(-rows_total * row_bytes // BLOCK_BYTES))
    return nblocks, -(-rows_total // nblocks)


def _map_block(seed, rows, d, first, block_id=None):
    return block_xy(seed, first + block_id[0], rows, d)


def dask_xy(seed: int, nblocks: int, rows: int, d: int, first: int = 0):
    """Lazy dask array of ``nblocks`` blocks of ``block_xy`` (nothing is computed here)."""
    import dask.array as da

    return da.map_blocks(_map_block, seed, rows, d, first, chunks=((rows,) * nblocks, (d + 1,)),
                         dtype=np.float64, meta=np.empty((0, 0)),
                         name=f"hpcdask-xy-{seed}-{first}-{nblocks}-{rows}-{d}")


def lazy_xy(ctx, rows_total: int, per_worker: int = 2, d: int = FEATURES):
    """(X, y, blocks, rows per block): ``rows_total`` rows of :func:`dask_xy`, laid out by
    :func:`layout` over ``ctx``'s workers, generated on the workers when computed."""
    nblocks, rows = layout(rows_total, (d + 1) * 8, ctx.nworkers, per_worker)
    x, y = split(dask_xy(ctx.seed, nblocks, rows, d))
    return x, y, nblocks, rows


def split(xy):
    """(X, y) views of a block array from ``block_xy`` / ``dask_xy``."""
    d = xy.shape[1] - 1
    return xy[:, :d], xy[:, d].astype(np.int64)


def scatter_array(client, a: np.ndarray, chunk: int):
    """A dask array of NumPy data made on the client: the blocks are scattered to the workers
    first, instead of being embedded in (and shipped with) every graph that uses them."""
    import dask
    import dask.array as da

    starts = range(0, len(a), chunk)
    futures = client.scatter([a[i:i + chunk] for i in starts])
    return da.concatenate([da.from_delayed(dask.delayed(f), (min(chunk, len(a) - i),) + a.shape[1:],
                                           dtype=a.dtype, meta=a[:0])
                           for f, i in zip(futures, starts)])


def min_memory_limit(client) -> int:
    """The smallest worker memory_limit in bytes (0: a worker has no limit)."""
    workers = cluster_info(client)["workers"].values()
    limits = [w.get("memory_limit") or 0 for w in workers]
    return min(limits) if limits else 0


class WorkerWatch:
    """Workers lost, restarted or killed for memory between ``start()`` and ``stop()``.

    Uses the scheduler's event log (``all``: add-worker / remove-worker; the nanny's
    ``worker-restart-memory``) and the worker addresses before and after."""

    def __init__(self, client):
        self.client = client

    def _addresses(self) -> set[str]:
        return set(cluster_info(self.client)["workers"])

    def _events(self, topic: str) -> list:
        return list(self.client.get_events(topic))

    def start(self) -> WorkerWatch:
        # positions in the scheduler's event logs, not timestamps: the client's and the
        # scheduler's clocks need not agree on a cluster
        self.seen = {t: len(self._events(t)) for t in ("all", "worker-restart-memory")}
        self.before = self._addresses()
        return self

    def _new(self, topic: str) -> list:
        return [e for _, e in self._events(topic)[self.seen[topic]:]]

    def stop(self) -> dict:
        after = self._addresses()
        events = [e for e in self._new("all") if isinstance(e, dict)]
        removed = [e.get("worker") for e in events if e.get("action") == "remove-worker"]
        added = [e.get("worker") for e in events if e.get("action") == "add-worker"]
        memory_kills = self._new("worker-restart-memory")
        return {
            "workers_before": len(self.before),
            "workers_after": len(after),
            "workers_lost": sorted(self.before - after),
            "workers_removed_events": len(removed),
            "workers_added_events": len(added),
            "memory_kills": len(memory_kills),
            "killed_or_restarted": bool(self.before - after or removed or memory_kills),
        }
