#!/usr/bin/env python
"""hpcdask benchmarks: every figure a ratio against its alternative, measured in the same run.

    .venv/bin/python bench/run.py [--quick] [--only SECTION,...] [--image PATH] [--out DIR]

Sections (each interleaves its variants A/B/A/B and repeats them; see bench/README.md):
  ready        time to ready, scheduler + N workers: image (runner) vs bare venv vs LocalCluster
  cluster      time to ready on the Slurm test cluster (sbatch all-in-one, 3 nodes over ib0)
  throughput   tiny tasks per second: hpcdask TLS vs --no-tls vs plain distributed.LocalCluster
  transfer     worker-to-worker bandwidth node1 -> node2 over ib0 vs raw TCP between them
  workloads    hyperband vs RandomizedSearchCV, joblib-dask gridsearch vs sequential,
               the default workload in the image vs the bare venv
and, from what was measured, a scaling model at 100 and 1000 workers (an extrapolation).

Writes bench/results/latest.json, latest.md and PNG plots. Benchmarks, not tests: nothing
here passes or fails on seconds. A section that cannot run (no root, no Slurm, no image)
is recorded with the reason and the others go on. Needs root for the cluster sections; it
brings the test cluster up if it is down and takes it down again at the end (a cluster that
was already up is left up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import analysis as A  # noqa: E402

VENV = Path(sys.prefix)
HPCDASK = VENV / "bin" / "hpcdask"
RUNNER = REPO / "tests" / "cluster" / "bin" / "apptainer"
CLUSTER_SH = REPO / "tests" / "cluster" / "cluster.sh"
IMAGE_PY = REPO / "tests" / "cluster" / "image.py"
ALL_IN_ONE = REPO / "jobscripts" / "slurm" / "dask-cluster.sbatch"
BARE_EXEC = HERE / "bare-exec"
# Images the bench runs from, hard links of tests/cluster/image.py's cache (outside the repo).
BENCH_CACHE = Path(os.environ.get("HPCDASK_BENCH_CACHE", "/var/cache/hpcdask-bench"))
SECTIONS = ("ready", "cluster", "throughput", "transfer", "workloads")

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"bench [{time.perf_counter() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A section (or part) cannot run here; the message says why."""


def inc(x):
    return x + 1


def _cpu():
    import time as _t
    return _t.process_time()


def _loop_cpu():
    import time as _t
    return _t.thread_time()


def _last_transfer(dask_worker):
    e = list(dask_worker.transfer_incoming_log)[-1]
    return {"duration": e["duration"], "total": e["total"], "who": e["who"]}


# --- processes ----------------------------------------------------------------------------------

def env_clean() -> dict[str, str]:
    """This environment without hpcdask/Dask settings, so every variant runs the defaults."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("HPCDASK_", "DASK_")) or k == "HPCDASK_TEST_CACHE"}


def spawn(cmd, logfile: Path, env=None, netns: str | None = None, cwd=None) -> subprocess.Popen:
    """A child in its own session (so it and its children stop together), output to logfile."""
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    f = open(logfile, "ab")
    try:
        return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env or env_clean(), cwd=cwd)
    finally:
        f.close()


def stop(procs, timeout: float = 20) -> None:
    """SIGTERM each child's process group (ours: start_new_session), SIGKILL what is left."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        # leftovers of a group whose leader is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(line.strip() for line in lines[-n:])


def wait_file(path: Path, procs, timeout: float, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what} exited {p.returncode} before writing {path.name}: "
                                   f"{tail(logfile)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} wrote no {path.name} within {timeout}s: {tail(logfile)}")
        time.sleep(0.02)


