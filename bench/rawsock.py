"""Raw sockets between two namespaces: the limits Dask's worker-to-worker transfer is compared to.

    python bench/rawsock.py recv tcp|ssl HOST PORTFILE NBYTES COUNT warm|cold [CREDENTIALS]
    python bench/rawsock.py send tcp|ssl HOST PORT NBYTES COUNT [CREDENTIALS]

COUNT messages of NBYTES go over one connection (as Dask's pooled connection carries its); the
receiver prints JSON with each message's bandwidth and their median.

Each side handles its socket and its memory as Dask's comm does, so that the raw side differs
from Dask's only by what Dask adds:
- ``ssl`` wraps the socket in the very ``ssl.SSLContext`` Dask's workers use (built by
  ``distributed.Security`` from hpcdask's credentials in CREDENTIALS), so it negotiates the same
  protocol and cipher;
- both ends set TCP_NODELAY, as distributed's comm does (without it, over an MTU of 1500, each
  16 KB TLS record's last segment waits for an ACK: raw ssl measured 337-562 MB/s, 1,154-1,466
  with it);
- the receiver reads each message into a fresh buffer from distributed's own ``host_array``,
  asking for all that is left each time (as tornado's ``read_into`` does), and times from its
  first byte to its last. ``warm`` first writes and frees as many bytes (the bench does the same in Dask's
  receiving worker): on this VM a first touch of memory not used lately costs up to ~1 s per
  400 MB, erratically, and that would swamp what is measured;
- the sender sends memory it has written, as Dask's worker sends its array.
Run each side in its namespace (``nsenter --net=/run/netns/NAME``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path


def _context(creds: str, side: str):
    from hpcdask import security

    sec = security.load(Path(creds)).security()
    args = sec.get_listen_args("worker") if side == "server" else \
        sec.get_connection_args("worker")
    return args["ssl_context"]


def warm(nbytes: int) -> None:
    """Write and free NBYTES, so the next allocation of that size reuses memory in use lately."""
    import numpy as np

    np.ones(nbytes, dtype="u1")


def recv(kind: str, host: str, portfile: str, nbytes: int, count: int, memory: str,
         creds: str | None) -> None:
    from distributed.protocol.utils import host_array

    srv = socket.create_server((host, 0))
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.replace(tmp, portfile)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cipher = None
    if kind == "ssl":
        conn = _context(creds, "server").wrap_socket(conn, server_side=True)
        cipher = list(conn.cipher())
    seconds = []
    for _ in range(count):
        if memory == "warm":
            warm(nbytes)
        view = host_array(nbytes)
        got = conn.recv_into(view)
        t0 = time.perf_counter()
        while got < nbytes:
            n = conn.recv_into(view[got:])
            if not n:
                raise SystemExit(f"rawsock: the sender stopped after {got} of {nbytes} bytes")
            got += n
        seconds.append(time.perf_counter() - t0)
        del view
    conn.sendall(b"k")  # the sender closes only after this: no RST over unread TLS tickets
    conn.close()
    srv.close()
    bw = [nbytes / s for s in seconds]
    print(json.dumps({"bytes": nbytes, "messages": bw, "bandwidth": statistics.median(bw),
                      "cipher": cipher}))


def send(kind: str, host: str, port: int, nbytes: int, count: int, creds: str | None) -> None:
    # Written memory, as Dask's source array is (np.ones): bytes(nbytes) would be untouched
    # zero pages, each read faulting during the send (measured: raw TCP 1.45 GB/s, 2.0 with this).
    data = bytearray(b"\x01") * nbytes
    with socket.create_connection((host, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = _context(creds, "client").wrap_socket(s, server_hostname=None) if kind == "ssl" else s
        for _ in range(count):
            t.sendall(data)
        t.recv(1)
        if t is not s:
            t.close()


if __name__ == "__main__":
    mode, kind, host, where, size, count = sys.argv[1:7]
    if mode == "recv":
        recv(kind, host, where, int(float(size)), int(count), sys.argv[7],
             sys.argv[8] if len(sys.argv) > 8 else None)
    else:
        send(kind, host, int(where), int(float(size)), int(count),
             sys.argv[7] if len(sys.argv) > 7 else None)
