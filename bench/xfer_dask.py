"""Dask's side of the transfer section, run inside namespace A (the client must reach the scheduler).

    python bench/xfer_dask.py DIR IFACE_A NETNS_B IFACE_B tls|tcp

Starts ``hpcdask scheduler`` and worker ``a`` in this namespace and worker ``b`` in NETNS_B (each
bound to its veth), prints ``READY {json}``, then answers one JSON line per command read from
stdin: ``xfer NBYTES warm|cold COUNT``: COUNT messages, each an array made on ``a`` that a task
pinned to ``b`` needs (bandwidth = bytes / the duration of ``b``'s own transfer log entry); the
answer holds each message's bandwidth and their median. ``warm``: ``b`` first writes and frees
NBYTES, as bench/rawsock.py's receiver does (see there why).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HPCDASK, spawn, stop, tail, wait_file  # noqa: E402


def _warm(nbytes):
    import numpy as np

    np.ones(nbytes, dtype="u1")


def _nkeys(dask_worker):
    return len(dask_worker.data)


def _last_transfer(dask_worker):
    e = list(dask_worker.transfer_incoming_log)[-1]
    return {"duration": e["duration"], "total": e["total"]}


def _xfer(client, addr: dict, n: int, memory: str) -> dict:
    import numpy as np
    from distributed import wait

    x = client.submit(np.ones, n // 8, workers=[addr["a"]], pure=False)
    wait(x)
    if memory == "warm":
        client.run(_warm, n, workers=[addr["b"]])
    y = client.submit(len, x, workers=[addr["b"]], allow_other_workers=False, pure=False)
    assert y.result() == n // 8
    e = client.run(_last_transfer, workers=[addr["b"]])[addr["b"]]
    if e["total"] != n:
        raise RuntimeError(f"b's last transfer was {e['total']} bytes, not {n}")
    # Both copies are freed before the next message, as the raw receiver frees its buffer:
    # otherwise the workers unmap 400 MB while the next message is being received.
    x.release()
    y.release()
    deadline = time.monotonic() + 60
    while any(client.run(_nkeys).values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the workers still hold the last message's keys after 60 s")
        time.sleep(0.01)
    return {"bytes": e["total"], "bandwidth": e["total"] / e["duration"]}


def main(d: Path, iface_a: str, netns_b: str, iface_b: str, kind: str) -> None:
    from hpcdask import connect

    tls = kind == "tls"
    flag = [] if tls else ["--no-tls"]
    f = d / "scheduler.json"
    logfile = d / "roles.log"
    procs = [spawn([HPCDASK, "scheduler", "--scheduler-file", f, "--interface", iface_a,
                    "--dashboard", "off", *flag], logfile)]
    try:
        wait_file(f, procs, 120, "scheduler", logfile)
        common = ["worker", "--scheduler-file", f, "--nthreads", "1", "--memory-limit", "4GiB",
                  *flag]
        procs.append(spawn([HPCDASK, *common, "--interface", iface_a, "--name", "a"], logfile))
        procs.append(spawn([HPCDASK, *common, "--interface", iface_b, "--name", "b"], logfile,
                           netns=netns_b))
        client = connect.connect(f, tls=tls, check=False)
        client.wait_for_workers(2, timeout=120)
        addr = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        extra = client.scheduler_comm.comm.extra_info
        print("READY " + json.dumps({"workers": addr, "cipher": extra.get("cipher")}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd[0] == "xfer":
                n, memory, count = int(cmd[1]), cmd[2], int(cmd[3])
                msgs = [_xfer(client, addr, n, memory) for _ in range(count)]
                out = {"bytes": n, "messages": [m["bandwidth"] for m in msgs],
                       "bandwidth": statistics.median(m["bandwidth"] for m in msgs)}
            else:
                break
            print(json.dumps(out), flush=True)
        client.close(timeout=10)
    except Exception as e:
        print("FAILED " + json.dumps(f"{type(e).__name__}: {e}: {tail(logfile)}"), flush=True)
    finally:
        stop(procs[1:])  # workers first: they say goodbye to a scheduler that is still there
        stop(procs[:1])


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:6])
