"""Raw sockets between two namespaces: the limits Dask's worker-to-worker transfer is compared to.

    python bench/rawsock.py recv tcp|ssl HOST PORTFILE NBYTES [CREDENTIALS]  # prints JSON
    python bench/rawsock.py send tcp|ssl HOST PORT NBYTES [CREDENTIALS]

``ssl`` wraps the socket in the very ``ssl.SSLContext`` Dask's workers use (built by
``distributed.Security`` from hpcdask's credentials in CREDENTIALS), so it negotiates the same
protocol and cipher. Run each side in its namespace (``nsenter --net=/run/netns/NAME``). The
receiver reads into one preallocated buffer (as Dask does for large frames) and reports the
time from the connection's first byte to its last, and the negotiated cipher. The sender sends
memory it has written, as Dask's worker sends its array.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

CHUNK = 4 << 20


def _context(creds: str, side: str):
    from hpcdask import security

    sec = security.load(Path(creds)).security()
    args = sec.get_listen_args("worker") if side == "server" else \
        sec.get_connection_args("worker")
    return args["ssl_context"]


def recv(kind: str, host: str, portfile: str, nbytes: int, creds: str | None) -> None:
    srv = socket.create_server((host, 0))
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.replace(tmp, portfile)
    conn, _ = srv.accept()
    cipher = None
    if kind == "ssl":
        conn = _context(creds, "server").wrap_socket(conn, server_side=True)
        cipher = list(conn.cipher())
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = conn.recv_into(view[:CHUNK])
    t0 = time.perf_counter()
    while got < nbytes:
        n = conn.recv_into(view[got:got + CHUNK])
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    conn.sendall(b"k")  # the sender closes only after this: no RST over unread TLS tickets
    conn.close()
    srv.close()
    print(json.dumps({"bytes": got, "seconds": dt, "bandwidth": got / dt if dt else None,
                      "cipher": cipher}))


def send(kind: str, host: str, port: int, nbytes: int, creds: str | None) -> None:
    # Written memory, as Dask's source array is (np.ones): bytes(nbytes) would be untouched
    # zero pages, each read faulting during the send (measured: raw TCP 1.45 GB/s, 2.0 with this).
    data = bytearray(b"\x01") * nbytes
    with socket.create_connection((host, port)) as s:
        if kind == "ssl":
            with _context(creds, "client").wrap_socket(s, server_hostname=None) as t:
                t.sendall(data)
                t.recv(1)
            return
        s.sendall(data)
        s.recv(1)


if __name__ == "__main__":
    mode, kind, host, where, size = sys.argv[1:6]
    creds = sys.argv[6] if len(sys.argv) > 6 else None
    if mode == "recv":
        recv(kind, host, where, int(float(size)), creds)
    else:
        send(kind, host, int(where), int(float(size)), creds)
