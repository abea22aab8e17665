"""Running a workload: timings, every role's identity, Dask's performance report, and an
output folder written whole or not at all."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import threading
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
    #: seconds spent on each side of the comparison: "cluster" and "baseline" steps
    sides: dict[str, float] = field(default_factory=dict)
    #: the client process's peak RSS during the baseline's steps (the single machine's memory)
    baseline_peak_rss: int = 0

    @property
    def nworkers(self) -> int:
        return max(1, len(cluster_info(self.client)["workers"]))

    def step(self, name: str, side: str | None = None) -> _Step:
        """``with ctx.step("fit", side="cluster"):`` logs progress and records the step's
        duration; ``side`` ("cluster" or "baseline") adds it to that side's wall time, which
        metrics.json and the summary set side by side (a baseline step's peak memory too)."""
        return _Step(self, name, side)

    def pick(self, small, medium, large):
        return {"small": small, "medium": medium, "large": large}[self.size]


class _Step:
    def __init__(self, ctx: Context, name: str, side: str | None = None):
        self.ctx, self.name, self.side = ctx, name, side
        self.peak: _PeakRSS | None = None

    def __enter__(self):
        logger.info("hpcdask: %s ...", self.name)
        if self.side == "baseline":
            self.peak = _PeakRSS().start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        if self.peak is not None:
            self.ctx.baseline_peak_rss = max(self.ctx.baseline_peak_rss, self.peak.stop())
        self.seconds = round(dt, 3)
        self.ctx.timings[self.name] = self.seconds
        if self.side:
            self.ctx.sides[self.side] = self.ctx.sides.get(self.side, 0.0) + dt
        if exc[0] is None:
            logger.info("hpcdask: %s done in %.2fs", self.name, dt)
        return False


class _PeakRSS:
    """This process's largest resident set size while it runs, sampled every 20 ms (psutil)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True, name="hpcdask-peak-rss")

    def start(self) -> _PeakRSS:
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.proc.memory_info().rss)


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
        result = {**result, **gained(ctx, result, getattr(module, "OUT_OF_CORE", False))}
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
    if metrics.get("memory"):
        logger.info("hpcdask: %s", memory_summary(metrics["memory"]))
    return output / "metrics.json"


def gained(ctx: Context, result: dict[str, Any], out_of_core: bool) -> dict[str, Any]:
    """What the cluster bought, for metrics.json: the cluster's wall time beside the single
    machine's (``wall_s``, unless the workload gives its own), and for an out-of-core workload
    its data size beside the largest worker's memory limit and the baseline's peak memory."""
    extra: dict[str, Any] = {}
    if "wall_s" not in result and {"cluster", "baseline"} <= ctx.sides.keys():
        extra["wall_s"] = {k: round(ctx.sides[k], 3) for k in ("baseline", "cluster")}
    if out_of_core:
        limits = [w.get("memory_limit") or 0 for w in
                  cluster_info(ctx.client)["workers"].values()]
        extra["memory"] = {"data_bytes": int(result["data_bytes"]),
                           "largest_worker_memory_limit": int(max(limits, default=0)),
                           "baseline_peak_rss": int(ctx.baseline_peak_rss)}
    return extra


def wall_summary(wall: dict[str, float]) -> str:
    """``baseline 35.6s; joblib_dask 27.6s (1.29x faster)``: each cluster run's wall time beside
    the single-machine baseline's, from a workload's ``wall_s`` ({"baseline": s, name: s})."""
    base = wall["baseline"]
    parts = [f"single-machine baseline {base:.1f}s"]
    for name, s in wall.items():
        if name != "baseline":
            what = "the cluster" if name == "cluster" else f"{name} on the cluster"
            parts.append(f"{what} {s:.1f}s ({base / s:.2f}x the baseline's speed)")
    return "; ".join(parts)


def memory_summary(mem: dict[str, int]) -> str:
    """``data 1.2 GiB, 2.40x the largest worker's memory limit (512 MiB); the single-machine
    baseline peaked at 0.9 GiB``."""
    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB"

    data, limit = mem["data_bytes"], mem["largest_worker_memory_limit"]
    ratio = f"{data / limit:.2f}x the largest worker's memory limit ({gib(limit)})" if limit \
        else "workers without a memory limit"
    return (f"data {gib(data)}, {ratio}; the single-machine baseline peaked at "
            f"{gib(mem['baseline_peak_rss'])}")


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
