"""Section `transfer`: worker-to-worker bandwidth between two network namespaces, against the limits.

The bench makes two namespaces joined by a veth pair (and removes them at the end). Variants,
interleaved: Dask's transfer under TLS (as deployed) and with --no-tls (roles from the bench's
venv, scheduler and worker ``a`` in namespace A, worker ``b`` in B); raw TCP; and a raw Python
``ssl`` socket in the same SSLContext (so the same cipher) as Dask's TLS. Each receives into
memory it has just written and freed ("warm"), so the figures are the network path's; "cold"
variants of Dask TLS and raw ssl skip that and receive into memory as it comes, which on this VM
adds an erratic first-touch cost (bench/rawsock.py says how much).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import stats
from common import HERE, Skip, log, pair, private_dir, spawn, stop, tail, wait_file

ADDR = {"a": "10.254.13.1", "b": "10.254.13.2"}
MESSAGES = 3  # per repetition, over one connection; a repetition's figure is their median
VARIANTS = ("dask TLS", "dask TCP", "raw ssl", "raw TCP", "dask TLS cold", "raw ssl cold")


def variant(name: str) -> tuple[str, str, str]:
    """("dask" or "raw", "tls"/"ssl"/"tcp", "warm" or "cold") of a variant's name."""
    who, kind, *cold = name.split()
    return who, kind.lower(), "cold" if cold else "warm"


class Namespaces:
    """Two network namespaces joined by a veth pair; ``remove`` deletes both (and the pair)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Skip("needs root (creates two network namespaces)")
        if not shutil.which("ip"):
            raise Skip("iproute2 (ip) is not installed")
        tag = f"{os.getpid() % 100000}"
        self.ns = {"a": f"hpcdb-{tag}-a", "b": f"hpcdb-{tag}-b"}
        self.dev = {"a": f"hb{tag}a", "b": f"hb{tag}b"}
        try:
            for k in "ab":
                self._ip("netns", "add", self.ns[k])
            self._ip("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
            for k in "ab":
                self._ip("link", "set", self.dev[k], "netns", self.ns[k])
                self._ip("-n", self.ns[k], "addr", "add", f"{ADDR[k]}/30", "dev", self.dev[k])
                self._ip("-n", self.ns[k], "link", "set", self.dev[k], "up")
                self._ip("-n", self.ns[k], "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.remove()
            raise Skip(f"could not make the namespaces: {e.stderr.strip()}") from None

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def remove(self) -> None:
        for k in "ab":
            subprocess.run(["ip", "netns", "del", self.ns[k]], capture_output=True, timeout=30)


class DaskPair:
    """bench/xfer_dask.py in namespace A: a scheduler and two workers, driven over stdin."""

    def __init__(self, kind: str, nets: Namespaces, tmp: Path) -> None:
        self.d = private_dir(tmp, f"xfer-{kind}-")
        self.p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{nets.ns['a']}", sys.executable, HERE / "xfer_dask.py",
             self.d, nets.dev["a"], nets.ns["b"], nets.dev["b"], kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.p.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(f"dask {kind} pair did not start: {line.strip()}")
        self.info = json.loads(line[len("READY "):])

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError(f"{cmd}: {line.strip() or 'no answer'}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(60)
        stop([self.p])
        shutil.rmtree(self.d, ignore_errors=True)


def raw(kind: str, nbytes: int, count: int, memory: str, nets: Namespaces, tmp: Path,
        creds: Path | None) -> dict:
    d = private_dir(tmp, f"raw-{kind}-")
    portfile = d / "port"
    rlog, slog = d / "recv.log", d / "send.log"
    extra = [creds] if creds else []
    script = HERE / "rawsock.py"
    recv = spawn([sys.executable, script, "recv", kind, ADDR["b"], portfile, nbytes, count, memory,
                  *extra], rlog, netns=nets.ns["b"])
    send = None
    try:
        wait_file(portfile, [recv], 30, f"raw {kind} receiver", rlog)
        send = spawn([sys.executable, script, "send", kind, ADDR["b"], portfile.read_text(),
                      nbytes, count, *extra], slog, netns=nets.ns["a"])
        if recv.wait(timeout=120) != 0:
            raise RuntimeError(f"raw {kind} receiver failed: {tail(rlog)} / {tail(slog)}")
        send.wait(timeout=30)
        res = json.loads(rlog.read_text().strip().splitlines()[-1])
        return {"bytes": res["bytes"], "messages": res["messages"],
                "bandwidth": res["bandwidth"], "cipher": res.get("cipher")}
    finally:
        stop([recv, send])
        shutil.rmtree(d, ignore_errors=True)


def section(args, setup, tmp: Path) -> dict:
    sizes = [100_000_000] if args.quick else [400_000_000]
    reps = 2 if args.quick else 5
    nets = Namespaces()
    pairs: dict[str, DaskPair] = {}
    try:
        pairs["dask TLS"] = DaskPair("tls", nets, tmp)
        pairs["dask TCP"] = DaskPair("tcp", nets, tmp)
        creds = pairs["dask TLS"].d
        runs = {s: {v: [] for v in VARIANTS} for s in sizes}
        for size in sizes:
            for p in pairs.values():
                p.ask(f"xfer {size} warm 1")  # warm-up: connections, imports
            for r, v in stats.interleave(list(VARIANTS), reps):
                who, kind, memory = variant(v)
                if who == "dask":
                    res = pairs[f"dask {kind.upper()}"].ask(f"xfer {size} {memory} {MESSAGES}")
                else:
                    res = raw(kind, size, MESSAGES, memory, nets, tmp,
                              creds if kind == "ssl" else None)
                runs[size][v].append(res)
                log(f"transfer {size / 1e6:.0f} MB {v:13s} rep {r}: "
                    f"{res['bandwidth'] / 1e6:7.0f} MB/s (messages: "
                    f"{', '.join(f'{b / 1e6:.0f}' for b in res['messages'])})")
        ciphers = {"dask TLS": pairs["dask TLS"].info.get("cipher"),
                   "raw ssl": next((x["cipher"] for x in runs[sizes[0]]["raw ssl"]), None)}
    finally:
        for p in pairs.values():
            p.close()
        nets.remove()
    out = {"path": "namespace A -> namespace B over a veth pair (MTU 1500), roles from the "
                   "bench's venv; each repetition the median of "
                   f"{MESSAGES} messages on one connection; warm: the receiver wrote and freed as "
                   "many bytes just before each, cold: memory as it comes", "sizes": sizes, "reps": reps, "ciphers": ciphers,
           "runs": {str(s): r for s, r in runs.items()},
           "summary": {}, "ratios": {}}
    for s in sizes:
        rs = runs[s]
        out["summary"][str(s)] = {v: stats.summarize([x["bandwidth"] for x in rs[v]])
                                  for v in VARIANTS}
        out["ratios"][str(s)] = {
            "TLS/raw ssl": pair(rs["dask TLS"], rs["raw ssl"], "bandwidth"),
            "TCP/raw TCP": pair(rs["dask TCP"], rs["raw TCP"], "bandwidth"),
            "TLS/TCP": pair(rs["dask TLS"], rs["dask TCP"], "bandwidth"),
            "raw ssl/raw TCP": pair(rs["raw ssl"], rs["raw TCP"], "bandwidth"),
            "TLS/raw ssl cold": pair(rs["dask TLS cold"], rs["raw ssl cold"], "bandwidth")}
    return out
