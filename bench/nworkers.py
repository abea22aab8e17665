"""Section `nworkers`: many worker processes on one node (issue 20), on loopback, bare.

One worker command with ``--nworkers N --nthreads 1``, three ways, in the image's own Python
run bare (env.Setup.bare: one venv for all): hpcdask's worker (its processes fork from one
warm server, hpcdask.warm), the same with ``HPCDASK_WARM_WORKERS=false`` (distributed's
``spawn``: a fresh interpreter per process), and distributed's own ``dask worker --nworkers N``
against ``dask scheduler``. The clock starts when the worker command starts (its scheduler is
up, and a waiting client in the same Python is connected) and stops when that client sees N
workers. Then the proportional set size (PSS) of the worker command's process tree, once the
workers are idle. hpcdask's side carries its TLS and identity check; dask's runs plain TCP.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import psutil

import stats
from common import log, ok, pair, private_dir, spawn, stop, tail, wait_file

_WAITER = """
import sys, time
n, kind, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind == "dask":
    from distributed import Client
    c = Client(scheduler_file=path, timeout=60)
else:
    from hpcdask import connect
    c = connect.connect(path, check=False)
print("connected", flush=True)
c.wait_for_workers(n, timeout=180)
print("ready", flush=True)
sys.stdin.readline()  # held open until the bench has read the memory
c.close()
"""


def _pss_mib(pid: int) -> float:
    total = 0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


def one(kind: str, n: int, bare: dict, tmp: Path) -> dict:
    """Time to n registered workers and the tree's PSS for one worker command."""
    import subprocess

    d = private_dir(tmp, f"nworkers-{kind}-")
    f = d / "scheduler.json"
    logfile = d / "roles.log"
    py = bare["prefix"][0]
    env = dict(bare["env"])
    if kind == "spawn":
        env["HPCDASK_WARM_WORKERS"] = "false"
    procs = []
    waiter = None
    try:
        if kind == "dask":
            sched = [py, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", f,
                     "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
            work = [py, "-m", "distributed.cli.dask_worker", "--scheduler-file", f,
                    "--nworkers", str(n), "--nthreads", "1", "--memory-limit", "1GiB",
                    "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
        else:
            sched = [*bare["prefix"], "scheduler", "--scheduler-file", f, "--interface", "lo",
                     "--dashboard", "off"]
            work = [*bare["prefix"], "worker", "--scheduler-file", f, "--interface", "lo",
                    "--nworkers", str(n), "--nthreads", "1", "--memory-limit", "1GiB"]
        procs.append(spawn(sched, logfile, env=env))
        wait_file(f, procs, 120, f"{kind} scheduler", logfile)
        waiter = subprocess.Popen([py, "-c", _WAITER, str(n), kind, str(f)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        if waiter.stdout.readline().strip() != "connected":
            raise RuntimeError(f"the waiting client did not connect: {tail(logfile)}")
        t0 = time.perf_counter()
        procs.append(spawn(work, logfile, env=env))
        if waiter.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{n} workers never registered: {tail(logfile)}")
        ready = time.perf_counter() - t0
        time.sleep(1.0)  # idle: the workers' start-up allocations settled
        pss = _pss_mib(procs[1].pid)
        return {"ready_s": ready, "pss_mib": pss}
    except Exception as e:
        raise RuntimeError(f"{kind} n={n}: {e}: {tail(logfile)}") from None
    finally:
        if waiter is not None:
            with contextlib.suppress(Exception):
                waiter.stdin.write("\n")
                waiter.stdin.close()
                waiter.wait(20)
            stop([waiter])
        stop(procs[1:])
        stop(procs[:1])
        shutil.rmtree(d, ignore_errors=True)


def section(args, setup, tmp: Path) -> dict:
    bare = setup.bare()
    n = 8
    reps = 2 if args.quick else 5
    kinds = ["warm", "spawn", "dask"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    one_runs: list[dict] = []  # hpcdask, 1 worker process: the 8 / 1 ratio's denominator
    errors = []
    with contextlib.suppress(Exception):  # warm-up, not recorded: page cache
        one("warm", 1, bare, tmp)
    for r, k in stats.interleave(kinds + ["warm1"], reps):
        try:
            res = one("warm" if k == "warm1" else k, 1 if k == "warm1" else n, bare, tmp)
            log(f"nworkers {k:6s} rep {r}: ready {res['ready_s']:.2f}s, "
                f"PSS {res['pss_mib']:.0f} MiB")
        except Exception as e:  # one failed run is recorded, the rest go on
            errors.append(str(e)[:400])
            res = {"ready_s": float("nan"), "pss_mib": float("nan"), "error": str(e)[:400]}
            log(f"nworkers {k} rep {r} FAILED: {e}")
        (one_runs if k == "warm1" else runs[k]).append(res)
    return {"nworkers": n, "reps": reps, "variants": kinds, "runs": runs, "one": one_runs,
            "errors": errors,
            "summary": {k: {"ready_s": stats.summarize(ok([x["ready_s"] for x in runs[k]])),
                            "pss_mib": stats.summarize(ok([x["pss_mib"] for x in runs[k]]))}
                        for k in kinds},
            "ratios": {"warm/dask ready": pair(runs["warm"], runs["dask"], "ready_s"),
                       "warm/dask pss": pair(runs["warm"], runs["dask"], "pss_mib"),
                       "spawn/dask ready": pair(runs["spawn"], runs["dask"], "ready_s"),
                       "warm/spawn ready": pair(runs["warm"], runs["spawn"], "ready_s"),
                       "warm8/warm1 ready": pair(runs["warm"], one_runs, "ready_s")}}