def private_dir(parent: Path, prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    d.chmod(0o700)
    return d


# --- setup: image and cluster -------------------------------------------------------------------

class Setup:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self._image: str | Exception | None = None
        self.image_info: dict = {}
        self.cluster_state: str | None = None  # None: not tried; "up"/"started"/error text
        self._cluster_env: dict | None = None

    def image(self) -> str:
        """The test image sandbox, pinned for this run; raises Skip.

        The image of the current sources if tests/cluster/image.py has it cached (else it is
        built, up to --image-timeout; with --quick the newest cached image is used instead and
        recorded as stale). The chosen image is hard-linked into BENCH_CACHE first, so another
        build pruning the shared cache cannot remove it mid-run.
        """
        if isinstance(self._image, Exception):
            raise self._image
        if self._image:
            return self._image
        try:
            self._image = self._find_image()
            self.image_info["path"] = self._image
            return self._image
        except subprocess.TimeoutExpired:
            self._image = Skip(f"image build took longer than {self.args.image_timeout}s")
            raise self._image from None
        except Skip as e:
            self._image = e
            raise
        except Exception as e:
            self._image = Skip(f"image: {type(e).__name__}: {e}")
            raise self._image from None

    def _find_image(self) -> str:
        if self.args.image:
            self.image_info = {"source": "--image"}
            path = Path(self.args.image)
            if not (path / "opt" / "hpcdask").is_dir():
                raise Skip(f"{path} is not an hpcdask image sandbox")
            return str(path)
        if not shutil.which("bwrap"):
            raise Skip("bubblewrap (bwrap) is not installed: no image runner "
                       "(bash tests/setup-host.sh installs it)")
        sys.path.insert(0, str(IMAGE_PY.parent))
        import image as imagepy

        t0 = time.perf_counter()
        cache = imagepy.DEFAULT_CACHE
        base = imagepy.build_base(cache)
        key = imagepy.input_key(imagepy.parse_def(imagepy.DEFFILE.read_text()), imagepy.DEFFILE,
                                base, REPO)[:16]
        mine = BENCH_CACHE / f"image-{key}"
        shared = cache / f"image-{key}"
        info = {"key": key, "current_sources": True}
        if mine.is_dir():
            info["source"] = f"bench cache {BENCH_CACHE}"
        else:
            if not (shared.is_dir() and (cache / f"image-{key}.json").exists()):
                if self.args.quick:
                    done = sorted(cache.glob("image-*.json"), key=lambda p: p.stat().st_mtime)
                    done = [d for d in done if d.with_suffix("").is_dir()]
                    if not done:
                        raise Skip("no test image cached and --quick does not build one "
                                   "(make image, or run the full bench once)")
                    shared = done[-1].with_suffix("")
                    mine = BENCH_CACHE / shared.name
                    info.update(key=shared.name[len("image-"):], current_sources=False)
                    log(f"image: the current sources' image is not cached; --quick uses the "
                        f"newest cached one, {shared.name} (stale)")
                else:
                    log("image: python tests/cluster/image.py build (not cached: builds)")
                    proc = subprocess.run([sys.executable, str(IMAGE_PY), "build"],
                                          capture_output=True, text=True,
                                          timeout=self.args.image_timeout,
                                          stdin=subprocess.DEVNULL)
                    if proc.returncode != 0:
                        raise Skip(f"image build failed (exit {proc.returncode}): "
                                   f"{' / '.join(proc.stderr.strip().splitlines()[-3:])}")
                    shared = Path(proc.stdout.strip().splitlines()[-1])
                    mine = BENCH_CACHE / shared.name
            if not mine.is_dir():
                BENCH_CACHE.mkdir(parents=True, exist_ok=True)
                for old in BENCH_CACHE.glob("image-*"):
                    shutil.rmtree(old, ignore_errors=True)
                part = BENCH_CACHE / f".{mine.name}.partial"
                shutil.rmtree(part, ignore_errors=True)
                subprocess.run(["cp", "-al", str(shared), str(part)], check=True)
                part.rename(mine)
            info["source"] = f"{shared} (hard-linked into {BENCH_CACHE})"
        info["lookup_or_build_s"] = round(time.perf_counter() - t0, 1)
        self.image_info = info
        return str(mine)

    def cluster_env(self) -> dict[str, str]:
        """The Slurm test cluster's client environment, bringing the cluster up if needed."""
        if self._cluster_env is not None:
            return self._cluster_env
        if self.cluster_state not in (None, "up", "started"):
            raise Skip(self.cluster_state)
        try:
            if os.geteuid() != 0:
                raise Skip("needs root (network namespaces, slurmd)")
            if not shutil.which("slurmctld"):
                raise Skip("Slurm is not installed (make cluster-deps)")
            was_up = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True,
                                    timeout=60).returncode == 0
            if not was_up:
                log("cluster: tests/cluster/cluster.sh up")
                self.cluster_state = "starting"
                proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True,
                                      text=True, timeout=300, stdin=subprocess.DEVNULL)
                if proc.returncode != 0:
                    raise Skip(f"cluster.sh up failed: "
                               f"{' / '.join(proc.stderr.strip().splitlines()[-3:])}")
            self.cluster_state = "up" if was_up else "started"
            out = subprocess.run(["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            env = env_clean()
            for line in out.splitlines():
                if line.startswith("export "):
                    k, _, v = line[len("export "):].partition("=")
                    env[k] = shlex.split(v)[0] if v else ""
            self._cluster_env = env
            return env
        except Skip as e:
            if self.cluster_state != "starting":
                self.cluster_state = str(e)
            raise
        except (subprocess.SubprocessError, OSError) as e:
            self.cluster_state = f"cluster setup failed: {e}"
            raise Skip(self.cluster_state) from None

    def teardown(self) -> None:
        if self.cluster_state in ("started", "starting"):
            log("cluster: tests/cluster/cluster.sh down (this run started it)")
            subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=300,
                           stdin=subprocess.DEVNULL)
            self.cluster_state = "stopped again"


# --- section: time to ready on loopback ---------------------------------------------------------

def ready_schedfile(mode: str, n: int, tmp: Path, image: str | None, idle_s: float = 0) -> dict:
    """Scheduler + n workers from `hpcdask scheduler/worker` (bare venv or image), on lo, TLS.

    Timed like the jobscripts do it: start the scheduler, start the workers once its file is
    there, until the scheduler has n workers registered (seen by a client).
    """
    from hpcdask import launch

    d = private_dir(tmp, f"ready-{mode}-")
    f = d / "scheduler.json"
    logfile = d / "roles.log"
    prefix = ([HPCDASK] if mode == "bare"
              else [RUNNER, "exec", "--bind", d, image, "hpcdask"])
    procs = []
    client = None
    try:
        t0 = time.perf_counter()
        procs.append(spawn([*prefix, "scheduler", "--scheduler-file", f, "--interface", "lo",
                            "--dashboard", "off"], logfile))
        wait_file(f, procs, 120, f"{mode} scheduler", logfile)
        t_sched = time.perf_counter() - t0
        for i in range(n):
            procs.append(spawn([*prefix, "worker", "--scheduler-file", f, "--interface", "lo",
                                "--nthreads", "1", "--memory-limit", "1GiB", "--name", f"w{i}"],
                               logfile))
        client = launch.connect(f, check=False)
        cpu0 = client.run_on_scheduler(_cpu)
        client.wait_for_workers(n, timeout=180)
        t_ready = time.perf_counter() - t0
        cpu1 = client.run_on_scheduler(_cpu)
        out = {"ready_s": t_ready, "scheduler_s": t_sched, "join_cpu_s": (cpu1 - cpu0) / n}
        if idle_s:
            time.sleep(idle_s)
            cpu2 = client.run_on_scheduler(_cpu)
            out["idle_cpu_rate"] = (cpu2 - cpu1) / idle_s  # CPU s per s, n workers idle
        return out
    except Exception as e:
        raise RuntimeError(f"{mode} n={n}: {e}: {tail(logfile)}") from None
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        stop(procs)
        shutil.rmtree(d, ignore_errors=True)


def ready_local(n: int, tmp: Path) -> dict:
    """hpcdask's embedded LocalCluster (TLS on loopback) in a fresh Python, until n workers."""
    d = private_dir(tmp, "ready-local-")
    logfile = d / "local.log"
    t0 = time.time()
    p = spawn([sys.executable, __file__, "_local_ready", str(n)], logfile)
    try:
        p.wait(timeout=180)
    except subprocess.TimeoutExpired:
        stop([p])
        raise RuntimeError(f"local n={n}: no READY within 180 s: {tail(logfile)}") from None
    m = re.search(r"^READY ([\d.]+)$", logfile.read_text(errors="replace"), re.M)
    if not m:
        raise RuntimeError(f"local n={n} (exit {p.returncode}): {tail(logfile)}")
    shutil.rmtree(d, ignore_errors=True)
    return {"ready_s": float(m.group(1)) - t0}


def _local_ready_child(n: int) -> None:
    from hpcdask import launch

    with launch.local_cluster(n_workers=n, threads_per_worker=1, tls=True,
                              memory_limit="1GiB") as cluster, launch.Client(cluster) as c:
        c.wait_for_workers(n, timeout=180)
        print(f"READY {time.time()}", flush=True)


def section_ready(args, setup: Setup, tmp: Path) -> dict:
    ns = [1, 2] if args.quick else [1, 2, 4, 8]
    reps = 2 if args.quick else 3
    variants = ["bare", "container", "local"]
    notes = {}
    try:
        image = setup.image()
    except Skip as e:
        image = None
        variants.remove("container")
        notes["container"] = str(e)
    runs: dict[str, dict[int, list[dict]]] = {v: {n: [] for n in ns} for v in variants}
    errors = []
    for v in ([] if args.quick else variants):  # warm-up, not recorded: page cache
        with contextlib.suppress(Exception):
            ready_local(1, tmp) if v == "local" else ready_schedfile(v, 1, tmp, image)
    for n in ns:
        for r, v in A.interleave(variants, reps):
            try:
                if v == "local":
                    res = ready_local(n, tmp)
                else:
                    idle = 3.0 if (n in (ns[0], ns[-1]) and r == 0 and v != "local") else 0
                    res = ready_schedfile(v, n, tmp, image, idle_s=idle)
                runs[v][n].append(res)
                log(f"ready {v:9s} n={n} rep {r}: {res['ready_s']:.2f}s")
            except Exception as e:  # one failed run is recorded, the rest go on
                errors.append(str(e)[:400])
                runs[v][n].append({"ready_s": float("nan"), "error": str(e)[:400]})
                log(f"ready {v} n={n} rep {r} FAILED: {e}")
    out = {"workers": ns, "reps": reps, "variants": variants, "runs": runs, "notes": notes,
           "errors": errors, "summary": {}, "ratios": {}}
    for v in variants:
        out["summary"][v] = {n: A.summarize(_ok([x["ready_s"] for x in runs[v][n]])) for n in ns}
    for a, b in (("container", "bare"), ("local", "bare")):
        if a in variants:
            out["ratios"][f"{a}/{b}"] = {n: _pair(runs[a][n], runs[b][n], "ready_s") for n in ns}
    return out


def _ok(xs):
    return [x for x in xs if x == x]  # drop NaN


def _pair(a_runs, b_runs, key):
    pairs = [(x[key], y[key]) for x, y in zip(a_runs, b_runs)
             if x[key] == x[key] and y[key] == y[key]]
    return A.paired_ratios([p[0] for p in pairs], [p[1] for p in pairs])


# --- section: time to ready on the Slurm test cluster -------------------------------------------

def slurm_job(env, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, env=env).stdout
        rec = dict(re.findall(r"(\w+)=(\S*)", out))
        if rec.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return rec
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env, capture_output=True)
            raise RuntimeError(f"job {job_id} not done after {timeout}s ({rec.get('JobState')})")
        time.sleep(0.3)


