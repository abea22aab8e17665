"""Section `throughput`: tiny tasks per second, hpcdask TLS vs --no-tls vs plain LocalCluster.

`client.map(inc, range(n))` + gather on 2 workers x 1 thread; also the scheduler's own CPU time
per task. The three clusters live side by side in this process; runs are interleaved.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import stats
from common import log, pair


def inc(x):
    return x + 1


def _loop_cpu():
    import time as _t
    return _t.thread_time()


def section(args, setup, tmp: Path) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from hpcdask import local

    n = 500 if args.quick else 5000
    reps = 2 if args.quick else 5
    clusters, clients = {}, {}
    try:
        clusters["hpcdask TLS"] = local.local_cluster(2, 1, tls=True, memory_limit="2GiB")
        clusters["hpcdask --no-tls"] = local.local_cluster(2, 1, tls=False, memory_limit="2GiB")
        clusters["distributed.LocalCluster"] = LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", memory_limit="2GiB",
            dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING)
        for k, c in clusters.items():
            clients[k] = Client(c)
            clients[k].gather(clients[k].map(inc, range(300), pure=False))  # warm-up
        runs: dict[str, list[dict]] = {k: [] for k in clusters}
        for r, v in stats.interleave(list(clusters), reps):
            c = clients[v]
            cpu0 = c.run_on_scheduler(_loop_cpu)
            t0 = time.perf_counter()
            futs = c.map(inc, range(n), pure=False)
            total = sum(c.gather(futs))
            dt = time.perf_counter() - t0
            cpu1 = c.run_on_scheduler(_loop_cpu)
            del futs
            assert total == n * (n + 1) // 2
            runs[v].append({"seconds": dt, "tasks_per_s": n / dt,
                            "scheduler_cpu_per_task_s": (cpu1 - cpu0) / n})
            log(f"throughput {v:26s} rep {r}: {n / dt:7.0f} tasks/s")
            time.sleep(0.3)
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                c.close()
        for c in clusters.values():
            with contextlib.suppress(Exception):
                c.close()
    keys = list(runs)
    return {"tasks": n, "reps": reps, "workers": 2, "threads_per_worker": 1, "runs": runs,
            "summary": {k: {m: stats.summarize([x[m] for x in runs[k]])
                            for m in ("tasks_per_s", "scheduler_cpu_per_task_s")} for k in keys},
            "ratios": {"TLS/no-TLS": pair(runs["hpcdask TLS"], runs["hpcdask --no-tls"],
                                           "tasks_per_s"),
                       "hpcdask TLS/LocalCluster": pair(runs["hpcdask TLS"],
                                                         runs["distributed.LocalCluster"],
                                                         "tasks_per_s"),
                       "no-TLS/LocalCluster": pair(runs["hpcdask --no-tls"],
                                                    runs["distributed.LocalCluster"],
                                                    "tasks_per_s")}}
