"""Running a workload: timings, every role's identity, Dask's performance report, and an
output folder written whole or not at all."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, get_client, performance_report

from hpcdask import compat
from hpcdask.errors import BadInput
from hpcdask.connect import cluster_info

logger = logging.getLogger("hpcdask")

SIZES = ("small", "medium", "large")


@dataclass
class Context:
    """What a workload gets: the client, its data size and seed, and where to put files."""

    client: Client
    size: str
    seed: int
    outdir: Path  # the staging folder; files land in the output folder only if all succeeds
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def nworkers(self) -> int:
        return max(1, len(cluster_info(self.client)["workers"]))

    def step(self, name: str) -> _Step:
        """``with ctx.step("fit"):`` logs progress and records the step's duration."""
        return _Step(self, name)

    def pick(self, small, medium, large):
        return {"small": small, "medium": medium, "large": large}[self.size]


class _Step:
    def __init__(self, ctx: Context, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self):
        logger.info("hpcdask: %s ...", self.name)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.seconds = round(dt, 3)
        self.ctx.timings[self.name] = self.seconds
        if exc[0] is None:
            logger.info("hpcdask: %s done in %.2fs", self.name, dt)
        return False


@contextlib.contextmanager
def _report(path: Path):
    """Dask's performance report of the block, written only when the block succeeds: after a
    failure (or a time limit) there is nothing to report, and fetching it from a scheduler that
    is going away would replace the real error with a connection error."""
    # mode="inline": Bokeh's JavaScript in the file, so the report opens offline (compute
    # nodes, and many browsers on a cluster, have no internet).
    report = _Report(filename=str(path), mode="inline")
    report.__enter__()
    yield
    report.__exit__(None, None, None)
    path.write_text(report.html, encoding="utf-8")


class _Report(performance_report):
    """distributed's report, but its file is written by the thread that asked for it, not by
    the client's event loop: a SIGTERM that ends the wait (Terminated) left the loop writing
    dask-report.html into the staging folder while it was being removed (a .partial-* folder
    left at a time limit)."""

    html = ""

    async def __aexit__(self, exc_type, exc_value, traceback, code=None):
        self.html = await get_client().scheduler.performance_report(
            start=self.start, last_count=self.last_count, code=code, mode=self.mode)


def check_output(output: Path) -> None:
    """The output folder can be created and written, and holds no earlier metrics.json."""
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create the output folder {output} ({e.strerror}); "
                       f"pick another with --output DIR") from None
    if (output / "metrics.json").exists():
        raise BadInput(f"{output / 'metrics.json'} exists from an earlier run; keep it and pick "
                       f"another folder with --output DIR, or delete it: rm -r {output}")


def cluster_shape(client: Client) -> dict[str, Any]:
    info = cluster_info(client)
    workers = info["workers"].values()
    return {
        "scheduler": info["address"],
        "workers": len(workers),
        "threads": sum(w["nthreads"] for w in workers),
        "memory_limit": sum(w.get("memory_limit") or 0 for w in workers),
        "worker_hosts": sorted({w["host"] for w in workers}),
    }


def execute(client: Client, name: str, size: str, seed: int, output: Path) -> Path:
    """Run workload ``name`` and write its files into ``output``; returns metrics.json's path."""
    from hpcdask import connect
    from hpcdask.workloads import WORKLOADS, resolve

    if size not in SIZES:
        raise BadInput(f"--size {size!r} is not one of {', '.join(SIZES)}; e.g. --size small")
    module = importlib.import_module(f"hpcdask.workloads.{WORKLOADS[resolve(name)]}")
    # Absolute: the workers write some outputs themselves (ETL's Parquet), from their own cwd.
    output = Path(output).absolute()
    output.mkdir(parents=True, exist_ok=True)
    stage = Path(output) / f".partial-{int(time.time() * 1000)}"
    try:
        stage.mkdir()
        started = time.time()
        roles = connect.check_cluster(client)
        ctx = Context(client=client, size=size, seed=seed, outdir=stage)
        t0 = time.perf_counter()
        with _report(stage / "dask-report.html"), \
                compat.session(client):
            result = module.run(ctx)
        total = time.perf_counter() - t0
        metrics = {
            "workload": resolve(name), "size": size, "seed": seed,
            **result,
            "durations": {"total": round(total, 3), **ctx.timings},
            "cluster": cluster_shape(client),
            "roles": roles,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        }
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        # Everything else first, metrics.json last: its presence means the run completed.
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "metrics.json"):
            f.replace(output / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    score = metrics.get("score")
    base = metrics.get("baseline_score")
    logger.info("hpcdask: %s %s: %s %s (single-machine baseline %s) in %.1fs",
                metrics["workload"], size, metrics.get("metric", "score"),
                _fmt(score), _fmt(base), total)
    if metrics.get("wall_s"):
        logger.info("hpcdask: %s", wall_summary(metrics["wall_s"]))
    return output / "metrics.json"


def wall_summary(wall: dict[str, float]) -> str:
    """``baseline 35.6s; joblib_dask 27.6s (1.29x faster)``: each cluster run's wall time beside
    the single-machine baseline's, from a workload's ``wall_s`` ({"baseline": s, name: s})."""
    base = wall["baseline"]
    parts = [f"single-machine baseline {base:.1f}s"]
    for name, s in wall.items():
        if name != "baseline":
            parts.append(f"{name} on the cluster {s:.1f}s ({base / s:.2f}x the baseline's speed)")
    return "; ".join(parts)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