def _slurm_time(s: str) -> float | None:
    try:
        return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None


def cluster_job(mode: str, env: dict, image: str | None, tmp: Path, nodes: int) -> dict:
    wd = private_dir(tmp, f"job-{mode}-")
    shared = private_dir(wd, "clusters-")
    script = wd / "ready.py"
    script.write_text("from distributed import get_client\n"
                      "print('client sees', len(get_client().scheduler_info(n_workers=-1)"
                      "['workers']), 'workers')\n")
    jenv = {**env, "HPCDASK_SHARED_DIR": str(shared), "HPCDASK_STOP_TIMEOUT": "20",
            "HPCDASK_READY_TIMEOUT": "150s"}
    if mode == "container":
        jenv["HPCDASK_IMAGE"] = image
    else:
        jenv.update(HPCDASK_IMAGE=str(VENV), HPCDASK_APPTAINER=str(BARE_EXEC))
    t_submit = time.time()
    proc = subprocess.run(["sbatch", "--parsable", f"-N{nodes}", "--time=5",
                           f"--output={wd}/slurm-%j.out", f"--error={wd}/slurm-%j.err",
                           str(ALL_IN_ONE), str(script)], capture_output=True, text=True, env=jenv,
                          cwd=wd, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    rec = slurm_job(env, job, 240)
    out = (wd / f"slurm-{job}.out").read_text(errors="replace")
    err = (wd / f"slurm-{job}.err").read_text(errors="replace")
    m_at = re.search(r"worker\(s\) ready after [\d.]+s \(at ([\d.]+)\)", out)
    m_in = re.search(r"hpcdask-job: (\d+) worker\(s\) ready after ([\d.]+)s in the job", err)
    m_s = re.search(r"scheduler up after ([\d.]+)s", err)
    if not (m_at and m_in):
        raise RuntimeError(f"job {job} {rec.get('JobState')} {rec.get('ExitCode')}: "
                           f"{' / '.join(err.strip().splitlines()[-4:])}")
    start, submit = _slurm_time(rec.get("StartTime")), _slurm_time(rec.get("SubmitTime"))
    shutil.rmtree(wd, ignore_errors=True)
    return {"job": job, "workers": int(m_in.group(1)),
            "in_job_ready_s": float(m_in.group(2)),
            "scheduler_in_job_s": float(m_s.group(1)) if m_s else None,
            "submit_to_ready_s": float(m_at.group(1)) - t_submit,
            "queue_wait_s": (start - submit) if start and submit else None,
            "state": rec.get("JobState")}


def section_cluster(args, setup: Setup, tmp: Path) -> dict:
    env = setup.cluster_env()
    image = setup.image()
    reps = 1 if args.quick else 3
    nodes = 3
    runs: dict[str, list[dict]] = {"container": [], "bare": []}
    errors = []
    for r, v in A.interleave(["container", "bare"], reps):
        try:
            res = cluster_job(v, env, image, tmp, nodes)
            log(f"cluster {v:9s} rep {r}: in job {res['in_job_ready_s']:.1f}s, "
                f"from sbatch {res['submit_to_ready_s']:.1f}s")
        except Exception as e:
            errors.append(str(e)[:400])
            res = {"in_job_ready_s": float("nan"), "submit_to_ready_s": float("nan"),
                   "error": str(e)[:400]}
            log(f"cluster {v} rep {r} FAILED: {e}")
        runs[v].append(res)
    if not any(x["in_job_ready_s"] == x["in_job_ready_s"] for x in runs["container"]):
        raise Skip(f"no cluster job reached ready: {errors[:1]}")
    return {"nodes": nodes, "workers": nodes, "reps": reps, "runs": runs, "errors": errors,
            "summary": {v: {k: A.summarize(_ok([x[k] for x in runs[v]]))
                            for k in ("in_job_ready_s", "submit_to_ready_s")} for v in runs},
            "ratio_in_job": _pair(runs["container"], runs["bare"], "in_job_ready_s"),
            "ratio_submit": _pair(runs["container"], runs["bare"], "submit_to_ready_s")}


# --- section: scheduler throughput --------------------------------------------------------------

def section_throughput(args, setup: Setup, tmp: Path) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from hpcdask import launch

    n = 1000 if args.quick else 5000
    reps = 2 if args.quick else 3
    clusters, clients = {}, {}
    try:
        clusters["hpcdask TLS"] = launch.local_cluster(2, 1, tls=True, memory_limit="2GiB")
        clusters["hpcdask --no-tls"] = launch.local_cluster(2, 1, tls=False, memory_limit="2GiB")
        clusters["distributed.LocalCluster"] = LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", memory_limit="2GiB",
            dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING)
        for k, c in clusters.items():
            clients[k] = Client(c)
            clients[k].gather(clients[k].map(inc, range(300), pure=False))  # warm-up
        runs: dict[str, list[dict]] = {k: [] for k in clusters}
        for r, v in A.interleave(list(clusters), reps):
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
            "summary": {k: {m: A.summarize([x[m] for x in runs[k]])
                            for m in ("tasks_per_s", "scheduler_cpu_per_task_s")} for k in keys},
            "ratios": {"TLS/no-TLS": _pair(runs["hpcdask TLS"], runs["hpcdask --no-tls"],
                                           "tasks_per_s"),
                       "hpcdask TLS/LocalCluster": _pair(runs["hpcdask TLS"],
                                                         runs["distributed.LocalCluster"],
                                                         "tasks_per_s"),
                       "no-TLS/LocalCluster": _pair(runs["hpcdask --no-tls"],
                                                    runs["distributed.LocalCluster"],
                                                    "tasks_per_s")}}


