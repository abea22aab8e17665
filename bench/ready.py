"""Section `ready`: time to ready on loopback, the image against its own Python run bare.

Both sides run the same commands (`hpcdask scheduler` + N x `hpcdask worker`, TLS, --interface
lo), timed like the all-in-one job: start the scheduler (and `hpcdask wait --workers N`, as the
job's client waits), start the workers once its file exists, stop the clock when `hpcdask wait`
returns. (The roles' Python is the image's build, not the bench's: their scheduler refuses a
client from the bench's venv.) The image side runs every role through the runner
(tests/testcluster/bin/apptainer exec); the bare side runs the same roles with the image's own
interpreter and site-packages straight on the host (env.Setup.bare), so the ratio measures the
container.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import stats
from common import RUNNER, log, ok, pair, private_dir, spawn, stop, tail, wait_file


def _cpu():
    import time as _t
    return _t.process_time()


def schedfile_cluster(prefix: list, n: int, tmp: Path, what: str, idle_s: float = 0,
                      memory: str = "1GiB", timeout: float = 180, env=None,
                      bench_client: bool = True, interface: str = "lo",
                      worker_netns: list[str] | None = None, per_node: bool = False) -> dict:
    """Scheduler + n workers started with ``prefix`` (the hpcdask command), until n are ready.

    Returns ready_s, scheduler_s, join_cpu_s (scheduler CPU per join) and, with idle_s, the
    idle scheduler's CPU rate with n workers (heartbeats). Without ``bench_client`` (roles of
    another Python build, whose scheduler refuses the bench's client) the clock stops when
    ``PREFIX wait --workers n`` (the jobscripts' readiness check, started with the scheduler)
    returns, and only ready_s and scheduler_s are measured. With ``worker_netns`` the workers
    are spread over those network namespaces (nodes) in turn, bound to ``interface`` there;
    with ``per_node`` as the jobscripts start them: one worker command per node, ``--nworkers``
    its share (its processes fork from the node's warm server).
    """
    from hpcdask import connect

    d = private_dir(tmp, f"ready-{what}-")
    f = d / "scheduler.json"
    logfile = d / "roles.log"
    procs = []
    client = None
    try:
        t0 = time.perf_counter()
        procs.append(spawn([*prefix, "scheduler", "--scheduler-file", f, "--interface", interface,
                            "--dashboard", "off"], logfile, env=env))
        waiter = None if bench_client else spawn(
            [*prefix, "wait", "--scheduler-file", f, "--workers", str(n), "--timeout",
             f"{timeout:.0f}s"], logfile, env=env)
        wait_file(f, procs, 120, f"{what} scheduler", logfile)
        t_sched = time.perf_counter() - t0
        nodes = len(worker_netns) if per_node and worker_netns else n
        for i in range(min(n, nodes)):
            share = n // nodes + (i < n % nodes)  # processes of this command
            procs.append(spawn([*prefix, "worker", "--scheduler-file", f, "--interface", interface,
                                "--nthreads", "1", "--memory-limit", memory, "--name", f"w{i}",
                                "--nworkers", str(share)],
                               logfile, env=env,
                               netns=worker_netns[i % len(worker_netns)] if worker_netns else None))
        if waiter is not None:
            procs.append(waiter)
            rc = waiter.wait(timeout + 30)
            if rc != 0:
                raise RuntimeError(f"hpcdask wait exited {rc}")
            return {"ready_s": time.perf_counter() - t0, "scheduler_s": t_sched}
        client = connect.connect(f, check=False)
        cpu0 = client.run_on_scheduler(_cpu)
        client.wait_for_workers(n, timeout=timeout)
        t_ready = time.perf_counter() - t0
        cpu1 = client.run_on_scheduler(_cpu)
        out = {"ready_s": t_ready, "scheduler_s": t_sched, "join_cpu_s": (cpu1 - cpu0) / n}
        if idle_s:
            time.sleep(idle_s)
            out["idle_cpu_rate"] = (client.run_on_scheduler(_cpu) - cpu1) / idle_s
        return out
    except Exception as e:
        raise RuntimeError(f"{what} n={n}: {e}: {tail(logfile)}") from None
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        stop(procs[1:])  # workers first: they say goodbye to a scheduler that is still there
        stop(procs[:1])
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def kernel_mount(sif: str, tmp: Path):
    """The SIF's squashfs partition mounted read-only by the kernel (loop device at its offset),
    as setuid Apptainer mounts it; the runner then runs that folder. Yields the folder, or None
    with the reason when this machine cannot mount it."""
    import subprocess

    listing = subprocess.run(["siftool", "list", sif], capture_output=True, text=True).stdout
    off = next((int(ln.split("|")[3].split("-")[0]) for ln in listing.splitlines()
                if "*System" in ln), None)
    d = private_dir(tmp, "ksquash-")
    res = subprocess.run(["mount", "-t", "squashfs", "-o", f"ro,loop,offset={off}", sif, str(d)],
                         capture_output=True, text=True) if off is not None else None
    if res is None or res.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        yield None, (res.stderr.strip() if res else "no system partition in siftool list")
        return
    try:
        yield d, ""
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)
        with contextlib.suppress(OSError):
            d.rmdir()


def section(args, setup, tmp: Path) -> dict:
    image = setup.image()
    with kernel_mount(image, tmp) as (mounted, why):
        return _section(args, setup, tmp, mounted, why)


def _section(args, setup, tmp: Path, mounted: Path | None, why: str) -> dict:
    """container: the runner mounts the .sif with squashfuse (unprivileged Apptainer's FUSE
    mount, single-threaded Debian squashfuse 0.1.105 here); kernel: the runner runs the kernel's
    read-only squashfs mount of the same partition (setuid Apptainer's), made once for the run."""
    image, bare = setup.image(), setup.bare()
    prefixes = {"bare": bare["prefix"],
                "container": [RUNNER, "exec", "--bind", tmp, image, "hpcdask"]}
    envs = {"bare": bare["env"], "container": None}
    if mounted is not None:
        prefixes["kernel"] = [RUNNER, "exec", "--bind", tmp, str(mounted), "hpcdask"]
        envs["kernel"] = None
    ns = [1] if args.quick else [1, 2, 4]  # quick: each image start mounts the .sif
    reps = 2 if args.quick else 5
    variants = list(prefixes)
    runs: dict[str, dict[str, list[dict]]] = {v: {str(n): [] for n in ns} for v in variants}
    errors = []
    for v in variants:  # warm-up, not recorded: page cache, the runner's first start
        with contextlib.suppress(Exception):
            schedfile_cluster(prefixes[v], 1, tmp, v, env=envs[v], bench_client=False)
    for n in ns:
        for r, v in stats.interleave(variants, reps):
            try:
                res = schedfile_cluster(prefixes[v], n, tmp, v, env=envs[v], bench_client=False)
                log(f"ready {v:9s} n={n} rep {r}: {res['ready_s']:.2f}s")
            except Exception as e:  # one failed run is recorded, the rest go on
                errors.append(str(e)[:400])
                res = {"ready_s": float("nan"), "error": str(e)[:400]}
                log(f"ready {v} n={n} rep {r} FAILED: {e}")
            runs[v][str(n)].append(res)
    return {"workers": ns, "reps": reps, "variants": variants, "runs": runs, "errors": errors,
            "bare": {k: v for k, v in bare.items() if k != "env"},
            "summary": {v: {str(n): stats.summarize(ok([x["ready_s"] for x in runs[v][str(n)]]))
                            for n in ns} for v in variants},
            "kernel_mount": None if mounted is not None else f"not measured: {why}",
            "ratios": {f"{v}/bare": {str(n): pair(runs[v][str(n)], runs["bare"][str(n)],
                                                  "ready_s") for n in ns}
                       for v in variants if v != "bare"}}