# --- section: transfer over ib0 -----------------------------------------------------------------

NODE_ADDR = {1: "10.253.71.11", 2: "10.253.71.12", 3: "10.253.71.13"}


def start_node_cluster(tls: bool, image: str, env: dict, tmp: Path):
    """Scheduler on node3, worker 'a' on node1, worker 'b' on node2, every role in the image."""
    from hpcdask import launch

    d = private_dir(tmp, f"xfer-{'tls' if tls else 'plain'}-")
    f = d / "scheduler.json"
    logfile = d / "roles.log"
    prefix = [RUNNER, "exec", "--bind", d, image, "hpcdask"]
    flag = [] if tls else ["--no-tls"]
    procs = [spawn([*prefix, "scheduler", "--scheduler-file", f, "--interface", "ib0",
                    "--dashboard", "off", *flag], logfile, env=env, netns="hpcd-node3")]
    try:
        wait_file(f, procs, 120, "scheduler on node3", logfile)
        for node, name in ((1, "a"), (2, "b")):
            procs.append(spawn([*prefix, "worker", "--scheduler-file", f, "--interface", "ib0",
                                "--nthreads", "1", "--memory-limit", "4GiB", "--name", name, *flag],
                               logfile, env=env, netns=f"hpcd-node{node}"))
        client = launch.connect(f, tls=tls, check=False)
        client.wait_for_workers(2, timeout=120)
        addr = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        return client, procs, addr, d
    except Exception as e:
        stop(procs)
        raise RuntimeError(f"{e}: {tail(logfile)}") from None


def dask_transfer(client, addr, nbytes: int) -> dict:
    import numpy as np
    from distributed import wait

    x = client.submit(np.ones, nbytes // 8, workers=[addr["a"]], pure=False)
    wait(x)
    t0 = time.perf_counter()
    y = client.submit(len, x, workers=[addr["b"]], allow_other_workers=False, pure=False)
    assert y.result() == nbytes // 8
    wall = time.perf_counter() - t0
    entry = client.run(_last_transfer, workers=[addr["b"]])[addr["b"]]
    del x, y
    return {"bytes": entry["total"], "transfer_s": entry["duration"],
            "bandwidth": entry["total"] / entry["duration"], "task_wall_s": wall}


def raw_tcp(nbytes: int, tmp: Path) -> dict:
    d = private_dir(tmp, "raw-")
    portfile = d / "port"
    rlog, slog = d / "recv.log", d / "send.log"
    recv = spawn([sys.executable, HERE / "rawtcp.py", "recv", NODE_ADDR[2], portfile, nbytes],
                 rlog, netns="hpcd-node2")
    send = None
    try:
        wait_file(portfile, [recv], 30, "raw TCP receiver", rlog)
        send = spawn([sys.executable, HERE / "rawtcp.py", "send", NODE_ADDR[2],
                      portfile.read_text(), nbytes], slog, netns="hpcd-node1")
        recv.wait(timeout=120)
        send.wait(timeout=30)
        res = json.loads(rlog.read_text().strip().splitlines()[-1])
        if res["bytes"] != nbytes:
            raise RuntimeError(f"raw TCP got {res['bytes']} of {nbytes} bytes")
        return {"bytes": res["bytes"], "transfer_s": res["seconds"], "bandwidth": res["bandwidth"]}
    finally:
        stop([recv, send])
        shutil.rmtree(d, ignore_errors=True)


def section_transfer(args, setup: Setup, tmp: Path) -> dict:
    env = setup.cluster_env()
    image = setup.image()
    env = {k: v for k, v in env.items()}
    sizes = [50_000_000] if args.quick else [50_000_000, 400_000_000]
    reps = 2 if args.quick else 3
    sets = {}
    try:
        for tls, name in ((True, "dask TLS (as deployed)"), (False, "dask --no-tls")):
            sets[name] = start_node_cluster(tls, image, env, tmp)
        variants = [*sets, "raw TCP"]
        runs = {s: {v: [] for v in variants} for s in sizes}
        for size in sizes:
            for name, (client, _, addr, _) in sets.items():
                dask_transfer(client, addr, size)  # warm-up: connections, imports
            for r, v in A.interleave(variants, reps):
                if v == "raw TCP":
                    res = raw_tcp(size, tmp)
                else:
                    client, _, addr, _ = sets[v]
                    res = dask_transfer(client, addr, size)
                runs[size][v].append(res)
                log(f"transfer {size / 1e6:.0f} MB {v:24s} rep {r}: "
                    f"{res['bandwidth'] / 1e6:7.0f} MB/s")
    finally:
        for client, procs, _, d in sets.values():
            with contextlib.suppress(Exception):
                client.close(timeout=10)
            stop(procs)
            shutil.rmtree(d, ignore_errors=True)
    out = {"path": "worker on node1 (hpcd-node1) -> worker on node2, over ib0 veths and the bridge",
           "sizes": sizes, "reps": reps, "runs": {str(s): r for s, r in runs.items()},
           "summary": {}, "ratios": {}}
    for s in sizes:
        out["summary"][str(s)] = {v: A.summarize([x["bandwidth"] for x in runs[s][v]])
                                  for v in variants}
        out["ratios"][str(s)] = {
            "TLS/raw": _pair(runs[s]["dask TLS (as deployed)"], runs[s]["raw TCP"], "bandwidth"),
            "no-TLS/raw": _pair(runs[s]["dask --no-tls"], runs[s]["raw TCP"], "bandwidth"),
            "TLS/no-TLS": _pair(runs[s]["dask TLS (as deployed)"], runs[s]["dask --no-tls"],
                                "bandwidth")}
    return out


# --- section: workloads -------------------------------------------------------------------------

@contextlib.contextmanager
def capture_fits():
    """Record the HyperbandSearchCV / RandomizedSearchCV objects the hyperband workload fits."""
    import dask_ml.model_selection as dms
    import sklearn.model_selection as skms

    seen = {"hb": [], "rs": []}
    originals = {}
    for key, cls in (("hb", dms.HyperbandSearchCV), ("rs", skms.RandomizedSearchCV)):
        orig = cls.__dict__.get("fit")
        originals[cls] = orig
        real = cls.fit

        def fit(self, *a, _real=real, _key=key, **k):
            seen[_key].append(self)
            return _real(self, *a, **k)
        cls.fit = fit
    try:
        yield seen
    finally:
        for cls, orig in originals.items():
            if orig is None:
                del cls.fit
            else:
                cls.fit = orig


def hyperband_curves(hb, rs, epochs: int, blocks: int):
    import numpy as np

    hist = sorted(hb.history_, key=lambda h: h["elapsed_wall_time"])
    spent, hx, hy, best = {}, [], [], -np.inf
    for h in hist:
        spent[h["model_id"]] = h["partial_fit_calls"]
        best = max(best, h["score"])
        hx.append(sum(spent.values()))
        hy.append(float(best))
    scores = rs.cv_results_["mean_test_score"]
    rx = [(i + 1) * epochs * blocks for i in range(len(scores))]
    ry = [float(v) for v in np.maximum.accumulate(scores)]
    return hx, hy, rx, ry


def run_workload_inprocess(client, name, size, seed, tmp: Path) -> dict:
    from hpcdask import workloads

    out = private_dir(tmp, f"wl-{name}-")
    path = workloads.execute(client, name, size, seed, out)
    metrics = json.loads(Path(path).read_text())
    shutil.rmtree(out, ignore_errors=True)
    return metrics


def run_workload_cli(mode: str, image: str | None, tmp: Path) -> dict:
    out = tmp / f"wlcli-{mode}-{time.time_ns()}"
    cmd = ([HPCDASK] if mode == "bare" else [RUNNER, "exec", image, "hpcdask"])
    logfile = tmp / f"{out.name}.log"
    t0 = time.perf_counter()
    p = spawn([*cmd, "run", "--output", out], logfile, cwd=tmp)
    try:
        rc = p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        stop([p])
        raise RuntimeError(f"{mode} hpcdask run took over 600 s") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{mode} hpcdask run exit {rc}: {tail(logfile)}")
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "workload_s": m["durations"]["total"], "score": m["score"],
            "image": m["roles"]["scheduler"].get("image") if isinstance(m.get("roles"), dict)
            else None}


def section_workloads(args, setup: Setup, tmp: Path) -> dict:
    from hpcdask import launch

    out: dict = {"notes": {}}
    seeds = [0] if args.quick else [0, 1, 2]
    grid_reps = 1 if args.quick else 3
    with launch.local_cluster(2, 1, tls=True, memory_limit="4GiB") as cluster, \
            launch.Client(cluster) as client:
        # Hyperband vs RandomizedSearchCV: partial fits to reach the score both reach.
        hb_runs = []
        try:
            for seed in seeds:
                with capture_fits() as seen:
                    m = run_workload_inprocess(client, "hyperband", "small", seed, tmp)
                hb, rs = seen["hb"][-1], seen["rs"][-1]
                epochs = m["randomized_search"]["epochs_per_model"]
                blocks = m["data"]["max_iter"] // epochs
                hx, hy, rx, ry = hyperband_curves(hb, rs, epochs, blocks)
                target = min(hy[-1], ry[-1])
                hf, rf = A.fits_to_reach(hx, hy, target), A.fits_to_reach(rx, ry, target)
                d = m["durations"]
                run = {"seed": seed, "target_validation_score": target,
                       "hyperband_fits_to_target": hf, "randomized_fits_to_target": rf,
                       "hyperband_total_fits": m["hyperband"]["partial_fit_calls"],
                       "randomized_total_fits": m["randomized_search"]["partial_fit_calls"],
                       "hyperband_test_score": m["score"],
                       "randomized_test_score": m["baseline_score"],
                       "hyperband_s": d.get("HyperbandSearchCV on the cluster"),
                       "randomized_s": d.get("RandomizedSearchCV on one machine (same budget)"),
                       "curves": {"hyperband": [hx, hy], "randomized": [rx, ry]}}
                hb_runs.append(run)
                log(f"hyperband seed {seed}: fits to {target:.4f}: hyperband {hf}, "
                    f"randomized {rf}")
            out["hyperband"] = {
                "size": "small", "runs": hb_runs,
                "fits_ratio_randomized_over_hyperband": A.paired_ratios(
                    [r["randomized_fits_to_target"] for r in hb_runs],
                    [r["hyperband_fits_to_target"] for r in hb_runs]),
                "time_ratio_hyperband_over_randomized": A.paired_ratios(
                    [r["hyperband_s"] for r in hb_runs], [r["randomized_s"] for r in hb_runs])}
        except Exception as e:
            out["hyperband"] = {"skipped": f"{type(e).__name__}: {e}"[:400]}
            log(f"hyperband FAILED: {e}")
        # Gridsearch: joblib's dask backend on 2 workers vs sequential scikit-learn.
        try:
            gs = []
            size = "small" if args.quick else "medium"
            for r in range(grid_reps):
                m = run_workload_inprocess(client, "gridsearch", size, r, tmp)
                d = m["durations"]
                gs.append({"sequential_s": d["sequential scikit-learn (baseline)"],
                           "joblib_dask_s": d["GridSearchCV through joblib's dask backend"],
                           "dask_ml_s": d.get("dask-ml GridSearchCV"),
                           "same_best_params": m["joblib_dask"]["same_best_params"],
                           "fits": m["data"]["fits"]})
                log(f"gridsearch {size} rep {r}: sequential {gs[-1]['sequential_s']:.1f}s, "
                    f"joblib-dask {gs[-1]['joblib_dask_s']:.1f}s")
            out["gridsearch"] = {"size": size, "workers": 2, "runs": gs,
                                 "speedup": A.paired_ratios([x["sequential_s"] for x in gs],
                                                            [x["joblib_dask_s"] for x in gs]),
                                 "speedup_dask_ml": A.paired_ratios(
                                     [x["sequential_s"] for x in gs],
                                     [x["dask_ml_s"] for x in gs])}
        except Exception as e:
            out["gridsearch"] = {"skipped": f"{type(e).__name__}: {e}"[:400]}
            log(f"gridsearch FAILED: {e}")
    # The default workload end to end: hpcdask run in the image vs from the bare venv.
    try:
        image = setup.image()
        reps = 1 if args.quick else 3
        runs = {"container": [], "bare": []}
        for r, v in A.interleave(["container", "bare"], reps):
            res = run_workload_cli(v, image, tmp)
            runs[v].append(res)
            log(f"default workload {v:9s} rep {r}: {res['wall_s']:.1f}s "
                f"(workload {res['workload_s']:.1f}s)")
        out["default_workload"] = {
            "workload": "pipeline (default), size small, LocalCluster sized to the machine",
            "runs": runs,
            "summary": {v: {k: A.summarize([x[k] for x in runs[v]])
                            for k in ("wall_s", "workload_s")} for v in runs},
            "ratio_wall": _pair(runs["container"], runs["bare"], "wall_s"),
            "ratio_workload": _pair(runs["container"], runs["bare"], "workload_s")}
    except Exception as e:
        out["default_workload"] = {"skipped": f"{type(e).__name__}: {e}"[:400]}
        log(f"default workload container vs bare: not measured: {e}")
    return out


# --- headlines, model, plots --------------------------------------------------------------------

def headlines(res: dict) -> list[dict]:
    S = res["sections"]
    h = []

    def skipped(figure, sec):
        h.append({"figure": figure, "skipped": sec.get("skipped", "failed")})

    r = S.get("ready", {})
    if r.get("summary"):
        for n in r["workers"]:
            if "container" in r["summary"]:
                h.append({"figure": f"time to ready, scheduler + {n} worker(s), loopback TLS",
                          "a": "image (runner)", "b": "bare venv", "unit": "s",
                          "a_value": r["summary"]["container"][n],
                          "b_value": r["summary"]["bare"][n],
                          "ratio": r["ratios"]["container/bare"][n]})
        for n in r["workers"]:
            h.append({"figure": f"time to ready, {n} worker(s): LocalCluster vs scheduler file",
                      "a": "LocalCluster", "b": "scheduler file (bare)", "unit": "s",
                      "a_value": r["summary"]["local"][n], "b_value": r["summary"]["bare"][n],
                      "ratio": r["ratios"]["local/bare"][n]})
    else:
        skipped("time to ready (loopback)", r)
    c = S.get("cluster", {})
    if c.get("summary"):
        h.append({"figure": f"time to ready, Slurm test cluster, sbatch -N{c['nodes']} "
                            f"all-in-one ({c['workers']} workers over ib0), in the job",
                  "a": "image (runner)", "b": "bare venv", "unit": "s",
                  "a_value": c["summary"]["container"]["in_job_ready_s"],
                  "b_value": c["summary"]["bare"]["in_job_ready_s"], "ratio": c["ratio_in_job"],
                  "note": "from the batch script's start; from sbatch: "
                          f"{A.fmt_value(c['summary']['container']['submit_to_ready_s'], 's')} "
                          f"(image) vs "
                          f"{A.fmt_value(c['summary']['bare']['submit_to_ready_s'], 's')}"})
    else:
        skipped("time to ready (Slurm test cluster)", c)
    t = S.get("throughput", {})
    if t.get("summary"):
        ts = t["summary"]
        h.append({"figure": f"tiny tasks/s ({t['tasks']} x inc, 2 workers x 1 thread)",
                  "a": "hpcdask TLS", "b": "hpcdask --no-tls", "unit": "tasks/s",
                  "a_value": ts["hpcdask TLS"]["tasks_per_s"],
                  "b_value": ts["hpcdask --no-tls"]["tasks_per_s"],
                  "ratio": t["ratios"]["TLS/no-TLS"]})
        h.append({"figure": "tiny tasks/s vs plain Dask",
                  "a": "hpcdask TLS", "b": "distributed.LocalCluster (tcp)", "unit": "tasks/s",
                  "a_value": ts["hpcdask TLS"]["tasks_per_s"],
                  "b_value": ts["distributed.LocalCluster"]["tasks_per_s"],
                  "ratio": t["ratios"]["hpcdask TLS/LocalCluster"],
                  "note": "no-TLS vs LocalCluster: "
                          + A.fmt_ratio(t["ratios"]["no-TLS/LocalCluster"])})
    else:
        skipped("scheduler throughput", t)
    x = S.get("transfer", {})
    if x.get("summary"):
        for s in x["sizes"]:
            xs = {k: _scale(v, 1e-6) for k, v in x["summary"][str(s)].items()}
            h.append({"figure": f"transfer {s / 1e6:.0f} MB node1 -> node2 over ib0",
                      "a": "dask TLS (image)", "b": "raw TCP", "unit": "MB/s",
                      "a_value": xs["dask TLS (as deployed)"], "b_value": xs["raw TCP"],
                      "ratio": x["ratios"][str(s)]["TLS/raw"],
                      "note": f"dask --no-tls: {A.fmt_value(xs['dask --no-tls'], 'MB/s')}, "
                              f"{A.fmt_ratio(x['ratios'][str(s)]['no-TLS/raw'])} of raw"})
    else:
        skipped("transfer over ib0", x)
    w = S.get("workloads", {})
    hb = w.get("hyperband", {})
    if hb.get("runs"):
        runs = hb["runs"]
        h.append({"figure": "hyperband: partial fits to reach the score both searches reach",
                  "a": "RandomizedSearchCV", "b": "HyperbandSearchCV", "unit": "fits",
                  "a_value": A.summarize([r["randomized_fits_to_target"] for r in runs]),
                  "b_value": A.summarize([r["hyperband_fits_to_target"] for r in runs]),
                  "ratio": hb["fits_ratio_randomized_over_hyperband"],
                  "note": "ratio > 1: hyperband needs fewer fits; "
                          f"seeds {[r['seed'] for r in runs]}, size small"})
    else:
        skipped("hyperband vs RandomizedSearchCV", hb or w)
    gs = w.get("gridsearch", {})
    if gs.get("runs"):
        h.append({"figure": f"gridsearch ({gs['size']}, {gs['runs'][0]['fits']} fits): "
                            f"speedup on 2 workers",
                  "a": "sequential scikit-learn", "b": "joblib dask backend", "unit": "s",
                  "a_value": A.summarize([r["sequential_s"] for r in gs["runs"]]),
                  "b_value": A.summarize([r["joblib_dask_s"] for r in gs["runs"]]),
                  "ratio": gs["speedup"], "note": "limit here: 2 cores (2x)"})
    else:
        skipped("gridsearch speedup", gs or w)
    dw = w.get("default_workload", {})
    if dw.get("runs"):
        h.append({"figure": "default workload, `hpcdask run` end to end",
                  "a": "image (runner)", "b": "bare venv", "unit": "s",
                  "a_value": dw["summary"]["container"]["wall_s"],
                  "b_value": dw["summary"]["bare"]["wall_s"], "ratio": dw["ratio_wall"],
                  "note": "workload part alone: " + A.fmt_ratio(dw["ratio_workload"])})
    else:
        skipped("default workload, image vs bare", dw or w)
    return h


def _scale(s: dict, k: float) -> dict:
    out = dict(s)
    for key in ("median", "min", "max", "q1", "q3"):
        if key in out:
            out[key] *= k
    out["values"] = [v * k for v in s.get("values", [])]
    return out


def model_from(res: dict) -> dict:
    r = res["sections"].get("ready", {})
    t = res["sections"].get("throughput", {})
    if not r.get("summary") or not t.get("summary"):
        return {"skipped": "needs the ready and throughput sections"}
    v = "container" if "container" in r["summary"] else "bare"
    runs = r["runs"][v]
    ns = r["workers"]
    pts = [(n, x["ready_s"]) for n in ns for x in runs[n] if x["ready_s"] == x["ready_s"]]
    joins = [x["join_cpu_s"] for x in runs[ns[-1]] if "join_cpu_s" in x]
    # Heartbeat cost: the idle scheduler's extra CPU with many workers over one worker, per
    # extra heartbeat (its own periodic callbacks cancel out).
    hbs = []
    for vv in r["runs"]:
        if vv == "local" or ns[-1] == ns[0]:
            continue
        lo = [x["idle_cpu_rate"] for x in r["runs"][vv][ns[0]] if "idle_cpu_rate" in x]
        hi = [x["idle_cpu_rate"] for x in r["runs"][vv][ns[-1]] if "idle_cpu_rate" in x]
        extra_hb = ns[-1] / A.heartbeat_interval(ns[-1]) - ns[0] / A.heartbeat_interval(ns[0])
        if lo and hi:
            hbs.append(max(0.0, (hi[0] - lo[0]) / extra_hb))
    ts = t["summary"]["hpcdask TLS"]
    m = A.scaling_model(
        ready_one=r["summary"][v][ns[0]]["median"],
        join_cpu=A.quantile(joins, 0.5) if joins else 0.0,
        ready_fit=A.linear_fit([p[0] for p in pts], [p[1] for p in pts]),
        task_cpu=ts["scheduler_cpu_per_task_s"]["median"],
        task_wall=1 / ts["tasks_per_s"]["median"],
        heartbeat_cpu=A.quantile(hbs, 0.5) if hbs else 0.0)
    m["from"] = f"ready: {v} scheduler-file path; throughput: hpcdask TLS"
    return m


def plots(res: dict, outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    S = res["sections"]

    def err(s):
        return [[s["median"] - s["min"]], [s["max"] - s["median"]]]

    r = S.get("ready", {})
    if r.get("summary"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = {"bare": "bare venv, scheduler file",
                  "container": "image (runner), scheduler file",
                  "local": "LocalCluster (bare venv)"}
        for i, v in enumerate(r["variants"]):
            ns = [n for n in r["workers"] if r["summary"][v][n].get("n")]
            med = [r["summary"][v][n]["median"] for n in ns]
            lo = [r["summary"][v][n]["median"] - r["summary"][v][n]["min"] for n in ns]
            hi = [r["summary"][v][n]["max"] - r["summary"][v][n]["median"] for n in ns]
            ax.errorbar([n * (1 + 0.03 * (i - 1)) for n in ns], med, yerr=[lo, hi], marker="o",
                        capsize=3, label=labels[v])
        c = S.get("cluster", {})
        if c.get("summary"):
            for v, mk in (("container", "s"), ("bare", "D")):
                s = c["summary"][v]["in_job_ready_s"]
                if s.get("n"):
                    ax.errorbar([c["workers"]], [s["median"]], yerr=err(s), marker=mk,
                                linestyle="none", capsize=3,
                                label="Slurm test cluster, "
                                      f"{'image' if v == 'container' else 'bare'}"
                                      f" (in job, ib0)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel("seconds until all workers registered")
        ax.set_title("Time to ready (median, min-max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "ready.png", dpi=100)
        plt.close(fig)
        made.append("ready.png")

    t = S.get("throughput", {})
    x = S.get("transfer", {})
    if t.get("summary") or x.get("summary"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        if t.get("summary"):
            ks = list(t["summary"])
            ss = [t["summary"][k]["tasks_per_s"] for k in ks]
            axes[0].bar(range(len(ks)), [s["median"] for s in ss],
                        yerr=[[s["median"] - s["min"] for s in ss],
                              [s["max"] - s["median"] for s in ss]], capsize=4,
                        color=["C0", "C1", "C2"])
            axes[0].set_xticks(range(len(ks)), [k.replace(" ", "\n", 1) for k in ks], fontsize=8)
            axes[0].set_ylabel("tasks per second")
            axes[0].set_title(f"Scheduler throughput, {t['tasks']} tiny tasks")
        if x.get("summary"):
            variants = list(x["summary"][str(x["sizes"][0])])
            width = 0.8 / len(x["sizes"])
            for j, s in enumerate(x["sizes"]):
                ss = [x["summary"][str(s)][v] for v in variants]
                axes[1].bar([i + j * width for i in range(len(variants))],
                            [q["median"] / 1e6 for q in ss], width,
                            yerr=[[(q["median"] - q["min"]) / 1e6 for q in ss],
                                  [(q["max"] - q["median"]) / 1e6 for q in ss]], capsize=4,
                            label=f"{s / 1e6:.0f} MB")
            axes[1].set_xticks([i + width * (len(x["sizes"]) - 1) / 2
                                for i in range(len(variants))],
                               [v.replace(" (", "\n(") for v in variants], fontsize=8)
            axes[1].set_ylabel("MB/s")
            axes[1].set_title("Transfer node1 -> node2 over ib0")
            axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(outdir / "throughput_transfer.png", dpi=100)
        plt.close(fig)
        made.append("throughput_transfer.png")

    w = S.get("workloads", {})
    hb = w.get("hyperband", {})
    ratios = []
    for h in res.get("headlines", []):
        if h.get("ratio") and h["ratio"].get("n") and not h["figure"].startswith("time to ready"):
            ratios.append((h["figure"], h["ratio"]))
    if ratios or hb.get("runs"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        if ratios:
            ys = range(len(ratios))
            med = [q["median"] for _, q in ratios]
            axes[0].barh(ys, med, xerr=[[q["median"] - q["min"] for _, q in ratios],
                                        [q["max"] - q["median"] for _, q in ratios]],
                         capsize=3, color="C0")
            axes[0].axvline(1, color="k", lw=0.8)
            axes[0].set_yticks(list(ys), [_short(f) for f, _ in ratios], fontsize=7)
            axes[0].invert_yaxis()
            axes[0].set_xscale("log")
            axes[0].set_xlabel("ratio A/B (see latest.md for A and B)")
            axes[0].set_title("Ratios (median, min-max)")
            axes[0].grid(alpha=0.3, axis="x")
        if hb.get("runs"):
            run = hb["runs"][0]
            hx, hy = run["curves"]["hyperband"]
            rx, ry = run["curves"]["randomized"]
            axes[1].step(hx, hy, where="post", label="HyperbandSearchCV (cluster)")
            axes[1].step(rx, ry, where="post", label="RandomizedSearchCV (one machine)")
            axes[1].axhline(run["target_validation_score"], color="k", lw=0.6, ls=":",
                            label="score both reach")
            axes[1].set_xlabel("partial fits")
            axes[1].set_ylabel("best validation accuracy so far")
            axes[1].set_title(f"Search, seed {run['seed']}")
            axes[1].legend(fontsize=8, loc="lower right")
            axes[1].grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(outdir / "ratios.png", dpi=100)
        plt.close(fig)
        made.append("ratios.png")

    m = res.get("scaling_model", {})
    if m.get("rows"):
        import numpy as np

        inp = m["inputs"]
        ns = np.unique(np.logspace(0, 3, 40).astype(int))
        full = A.scaling_model(ready_one=inp["ready_one_s"], join_cpu=inp["join_cpu_s"],
                               ready_fit=tuple(inp["ready_fit_s"]), task_cpu=inp["task_cpu_s"],
                               task_wall=inp["task_wall_s"], heartbeat_cpu=inp["heartbeat_cpu_s"],
                               workers=[int(n) for n in ns])["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].fill_between(ns, [q["ready_s"][0] for q in full], [q["ready_s"][1] for q in full],
                             alpha=0.3, label="model range")
        if r.get("summary"):
            v = "container" if "container" in r["summary"] else "bare"
            pts = [(n, r["summary"][v][n]["median"]) for n in r["workers"]
                   if r["summary"][v][n].get("n")]
            axes[0].plot(*zip(*pts), "o", label=f"measured ({v}, this machine)")
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("workers")
        axes[0].set_ylabel("time to ready, s")
        axes[0].legend(fontsize=8)
        axes[1].fill_between(ns, [q["tasks_per_s"][0] for q in full],
                             [q["tasks_per_s"][1] for q in full], alpha=0.3, color="C1",
                             label="model range")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("workers")
        axes[1].set_ylabel("tiny tasks per second")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle("Scaling on paper: an extrapolation from this run's measurements")
        fig.tight_layout()
        fig.savefig(outdir / "scaling_model.png", dpi=100)
        plt.close(fig)
        made.append("scaling_model.png")
    return made


def _short(s: str) -> str:
    return s if len(s) <= 48 else s[:46] + "..."


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (< 3 min)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--image", default=os.environ.get("HPCDASK_BENCH_IMAGE"),
                   help="image sandbox to use instead of building the test image")
    p.add_argument("--image-timeout", type=float, default=900,
                   help="seconds allowed for the (cached) test image build")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; known: {', '.join(SECTIONS)}")

    import warnings

    import dask
    import distributed
    import psutil
    from distributed.versions import VersionMismatchWarning

    # The bench's client (host venv) talks to roles in the image, whose Python patch level
    # differs; the roles themselves are identity-checked by hpcdask.
    warnings.simplefilter("ignore", VersionMismatchWarning)

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hpcdask-bench-", dir="/tmp"))
    tmp.chmod(0o700)
    res: dict = {"meta": {"quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "host": platform.node(), "cpus": os.cpu_count(),
                          "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                          "python": platform.python_version(), "dask": dask.__version__,
                          "distributed": distributed.__version__,
                          "load_avg_at_start": os.getloadavg(),
                          "command": " ".join([Path(sys.executable).name, *sys.argv])},
                 "sections": {}}
    setup = Setup(args, tmp)
    funcs = {"ready": section_ready, "cluster": section_cluster, "throughput": section_throughput,
             "transfer": section_transfer, "workloads": section_workloads}
    try:
        for name in SECTIONS:
            if name not in only:
                res["sections"][name] = {"skipped": "not selected (--only)"}
                continue
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                res["sections"][name] = funcs[name](args, setup, tmp)
            except Skip as e:
                res["sections"][name] = {"skipped": str(e)}
                log(f"{name}: not measured: {e}")
            except Exception as e:
                res["sections"][name] = {"skipped": f"failed: {type(e).__name__}: {e}"[:600],
                                         "traceback": traceback.format_exc()[-2000:]}
                log(f"{name}: FAILED: {e}")
            res["sections"][name]["section_s"] = round(time.perf_counter() - t0, 1)
    finally:
        setup.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    res["meta"]["image"] = setup.image_info
    res["meta"]["cluster"] = setup.cluster_state
    res["meta"]["load_avg_at_end"] = os.getloadavg()
    res["headlines"] = headlines(res)
    try:
        res["scaling_model"] = model_from(res)
    except Exception as e:
        res["scaling_model"] = {"skipped": f"{type(e).__name__}: {e}"}
    try:
        res["plots"] = plots(res, args.out)
    except Exception as e:
        res["plots"] = []
        res["meta"]["plot_error"] = f"{type(e).__name__}: {e}"
        log(f"plots FAILED: {e}")
    res["meta"]["duration_s"] = round(time.perf_counter() - T_START, 1)
    tmpjson = args.out / "latest.json.tmp"
    tmpjson.write_text(json.dumps(_finite(res), indent=1, default=_json_default,
                                  allow_nan=False) + "\n")
    tmpjson.replace(args.out / "latest.json")
    (args.out / "latest.md").write_text(A.render_markdown(res))
    log(f"done in {res['meta']['duration_s']:.0f}s: {args.out / 'latest.md'}")
    print(A.render_markdown(res))
    return 0


def _finite(o):
    """NaN (a failed repetition) becomes null: latest.json stays strict JSON."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_local_ready":
        _local_ready_child(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
